//! Byte-exact encodings of everything a volume writes to its store. Every
//! layout here is described in docs/FORMAT.md; change one and you must bump
//! [`FORMAT_VERSION`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, AeadKey, Key32, TAG_LEN};
use crate::kms::WrappedKey;

/// Store format version (of the header), checked on every open. Version 2
/// added the re-key state to the header, version 3 the data id (clones)
/// and snapshot manifests; version 1 and 2 headers are still read and are
/// rewritten as version 3 by the first read-write open.
pub const FORMAT_VERSION: u16 = 4;
/// Version of chunk objects, journal records and checkpoints (unchanged
/// since store format 1).
pub const OBJECT_VERSION: u16 = 1;
/// Version of journal records and checkpoints written by store format 4:
/// padded plaintext, and checkpoints carry recent commit history.
/// Version 1 objects (format 3) are still read.
pub const META_OBJECT_VERSION: u16 = 2;
/// Journal records and checkpoints of version 2 pad their plaintext with
/// zeros to a multiple of this, so that a commit does not show a small
/// file's exact size or an append's exact length.
pub const META_PAD: usize = 256;
/// Checkpoints keep the tags of at most this many earlier commits.
pub const HISTORY_MAX: usize = 1024;
/// Magic at the start of `sealfs.store`.
pub const HEADER_MAGIC: &[u8; 8] = b"SEALFSV\0";
/// Magic of a chunk object.
pub const CHUNK_MAGIC: &[u8; 4] = b"SFCK";
/// Magic of a journal record.
pub const JOURNAL_MAGIC: &[u8; 4] = b"SFJR";
/// Magic of a checkpoint.
pub const CHECKPOINT_MAGIC: &[u8; 4] = b"SFCP";
/// Magic of a snapshot manifest.
pub const SNAPSHOT_MAGIC: &[u8; 4] = b"SFSN";
/// Plaintext bytes per checkpoint frame.
pub const CHECKPOINT_FRAME: usize = 1 << 20;
/// Largest header we accept.
pub const MAX_HEADER: usize = 64 * 1024;

/// HKDF labels for the volume sub-keys.
pub const LABEL_META: &[u8] = b"sealfs v1 metadata aead";
/// Header MAC key label.
pub const LABEL_HEADER_MAC: &[u8] = b"sealfs v1 header mac";
/// Content key label.
pub const LABEL_CONTENT: &[u8] = b"sealfs v1 content aead";

/// A store or object could not be decoded or authenticated.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Bad(String),
    #[error("unsupported store format version {found} (this sealfs reads version {supported}); upgrade sealfs")]
    Version { found: u16, supported: u16 },
}

fn bad(s: impl Into<String>) -> FormatError {
    FormatError::Bad(s.into())
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    /// The current time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// The kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// Reference from a file to one encrypted chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Random object id; the object is `chunks/<hex(id)[..2]>/<hex(id)>`.
    pub id: [u8; 16],
    /// Commit sequence number at which the chunk was written (birth epoch).
    pub epoch: u64,
    /// Plaintext length of the chunk.
    pub len: u32,
}

impl ChunkRef {
    /// Object name of the chunk.
    pub fn name(&self) -> String {
        hex::encode(self.id)
    }
}

/// Persistent content of an inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordData {
    /// Regular file, small content kept inline, sealed with the content key.
    InlineFile(Vec<u8>),
    /// Regular file in chunks: chunk index -> chunk.
    ChunkedFile(Vec<(u64, ChunkRef)>),
    /// Directory: parent inode and entries name -> inode.
    Dir {
        parent: u64,
        entries: Vec<(Vec<u8>, u64)>,
    },
    /// Symlink target.
    Symlink(Vec<u8>),
    /// FIFO, socket or device node.
    Special,
}

/// One inode as persisted in journal records and checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
    pub kind: FileKind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub data: RecordData,
}

/// The body of one journal record: the inodes changed by one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalBody {
    pub next_ino: u64,
    pub upserts: Vec<(u64, InodeRecord)>,
    pub deletes: Vec<u64>,
}

/// The body of a checkpoint: the whole inode table at its sequence number.
/// A checkpoint *is* the commit of its sequence number: the next journal
/// record chains to the tag of the checkpoint's last frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    pub next_ino: u64,
    pub inodes: Vec<(u64, InodeRecord)>,
    /// `(seq, tag)` of up to [`HISTORY_MAX`] commits before this one, oldest
    /// first, so that a machine that saw one of them can tell this history
    /// from another copy's (empty in version 1 checkpoints).
    pub history: Vec<(u64, [u8; TAG_LEN])>,
}

/// A version 1 checkpoint's body (format 3).
#[derive(Deserialize)]
struct CheckpointBodyV1 {
    next_ino: u64,
    inodes: Vec<(u64, InodeRecord)>,
}

/// `postcard(value) ‖ zeros` to a multiple of [`META_PAD`], in a
/// zeroizing buffer.
fn encode_padded<T: Serialize>(value: &T) -> zeroize::Zeroizing<Vec<u8>> {
    let mut v = zeroize::Zeroizing::new(postcard::to_stdvec(value).expect("serializable"));
    let padded = v.len().div_ceil(META_PAD).max(1) * META_PAD;
    v.resize(padded, 0);
    v
}

/// Decode what [`encode_padded`] made: the padding must be zeros, and
/// shorter than [`META_PAD`].
fn decode_padded<'a, T: Deserialize<'a>>(plain: &'a [u8]) -> Option<T> {
    let (v, rest) = postcard::take_from_bytes::<T>(plain).ok()?;
    (rest.len() < META_PAD && rest.iter().all(|&b| b == 0)).then_some(v)
}

/// The authenticated, mostly-plaintext body of `sealfs.store`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderBody {
    pub store_id: [u8; 16],
    pub created: u64,
    pub chunk_size: u32,
    pub inline_max: u32,
    /// Volume metadata key, wrapped by the service key.
    pub vmk: WrappedKey,
    /// Volume content key, wrapped by the user's master key.
    pub vck: WrappedKey,
    /// Generation of the content key (bumped by a full re-key).
    pub content_gen: u32,
    /// Set while a full re-key (`sealfs rekey`) is under way: the previous
    /// content key, still needed for objects not yet re-encrypted.
    pub rekey: Option<RekeyState>,
    /// The id bound into the associated data of chunk objects and inline
    /// content (format 3). Equal to `store_id` except in a clone that
    /// shares its origin's chunk objects, where it is the origin's.
    pub data_id: [u8; 16],
}

/// The previous content key during a re-key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyState {
    /// The previous content key, wrapped as it was.
    pub old_vck: WrappedKey,
    /// Its generation (`content_gen - 1`).
    pub old_gen: u32,
}

/// Header body of store format version 1 (no re-key state).
#[derive(Deserialize)]
struct HeaderBodyV1 {
    store_id: [u8; 16],
    created: u64,
    chunk_size: u32,
    inline_max: u32,
    vmk: WrappedKey,
    vck: WrappedKey,
    content_gen: u32,
}

/// The format version of an encoded header (0 when it is not one).
pub fn header_version(data: &[u8]) -> u16 {
    if data.len() < 10 || &data[..8] != HEADER_MAGIC {
        return 0;
    }
    u16::from_le_bytes([data[8], data[9]])
}

/// Encode the header: `magic ‖ version ‖ body_len ‖ body ‖ HMAC`.
pub fn encode_header(body: &HeaderBody, mac_key: &Key32) -> Vec<u8> {
    let b = postcard::to_stdvec(body).expect("serializable");
    let mut out = Vec::with_capacity(14 + b.len() + 32);
    out.extend_from_slice(HEADER_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(&b);
    let mac = crypto::hmac(mac_key, &out);
    out.extend_from_slice(&mac);
    out
}

/// Parse the header without verifying the MAC (the MAC key is derived from
/// the VMK, which is only known after unwrapping). Returns the body and the
/// (authenticated part, mac) split for [`verify_header`].
pub fn decode_header(data: &[u8]) -> Result<HeaderBody, FormatError> {
    if data.len() < 14 + 32 || &data[..8] != HEADER_MAGIC {
        return Err(bad("not a sealfs store header (bad magic or too short)"));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes(data[10..14].try_into().expect("4")) as usize;
    if data.len() != 14 + len + 32 {
        return Err(bad(
            "store header length does not match its contents (truncated or extended)",
        ));
    }
    let raw = &data[14..14 + len];
    let unparsable = |_| bad("store header body does not parse");
    // Each version's body is the previous one with fields appended (and
    // postcard puts nothing between fields): format 2 = format 1 ‖ rekey.
    let old = match version {
        1 => Some((
            postcard::from_bytes::<HeaderBodyV1>(raw).map_err(unparsable)?,
            None,
        )),
        2 => Some(
            postcard::from_bytes::<(HeaderBodyV1, Option<RekeyState>)>(raw).map_err(unparsable)?,
        ),
        _ => None,
    };
    let body: HeaderBody = match old {
        // Formats 1 and 2 bound chunks to the store id: it is their data id.
        Some((v, rekey)) => HeaderBody {
            store_id: v.store_id,
            created: v.created,
            chunk_size: v.chunk_size,
            inline_max: v.inline_max,
            vmk: v.vmk,
            vck: v.vck,
            content_gen: v.content_gen,
            rekey,
            data_id: v.store_id,
        },
        None => postcard::from_bytes(raw).map_err(unparsable)?,
    };
    if !(4096..=(16 << 20)).contains(&body.chunk_size) || !body.chunk_size.is_power_of_two() {
        return Err(bad("store header has an invalid chunk size"));
    }
    Ok(body)
}

/// Verify the header MAC in constant time.
pub fn verify_header(data: &[u8], mac_key: &Key32) -> bool {
    if data.len() < 32 {
        return false;
    }
    let (msg, mac) = data.split_at(data.len() - 32);
    crypto::hmac_verify(mac_key, msg, mac)
}

fn chunk_ad(store_id: &[u8; 16], id: &[u8; 16], gen: u32) -> Vec<u8> {
    let mut ad = Vec::with_capacity(16 + 16 + 16 + 4);
    ad.extend_from_slice(b"sealfs-chunk-v1\0");
    ad.extend_from_slice(store_id);
    ad.extend_from_slice(id);
    ad.extend_from_slice(&gen.to_le_bytes());
    ad
}

/// Chunk plaintext is zero-padded to a multiple of this many bytes before
/// sealing, so an object's size reveals a file's tail length only rounded
/// up to 4 KiB.
pub const CHUNK_PAD: usize = 4096;

/// Length of a chunk's padded plaintext.
pub fn padded_len(len: usize) -> usize {
    len.div_ceil(CHUNK_PAD) * CHUNK_PAD
}

/// Seal a chunk object: `magic ‖ version ‖ gen ‖ nonce ‖ ciphertext ‖ tag`,
/// where the plaintext is `data ‖ zero padding` (see [`CHUNK_PAD`]).
pub fn seal_chunk(
    key: &AeadKey,
    store_id: &[u8; 16],
    id: &[u8; 16],
    gen: u32,
    plain: &[u8],
) -> Vec<u8> {
    let ad = chunk_ad(store_id, id, gen);
    let sealed = if plain.len() % CHUNK_PAD == 0 {
        key.seal(&ad, plain)
    } else {
        let mut padded = Vec::with_capacity(padded_len(plain.len()));
        padded.extend_from_slice(plain);
        padded.resize(padded_len(plain.len()), 0);
        key.seal(&ad, &padded)
    };
    let mut out = Vec::with_capacity(10 + sealed.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// The content-key generation a chunk object was sealed with (from its
/// unauthenticated header; [`open_chunk`] authenticates it).
pub fn chunk_gen(data: &[u8]) -> Option<u32> {
    if data.len() < 10 || &data[..4] != CHUNK_MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(data[6..10].try_into().expect("4")))
}

/// Open a chunk object holding `len` data bytes; fails on any
/// modification, swap or truncation, and on a length or padding mismatch.
pub fn open_chunk(
    key: &AeadKey,
    store_id: &[u8; 16],
    id: &[u8; 16],
    gen: u32,
    len: usize,
    data: &[u8],
) -> Result<Vec<u8>, FormatError> {
    if data.len() < 10 || &data[..4] != CHUNK_MAGIC {
        return Err(bad("chunk object has a bad header"));
    }
    if u16::from_le_bytes([data[4], data[5]]) != OBJECT_VERSION {
        return Err(bad("chunk object has an unknown format version"));
    }
    let g = u32::from_le_bytes(data[6..10].try_into().expect("4"));
    if g != gen {
        return Err(bad(
            "chunk object belongs to another content-key generation",
        ));
    }
    let mut plain = key
        .open(&chunk_ad(store_id, id, gen), &data[10..])
        .map_err(|_| bad("chunk object failed authentication"))?;
    if plain.len() != padded_len(len) || plain[len..].iter().any(|&b| b != 0) {
        return Err(bad("chunk object has the wrong length"));
    }
    plain.truncate(len);
    Ok(plain)
}

fn inline_ad(store_id: &[u8; 16], ino: u64) -> Vec<u8> {
    let mut ad = b"sealfs-inline-v1".to_vec();
    ad.extend_from_slice(store_id);
    ad.extend_from_slice(&ino.to_le_bytes());
    ad
}

/// Seal inline file content under the content key.
pub fn seal_inline(key: &AeadKey, store_id: &[u8; 16], ino: u64, plain: &[u8]) -> Vec<u8> {
    key.seal(&inline_ad(store_id, ino), plain)
}

/// Open inline file content.
pub fn open_inline(
    key: &AeadKey,
    store_id: &[u8; 16],
    ino: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    key.open(&inline_ad(store_id, ino), sealed)
        .map_err(|_| bad("inline file content failed authentication"))
}

/// Object name of journal record `seq`.
pub fn journal_name(seq: u64) -> String {
    format!("journal-{seq:016x}")
}

/// Object name of checkpoint `seq`.
pub fn checkpoint_name(seq: u64) -> String {
    format!("checkpoint-{seq:016x}")
}

/// Parse an object name `prefix-<16 hex>`.
pub fn parse_seq(name: &str, prefix: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    if rest.len() != 16 {
        return None;
    }
    u64::from_str_radix(rest, 16).ok()
}

fn journal_ad(store_id: &[u8; 16], seq: u64, prev_tag: &[u8; TAG_LEN]) -> Vec<u8> {
    let mut ad = b"sealfs-journal-v1".to_vec();
    ad.extend_from_slice(store_id);
    ad.extend_from_slice(&seq.to_le_bytes());
    ad.extend_from_slice(prev_tag);
    ad
}

/// Seal a journal record. Returns the object bytes and the record's tag.
pub fn seal_journal(
    key: &AeadKey,
    store_id: &[u8; 16],
    seq: u64,
    prev_tag: &[u8; TAG_LEN],
    body: &JournalBody,
) -> (Vec<u8>, [u8; TAG_LEN]) {
    let plain = encode_padded(body);
    let sealed = key.seal(&journal_ad(store_id, seq, prev_tag), &plain);
    let tag = crypto::tag_of(&sealed);
    let mut out = Vec::with_capacity(14 + sealed.len());
    out.extend_from_slice(JOURNAL_MAGIC);
    out.extend_from_slice(&META_OBJECT_VERSION.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sealed);
    (out, tag)
}

/// Open a journal record that must have sequence number `seq` and follow
/// the record whose tag is `prev_tag`.
pub fn open_journal(
    key: &AeadKey,
    store_id: &[u8; 16],
    seq: u64,
    prev_tag: &[u8; TAG_LEN],
    data: &[u8],
) -> Result<(JournalBody, [u8; TAG_LEN]), FormatError> {
    if data.len() < 14 || &data[..4] != JOURNAL_MAGIC {
        return Err(bad(format!("journal record {seq} has a bad header")));
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    if version != OBJECT_VERSION && version != META_OBJECT_VERSION {
        return Err(bad(format!(
            "journal record {seq} has an unknown format version"
        )));
    }
    if u64::from_le_bytes(data[6..14].try_into().expect("8")) != seq {
        return Err(bad(format!(
            "journal record {seq} carries another sequence number"
        )));
    }
    let sealed = &data[14..];
    let plain = key
        .open(&journal_ad(store_id, seq, prev_tag), sealed)
        .map_err(|_| bad(format!("journal record {seq} failed authentication (modified, reordered, or from another store)")))?;
    let plain = zeroize::Zeroizing::new(plain);
    let body = if version == OBJECT_VERSION {
        postcard::from_bytes(&plain).ok()
    } else {
        decode_padded(&plain)
    }
    .ok_or_else(|| bad(format!("journal record {seq} does not parse")))?;
    Ok((body, crypto::tag_of(sealed)))
}

fn checkpoint_ad(store_id: &[u8; 16], seq: u64, index: u32, last: bool) -> Vec<u8> {
    let mut ad = b"sealfs-checkpoint-v1".to_vec();
    ad.extend_from_slice(store_id);
    ad.extend_from_slice(&seq.to_le_bytes());
    ad.extend_from_slice(&index.to_le_bytes());
    ad.push(last as u8);
    ad
}

/// Seal `plain` in STREAM-style frames:
/// `magic ‖ version ‖ num ‖ frames`, each frame `len(u32) ‖ nonce ‖ ct ‖ tag`,
/// with associated data `ad(frame index, last)`. Returns the object and
/// the tag of its last frame.
fn seal_framed(
    key: &AeadKey,
    magic: &[u8; 4],
    version: u16,
    num: u64,
    plain: &[u8],
    ad: impl Fn(u32, bool) -> Vec<u8>,
) -> (Vec<u8>, [u8; TAG_LEN]) {
    let mut out = Vec::with_capacity(plain.len() + 64);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&num.to_le_bytes());
    let frames: Vec<&[u8]> = if plain.is_empty() {
        vec![&[][..]]
    } else {
        plain.chunks(CHECKPOINT_FRAME).collect()
    };
    let n = frames.len();
    let mut tag = [0u8; TAG_LEN];
    for (i, f) in frames.into_iter().enumerate() {
        let sealed = key.seal(&ad(i as u32, i + 1 == n), f);
        tag = crypto::tag_of(&sealed);
        out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        out.extend_from_slice(&sealed);
    }
    (out, tag)
}

/// Open an object sealed by [`seal_framed`] that must carry `num`; `what`
/// names it in errors ("checkpoint 7").
/// What [`open_framed`] returns: the plaintext, the tag of the last frame
/// and the object's version.
type Framed = (zeroize::Zeroizing<Vec<u8>>, [u8; TAG_LEN], u16);

/// Returns the plaintext, the tag of the last frame and the object's
/// version (one of `versions`).
fn open_framed(
    key: &AeadKey,
    magic: &[u8; 4],
    versions: &[u16],
    what: &str,
    num: u64,
    data: &[u8],
    ad: impl Fn(u32, bool) -> Vec<u8>,
) -> Result<Framed, FormatError> {
    if data.len() < 14 || &data[..4] != magic {
        return Err(bad(format!("{what} has a bad header")));
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    if !versions.contains(&version) {
        return Err(bad(format!("{what} has an unknown format version")));
    }
    if u64::from_le_bytes(data[6..14].try_into().expect("8")) != num {
        return Err(bad(format!("{what} carries another number")));
    }
    let mut plain = zeroize::Zeroizing::new(Vec::new());
    let mut pos = 14;
    let mut index = 0u32;
    loop {
        if data.len() < pos + 4 {
            return Err(bad(format!("{what} is truncated")));
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4")) as usize;
        pos += 4;
        if data.len() < pos + len {
            return Err(bad(format!("{what} is truncated")));
        }
        let frame = &data[pos..pos + len];
        pos += len;
        let last = pos == data.len();
        let p = key.open(&ad(index, last), frame).map_err(|_| {
            bad(format!(
                "{what} frame {index} failed authentication (modified, truncated or reordered)"
            ))
        })?;
        plain.extend_from_slice(&p);
        if last {
            return Ok((plain, crypto::tag_of(frame), version));
        }
        index += 1;
    }
}

/// Seal a checkpoint (see [`seal_framed`]). Returns the object and the tag
/// of its last frame.
pub fn seal_checkpoint(
    key: &AeadKey,
    store_id: &[u8; 16],
    seq: u64,
    body: &CheckpointBody,
) -> (Vec<u8>, [u8; TAG_LEN]) {
    let plain = encode_padded(body);
    seal_framed(
        key,
        CHECKPOINT_MAGIC,
        META_OBJECT_VERSION,
        seq,
        &plain,
        |i, last| checkpoint_ad(store_id, seq, i, last),
    )
}

/// Open a checkpoint that must have sequence number `seq`; returns the body
/// and the tag of its last frame.
pub fn open_checkpoint(
    key: &AeadKey,
    store_id: &[u8; 16],
    seq: u64,
    data: &[u8],
) -> Result<(CheckpointBody, [u8; TAG_LEN]), FormatError> {
    let what = format!("checkpoint {seq}");
    let (plain, tag, version) = open_framed(
        key,
        CHECKPOINT_MAGIC,
        &[OBJECT_VERSION, META_OBJECT_VERSION],
        &what,
        seq,
        data,
        |i, last| checkpoint_ad(store_id, seq, i, last),
    )?;
    let body = if version == OBJECT_VERSION {
        postcard::from_bytes::<CheckpointBodyV1>(&plain)
            .ok()
            .map(|b| CheckpointBody {
                next_ino: b.next_ino,
                inodes: b.inodes,
                history: Vec::new(),
            })
    } else {
        decode_padded(&plain)
    }
    .ok_or_else(|| bad(format!("{what} does not parse")))?;
    if body.history.len() > HISTORY_MAX {
        return Err(bad(format!("{what} has too long a history")));
    }
    Ok((body, tag))
}

/// A snapshot manifest (`meta/snapshot-<id %016x>`): the whole inode table
/// of the commit the snapshot was taken at, with its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The commit sequence number the snapshot froze.
    pub seq: u64,
    pub next_ino: u64,
    pub inodes: Vec<(u64, InodeRecord)>,
}

fn snapshot_ad(store_id: &[u8; 16], id: u64, index: u32, last: bool) -> Vec<u8> {
    let mut ad = b"sealfs-snapshot-v1".to_vec();
    ad.extend_from_slice(store_id);
    ad.extend_from_slice(&id.to_le_bytes());
    ad.extend_from_slice(&index.to_le_bytes());
    ad.push(last as u8);
    ad
}

/// Object name of snapshot manifest `id`.
pub fn snapshot_name(id: u64) -> String {
    format!("snapshot-{id:016x}")
}

/// Seal a snapshot manifest with the metadata key.
pub fn seal_snapshot(key: &AeadKey, store_id: &[u8; 16], id: u64, body: &SnapshotBody) -> Vec<u8> {
    let plain = zeroize::Zeroizing::new(postcard::to_stdvec(body).expect("serializable"));
    seal_framed(
        key,
        SNAPSHOT_MAGIC,
        OBJECT_VERSION,
        id,
        &plain,
        |i, last| snapshot_ad(store_id, id, i, last),
    )
    .0
}

/// Open snapshot manifest `id`.
pub fn open_snapshot(
    key: &AeadKey,
    store_id: &[u8; 16],
    id: u64,
    data: &[u8],
) -> Result<SnapshotBody, FormatError> {
    let what = format!("snapshot manifest {id:016x}");
    let (plain, _, _) = open_framed(
        key,
        SNAPSHOT_MAGIC,
        &[OBJECT_VERSION],
        &what,
        id,
        data,
        |i, last| snapshot_ad(store_id, id, i, last),
    )?;
    postcard::from_bytes(&plain).map_err(|_| bad(format!("{what} does not parse")))
}

/// Convert a sorted map into the vector form used on disk.
pub fn map_to_vec<K: Clone + Ord, V: Clone>(m: &BTreeMap<K, V>) -> Vec<(K, V)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key32;

    fn key() -> AeadKey {
        AeadKey::new(&Key32::from_bytes([7u8; 32]))
    }

    fn sample_record() -> InodeRecord {
        InodeRecord {
            kind: FileKind::File,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            rdev: 0,
            size: 3,
            atime: Timespec { sec: 1, nsec: 2 },
            mtime: Timespec { sec: 3, nsec: 4 },
            ctime: Timespec { sec: 5, nsec: 6 },
            crtime: Timespec { sec: 7, nsec: 8 },
            xattrs: vec![(b"user.a".to_vec(), b"b".to_vec())],
            data: RecordData::InlineFile(vec![1, 2, 3]),
        }
    }

    /// Known-answer vector for the postcard encoding of an inode record:
    /// pins the on-disk layout documented in docs/FORMAT.md.
    #[test]
    fn inode_record_encoding_vector() {
        let bytes = postcard::to_stdvec(&sample_record()).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            // kind=0 perm=0x1a4(varint a4 03) uid=1 gid=2 nlink=1 rdev=0 size=3
            // atime=(1,2) mtime=(3,4) ctime=(5,6) crtime=(7,8) as zigzag-i64 + u32 varints,
            // 1 xattr ("user.a" = "b"), data variant 0 (InlineFile) with 3 bytes
            "00a4030102010003020206040a060e080106757365722e6101620003010203"
        );
        let back: InodeRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, sample_record());
    }

    /// Known-answer vector for a chunk object with a fixed nonce.
    #[test]
    fn chunk_object_vector() {
        let k = key();
        let sid = [1u8; 16];
        let id = [2u8; 16];
        let mut ad = b"sealfs-chunk-v1\0".to_vec();
        ad.extend_from_slice(&sid);
        ad.extend_from_slice(&id);
        ad.extend_from_slice(&1u32.to_le_bytes());
        let mut padded = b"hello".to_vec();
        padded.resize(CHUNK_PAD, 0);
        let sealed = k.seal_with_nonce(&[9u8; 12], &ad, &padded);
        let mut obj = b"SFCK".to_vec();
        obj.extend_from_slice(&[1, 0, 1, 0, 0, 0]);
        obj.extend_from_slice(&sealed);
        assert_eq!(open_chunk(&k, &sid, &id, 1, 5, &obj).unwrap(), b"hello");
        assert_eq!(obj.len(), 10 + 12 + 4096 + 16);
        // the length recorded in metadata must match: data where padding
        // should be, or a padded length that does not fit, is refused
        assert!(open_chunk(&k, &sid, &id, 1, 4, &obj).is_err());
        assert!(open_chunk(&k, &sid, &id, 1, 4097, &obj).is_err());
        assert_eq!(&obj[..10], b"SFCK\x01\x00\x01\x00\x00\x00");
    }

    #[test]
    fn chunk_tamper_swap_and_store_binding() {
        let k = key();
        let sid = [1u8; 16];
        let a = seal_chunk(&k, &sid, &[2u8; 16], 1, b"data-a");
        assert_eq!(
            open_chunk(&k, &sid, &[2u8; 16], 1, 6, &a).unwrap(),
            b"data-a"
        );
        // swapped under another id
        assert!(open_chunk(&k, &sid, &[3u8; 16], 1, 6, &a).is_err());
        // another store
        assert!(open_chunk(&k, &[9u8; 16], &[2u8; 16], 1, 6, &a).is_err());
        // other generation
        assert!(open_chunk(&k, &sid, &[2u8; 16], 2, 6, &a).is_err());
        for i in 0..a.len() {
            let mut t = a.clone();
            t[i] ^= 0x80;
            assert!(
                open_chunk(&k, &sid, &[2u8; 16], 1, 6, &t).is_err(),
                "flip {i}"
            );
        }
        assert!(open_chunk(&k, &sid, &[2u8; 16], 1, 6, &a[..a.len() - 1]).is_err());
    }

    #[test]
    fn journal_chain() {
        let k = key();
        let sid = [1u8; 16];
        let body = JournalBody {
            next_ino: 5,
            upserts: vec![(2, sample_record())],
            deletes: vec![3],
        };
        let (r1, t1) = seal_journal(&k, &sid, 1, &[0; 16], &body);
        let (r2, _t2) = seal_journal(&k, &sid, 2, &t1, &body);
        let (b, t) = open_journal(&k, &sid, 1, &[0; 16], &r1).unwrap();
        assert_eq!(b, body);
        assert_eq!(t, t1);
        open_journal(&k, &sid, 2, &t1, &r2).unwrap();
        // reorder: record 2 presented as 1, or chained after the wrong tag
        assert!(open_journal(&k, &sid, 1, &[0; 16], &r2).is_err());
        assert!(open_journal(&k, &sid, 2, &[0; 16], &r2).is_err());
        let mut r2b = r2.clone();
        r2b[6..14].copy_from_slice(&1u64.to_le_bytes());
        assert!(open_journal(&k, &sid, 1, &[0; 16], &r2b).is_err());
    }

    #[test]
    fn checkpoint_frames() {
        let k = key();
        let sid = [1u8; 16];
        let mut inodes = Vec::new();
        for i in 0..30000u64 {
            let mut r = sample_record();
            r.data = RecordData::InlineFile(vec![i as u8; 100]);
            inodes.push((i, r));
        }
        let body = CheckpointBody {
            next_ino: 40000,
            inodes,
            history: vec![(5, [3u8; TAG_LEN]), (6, [4u8; TAG_LEN])],
        };
        let (c, tag) = seal_checkpoint(&k, &sid, 7, &body);
        assert!(c.len() > 2 * CHECKPOINT_FRAME, "several frames");
        assert_eq!(open_checkpoint(&k, &sid, 7, &c).unwrap(), (body, tag));
        assert!(open_checkpoint(&k, &sid, 8, &c).is_err());
        // truncation at a frame boundary: drop the last frame
        let first_len = u32::from_le_bytes(c[14..18].try_into().unwrap()) as usize;
        let cut = 14 + 4 + first_len;
        assert!(open_checkpoint(&k, &sid, 7, &c[..cut]).is_err());
        assert!(open_checkpoint(&k, &sid, 7, &c[..c.len() - 3]).is_err());
    }

    #[test]
    fn header_roundtrip_and_mac() {
        let mk = Key32::from_bytes([5u8; 32]);
        let w = WrappedKey {
            key_id: "k".into(),
            key_version: 1,
            sealed: vec![1, 2, 3],
        };
        let mut body = HeaderBody {
            store_id: [4; 16],
            created: 9,
            chunk_size: 65536,
            inline_max: 4096,
            vmk: w.clone(),
            vck: w.clone(),
            content_gen: 1,
            rekey: None,
            data_id: [4; 16],
        };
        let h = encode_header(&body, &mk);
        assert_eq!(&h[..10], b"SEALFSV\0\x04\x00");
        assert_eq!(decode_header(&h).unwrap(), body);
        assert!(verify_header(&h, &mk));
        let mut t = h.clone();
        let n = t.len();
        t[n - 40] ^= 1;
        assert!(!verify_header(&t, &mk));
        let mut v = h.clone();
        v[8] = 5;
        assert!(matches!(
            decode_header(&v),
            Err(FormatError::Version { found: 5, .. })
        ));
        assert!(decode_header(&h[..h.len() - 1]).is_err());
        // during a re-key
        body.rekey = Some(RekeyState {
            old_vck: w,
            old_gen: 1,
        });
        body.content_gen = 2;
        let h2 = encode_header(&body, &mk);
        assert_eq!(decode_header(&h2).unwrap(), body);
    }

    #[test]
    fn version_1_and_2_headers_are_read() {
        // Version 1: the body without the re-key state and data id;
        // version 2: without the data id (16 trailing bytes).
        let mk = Key32::from_bytes([5u8; 32]);
        let w = WrappedKey {
            key_id: "k".into(),
            key_version: 1,
            sealed: vec![1, 2, 3],
        };
        let body = HeaderBody {
            store_id: [4; 16],
            created: 9,
            chunk_size: 65536,
            inline_max: 4096,
            vmk: w.clone(),
            vck: w,
            content_gen: 1,
            rekey: None,
            data_id: [4; 16],
        };
        let v3 = encode_header(&body, &mk);
        assert_eq!(header_version(&v3), FORMAT_VERSION);
        let len = u32::from_le_bytes(v3[10..14].try_into().unwrap()) as usize;
        assert_eq!(&v3[14 + len - 16..14 + len], &[4u8; 16]);
        assert_eq!(v3[14 + len - 17], 0, "rekey: None");
        for (version, cut) in [(1u16, 17), (2, 16)] {
            let old_body = &v3[14..14 + len - cut];
            let mut old = b"SEALFSV\0".to_vec();
            old.extend_from_slice(&version.to_le_bytes());
            old.extend_from_slice(&(old_body.len() as u32).to_le_bytes());
            old.extend_from_slice(old_body);
            let mac = crypto::hmac(&mk, &old);
            old.extend_from_slice(&mac);
            assert_eq!(header_version(&old), version);
            assert_eq!(decode_header(&old).unwrap(), body, "version {version}");
            assert!(verify_header(&old, &mk));
        }
    }

    #[test]
    fn snapshot_manifests() {
        let k = key();
        let sid = [1u8; 16];
        let body = SnapshotBody {
            name: "nightly".into(),
            created: 5,
            seq: 9,
            next_ino: 3,
            inodes: vec![(1, sample_record()), (2, sample_record())],
        };
        let obj = seal_snapshot(&k, &sid, 77, &body);
        assert_eq!(&obj[..4], SNAPSHOT_MAGIC);
        assert_eq!(open_snapshot(&k, &sid, 77, &obj).unwrap(), body);
        // renamed, moved to another store, truncated or modified: refused
        assert!(open_snapshot(&k, &sid, 78, &obj).is_err());
        assert!(open_snapshot(&k, &[2u8; 16], 77, &obj).is_err());
        assert!(open_snapshot(&k, &sid, 77, &obj[..obj.len() - 1]).is_err());
        let mut bad = obj.clone();
        bad[30] ^= 1;
        assert!(open_snapshot(&k, &sid, 77, &bad).is_err());
        // a checkpoint is not a snapshot manifest
        let (c, _) = seal_checkpoint(
            &k,
            &sid,
            77,
            &CheckpointBody {
                next_ino: 3,
                inodes: body.inodes.clone(),
                history: Vec::new(),
            },
        );
        assert!(open_snapshot(&k, &sid, 77, &c).is_err());
        assert_eq!(snapshot_name(0x4d), "snapshot-000000000000004d");
    }

    /// Journal records of one padding class have one size whatever the
    /// exact length of what they hold; padding that is not zeros, or as
    /// long as a whole pad, is refused.
    #[test]
    fn journal_records_are_padded() {
        let k = key();
        let sid = [1u8; 16];
        let prev = [0u8; TAG_LEN];
        let rec = |n: usize| {
            let mut r = sample_record();
            r.data = RecordData::InlineFile(vec![7u8; n]);
            JournalBody {
                next_ino: 9,
                upserts: vec![(2, r)],
                deletes: vec![],
            }
        };
        let sizes: std::collections::BTreeSet<usize> = (100..140)
            .map(|n| seal_journal(&k, &sid, 1, &prev, &rec(n)).0.len())
            .collect();
        assert_eq!(sizes.len(), 1, "{sizes:?}");
        let (obj, tag) = seal_journal(&k, &sid, 1, &prev, &rec(10));
        assert_eq!(
            open_journal(&k, &sid, 1, &prev, &obj).unwrap(),
            (rec(10), tag)
        );
        // version-1 records (format 3) are still read
        let plain = postcard::to_stdvec(&rec(10)).unwrap();
        let sealed = k.seal(&journal_ad(&sid, 1, &prev), &plain);
        let mut v1 = JOURNAL_MAGIC.to_vec();
        v1.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
        v1.extend_from_slice(&1u64.to_le_bytes());
        v1.extend_from_slice(&sealed);
        assert_eq!(open_journal(&k, &sid, 1, &prev, &v1).unwrap().0, rec(10));
        // non-zero or over-long padding
        for tail in [vec![1u8], vec![0u8; META_PAD]] {
            let mut p = postcard::to_stdvec(&rec(10)).unwrap();
            p.extend_from_slice(&tail);
            let sealed = k.seal(&journal_ad(&sid, 1, &prev), &p);
            let mut o = JOURNAL_MAGIC.to_vec();
            o.extend_from_slice(&META_OBJECT_VERSION.to_le_bytes());
            o.extend_from_slice(&1u64.to_le_bytes());
            o.extend_from_slice(&sealed);
            assert!(open_journal(&k, &sid, 1, &prev, &o).is_err());
        }
    }

    #[test]
    fn names() {
        assert_eq!(journal_name(10), "journal-000000000000000a");
        assert_eq!(parse_seq("journal-000000000000000a", "journal"), Some(10));
        assert_eq!(parse_seq("checkpoint-000000000000000a", "journal"), None);
        assert_eq!(parse_seq("journal-xx", "journal"), None);
    }
}
