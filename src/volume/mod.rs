//! The volume layer: an encrypted POSIX-ish inode tree over an object store.
//!
//! It knows nothing about FUSE. Inodes live in memory while the volume is
//! open; changes are persisted as sealed journal records (one per commit)
//! and periodic sealed checkpoints. File content is cut into fixed-size
//! chunks, each an immutable encrypted object; small files are kept inline
//! in the metadata, sealed with the content key.
//!
//! Crash rule: chunk objects are written (and synced) first, then the
//! journal record that refers to them, and only then are replaced objects
//! deleted.

mod acl;
pub mod clone;
pub mod format;
pub mod fsck;
mod open;
mod ops_atime;
pub mod snapshot;
mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use lru::LruCache;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::crypto::{self, AeadKey, Key32, TAG_LEN};
use crate::kms::{self, Keystore, KmsError};
use crate::store::{self, Kind, LocalDirStore, ObjectStore};
use format::*;
pub use format::{FileKind, Timespec};
pub(crate) use open::*;
pub use open::{default_state_dir, ACCEPT_ROLLBACK};
pub use ops_atime::AtimeMode;
pub use snapshot::{
    is_virtual, GcReport, SnapshotError, SnapshotInfo, SNAPDIR_INO, SNAPDIR_NAME, XATTR_GC,
    XATTR_SNAPSHOT,
};
use state::{FileData, Inode, InodeData, State};

/// Name of the header object in a store directory.
pub const HEADER_FILE: &str = "sealfs.store";
/// Name of the lock file in a store directory.
pub const LOCK_FILE: &str = "lock";
/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// Files up to this size are kept inline in (content-key-sealed) metadata.
pub const DEFAULT_INLINE_MAX: u32 = 4096;
/// Longest file name.
pub const NAME_MAX: usize = 255;
/// Largest xattr value.
pub const XATTR_SIZE_MAX: usize = 64 * 1024;
/// How often a writer renews its lease in the store.
const LEASE_RENEW: Duration = Duration::from_secs(10);
/// A checkpoint is written after this many journal records.
const CHECKPOINT_RECORDS: u64 = 512;
/// ... or after this many journal bytes.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// An error from a file-system operation, as an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsError(pub i32);

impl FsError {
    pub const NOENT: FsError = FsError(libc::ENOENT);
    pub const EXIST: FsError = FsError(libc::EEXIST);
    pub const NOTDIR: FsError = FsError(libc::ENOTDIR);
    pub const ISDIR: FsError = FsError(libc::EISDIR);
    pub const NOTEMPTY: FsError = FsError(libc::ENOTEMPTY);
    pub const INVAL: FsError = FsError(libc::EINVAL);
    pub const NAMETOOLONG: FsError = FsError(libc::ENAMETOOLONG);
    pub const NODATA: FsError = FsError(libc::ENODATA);
    pub const RANGE: FsError = FsError(libc::ERANGE);
    pub const IO: FsError = FsError(libc::EIO);
    pub const ROFS: FsError = FsError(libc::EROFS);
    pub const PERM: FsError = FsError(libc::EPERM);
    pub const NOTSUP: FsError = FsError(libc::EOPNOTSUPP);
    /// File content while the volume's content key is revoked or destroyed.
    pub const ACCES: FsError = FsError(libc::EACCES);
    pub const NXIO: FsError = FsError(libc::ENXIO);
    pub const FBIG: FsError = FsError(libc::EFBIG);
    pub const TOOBIG: FsError = FsError(libc::E2BIG);
    pub const NOSPC: FsError = FsError(libc::ENOSPC);
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) => FsError::NOSPC,
            Some(libc::EDQUOT) => FsError(libc::EDQUOT),
            Some(_) => FsError::IO,
            // (errors re-made with a message keep their kind, not the errno)
            None => match e.kind() {
                io::ErrorKind::StorageFull => FsError::NOSPC,
                io::ErrorKind::QuotaExceeded => FsError(libc::EDQUOT),
                _ => FsError::IO,
            },
        }
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for FsError {}

/// Result of a file-system operation.
pub type FsResult<T> = Result<T, FsError>;

/// Why a store could not be created or opened. Every message says what
/// happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a sealfs store (no {HEADER_FILE}); create one with `sealfs create`")]
    NotAStore(PathBuf),
    #[error("{0} already exists and is not empty; choose a new path for the store")]
    NotEmpty(PathBuf),
    #[error("store {path} is in use{holder}; unmount it first (`sealfs umount MOUNTPOINT`) or wait for the other command to finish")]
    InUse { path: PathBuf, holder: String },
    /// A lease from another machine (needs `--force-unlock`).
    #[error("{0}")]
    Lease(String),
    #[error("store {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("store {path}: the header failed authentication: it was modified or belongs to another keystore; refusing to open")]
    HeaderTampered { path: PathBuf },
    #[error("store {path}: metadata is damaged: {why}; refusing to mount (restore the store from a backup)")]
    Metadata { path: PathBuf, why: String },
    #[error("store {path}: rollback detected: the store is at commit {found} but this machine has seen commit {seen}; someone replaced it with an older copy. If that was you (a restore from a backup), mount once with --accept-rollback")]
    Rollback {
        path: PathBuf,
        found: u64,
        seen: u64,
        state_file: PathBuf,
    },
    #[error("store {path}: its history differs from what this machine saw: commit {seq} is not the commit {seq} seen before; someone replaced the store with another copy. If that was you, mount once with --accept-rollback")]
    Diverged { path: PathBuf, seq: u64 },
    #[error("{}: the record of the last commit seen is damaged ({why}), so rollback cannot be checked; if nobody tampered with it, mount once with --accept-rollback to record the store as it is", state_file.display())]
    BadSeenState { state_file: PathBuf, why: String },
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("invalid chunk size {0}: use a power of two from 4096 to 16777216")]
    BadChunkSize(u32),
    #[error("store {}: there is no snapshot named {name:?}; see `sealfs snapshot list {}`", path.display(), path.display())]
    UnknownSnapshot { path: PathBuf, name: String },
    #[error("store {}: {why}", path.display())]
    Refused { path: PathBuf, why: String },
}

/// Options for [`Volume::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub chunk_size: u32,
    pub inline_max: u32,
    /// Key id or alias of the master key for file content.
    pub kms_key: String,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            inline_max: DEFAULT_INLINE_MAX,
            kms_key: kms::DEFAULT_CONTENT_KEY_ALIAS.to_string(),
        }
    }
}

/// Options for [`Volume::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions2 {
    pub read_only: bool,
    /// Bytes of decrypted chunks kept in the LRU cache.
    pub cache_bytes: usize,
    /// Dirty (not yet encrypted) chunk data kept in memory before it is
    /// written out ahead of the next commit.
    pub dirty_bytes: usize,
    /// Directory for local state (last seen commit per volume): `None`
    /// means [`default_state_dir`] (an error when there is none).
    pub state_dir: Option<PathBuf>,
    /// Open this snapshot (read-only) instead of the live state.
    pub snapshot: Option<String>,
    /// Accept a store whose history differs from the local record of the
    /// last commit seen (`--accept-rollback`), and record it as it is.
    pub accept_rollback: bool,
}

impl Default for OpenOptions2 {
    fn default() -> Self {
        OpenOptions2 {
            read_only: false,
            cache_bytes: 256 << 20,
            dirty_bytes: 512 << 20,
            state_dir: None,
            snapshot: None,
            accept_rollback: ACCEPT_ROLLBACK.load(Ordering::Relaxed),
        }
    }
}

/// Attributes of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte blocks actually stored.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
}

/// A time to set with [`Volume::setattr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// Attribute changes for [`Volume::setattr`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timespec>,
}

/// File-system statistics.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// Summary for `sealfs info`.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub store_id: String,
    pub created: u64,
    pub chunk_size: u32,
    pub inline_max: u32,
    pub format_version: u16,
    pub metadata_key: (String, u32),
    pub content_key: (String, u32),
    /// Why file content cannot be decrypted now (key state), if it cannot.
    pub content_unavailable: Option<String>,
    pub content_gen: u32,
    pub chunk_objects: u64,
    pub chunk_bytes: u64,
    pub meta_objects: u64,
    pub meta_bytes: u64,
    /// Number of snapshot manifests in the store.
    pub snapshots: u64,
    /// The origin's volume id, for a clone that shares its chunk objects
    /// (None: the data id is the store's own).
    pub shares_data_of: Option<String>,
}

/// Chunks loaded ahead of a read-modify-write, by index.
type Pinned = std::collections::HashMap<u64, Arc<Vec<u8>>>;

/// One chunk being encrypted and written outside the state lock.
/// See [`Volume::sync_chunks`].
#[derive(Default)]
struct Unsynced {
    objs: Vec<(String, Vec<u8>)>,
    bytes: usize,
    /// A sync failed since these were written: write them again first.
    lost: bool,
    /// More than [`UNSYNCED_MAX`] was written since the last good sync:
    /// `objs` is incomplete.
    overflowed: bool,
}

/// Chunk bytes written since the last good sync that are kept, sealed, in
/// memory, to be written again if the next sync fails.
const UNSYNCED_MAX: usize = 16 << 20;

struct FlushJob {
    ino: u64,
    idx: u64,
    token: u64,
    data: Arc<Vec<u8>>,
    id: [u8; 16],
    epoch: u64,
    result: io::Result<()>,
}

/// Called by a commit with the state it writes and its sequence number.
type Capture<'a> = dyn FnMut(&State, u64) + 'a;

/// rename(2) flags.
pub const RENAME_NOREPLACE: u32 = 1;
/// rename(2) flags.
pub const RENAME_EXCHANGE: u32 = 2;
/// renameat2 flag: leave a whiteout (character device 0:0) at the old
/// name (overlayfs upper directories use it).
pub const RENAME_WHITEOUT: u32 = 4;

/// An open volume.
pub struct Volume {
    root: PathBuf,
    store: Box<dyn ObjectStore>,
    hdr: HeaderBody,
    meta_key: AeadKey,
    /// The content keys; None while revoked (key disabled, scheduled for
    /// deletion, material deleted) or destroyed.
    content_key: Mutex<Option<ContentKeys>>,
    /// Held (read) by every content operation; revocation takes it (write)
    /// so that no content operation is half-done when the key goes.
    /// The value: why content is unavailable (None: it is available).
    content_gate: RwLock<Option<String>>,
    state: Mutex<State>,
    /// Signalled whenever in-flight chunk flushes finish.
    flush_cv: Condvar,
    commit_lock: Mutex<()>,
    cache: Mutex<LruCache<[u8; 16], Arc<Vec<u8>>>>,
    lock: Box<dyn store::WriterLock>,
    /// The writer lease was lost (taken over): nothing more is written.
    lease_lost: AtomicBool,
    /// Chunk objects written since the last good sync (see
    /// [`Volume::sync_chunks`]).
    unsynced: Mutex<Unsynced>,
    read_only: bool,
    dirty_limit: usize,
    state_file: Option<PathBuf>,
    /// Writes `state_file` off the commit path (see [`SeenWriter`]).
    seen: Option<SeenWriter>,
    closed: AtomicBool,
    stop_bg: Arc<AtomicBool>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Snapshots of the store (see `snapshot.rs`).
    snaps: RwLock<snapshot::Snaps>,
    /// Opened as a snapshot (`--snapshot`): read-only, no `.snapshots`.
    snapshot_view: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("root", &self.root).finish()
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn volume_id_hex(id: &[u8; 16]) -> String {
    hex::encode(id)
}

fn derive_keys(vmk: &Key32, vck: &Key32) -> (AeadKey, Key32, AeadKey) {
    (
        AeadKey::new(&vmk.derive(LABEL_META)),
        vmk.derive(LABEL_HEADER_MAC),
        AeadKey::new(&vck.derive(LABEL_CONTENT)),
    )
}

/// The content keys of an open volume: the current generation, and during
/// a re-key the previous one.
#[derive(Clone)]
struct ContentKeys {
    cur: (u32, Arc<AeadKey>),
    old: Option<(u32, Arc<AeadKey>)>,
}

impl ContentKeys {
    fn new(hdr: &HeaderBody, keys: &[(u32, Key32)]) -> Option<ContentKeys> {
        let mk = |k: &Key32| Arc::new(AeadKey::new(&k.derive(LABEL_CONTENT)));
        let cur = keys.iter().find(|(g, _)| *g == hdr.content_gen)?;
        let old = hdr.rekey.as_ref().and_then(|r| {
            keys.iter()
                .find(|(g, _)| *g == r.old_gen)
                .map(|(g, k)| (*g, mk(k)))
        });
        Some(ContentKeys {
            cur: (cur.0, mk(&cur.1)),
            old,
        })
    }

    fn for_gen(&self, gen: u32) -> Option<&Arc<AeadKey>> {
        if self.cur.0 == gen {
            Some(&self.cur.1)
        } else {
            self.old.as_ref().filter(|(g, _)| *g == gen).map(|(_, k)| k)
        }
    }

    /// Current key first.
    fn all(&self) -> Vec<&AeadKey> {
        let mut v: Vec<&AeadKey> = vec![&self.cur.1];
        if let Some((_, k)) = &self.old {
            v.push(k);
        }
        v
    }
}

/// Unwrap every content key the header names: (generation, key).
fn unwrap_content_keys(
    ks: &Keystore,
    hdr: &HeaderBody,
    vck: Key32,
) -> Result<Vec<(u32, Key32)>, KmsError> {
    let mut keys = vec![(hdr.content_gen, vck)];
    if let Some(r) = &hdr.rekey {
        let ctx = kms::volume_context(&volume_id_hex(&hdr.store_id), "content");
        keys.push((r.old_gen, ks.unwrap(&r.old_vck, &ctx)?));
    }
    Ok(keys)
}

/// A master key id and version.
pub type KeyRef = (String, u32);

/// What unwrapping a volume's content key gave.
type ContentKeyResult = Result<Key32, KmsError>;

impl Volume {
    /// `sealfs rekey`, step 2, on the volume opened after
    /// [`Volume::rekey_begin`]: re-encrypt every inline file and every chunk
    /// still under the previous key, committing every 256 chunks, and end
    /// with a checkpoint so that no live record needs the previous key.
    /// Killed at any point, it loses nothing and resumes where it stopped.
    /// `progress(done, total)` is called as it goes.
    pub fn rekey_content(&self, progress: &mut dyn FnMut(u64, u64)) -> FsResult<()> {
        self.check_writable()?;
        let keys = self.content_key.lock().clone().ok_or(FsError::ACCES)?;
        if keys.old.is_none() {
            return Ok(());
        }
        let sid = self.hdr.data_id;
        let todo: Vec<(u64, u64, ChunkRef)> = {
            let mut st = self.state.lock();
            let mut v = Vec::new();
            let mut inline = Vec::new();
            for (&ino, inode) in &st.inodes {
                if let InodeData::File(fd) = &inode.data {
                    if fd.inline.is_some() {
                        inline.push(ino);
                    }
                    v.extend(fd.chunks.iter().map(|(&i, r)| (ino, i, *r)));
                }
            }
            // Inline content is re-sealed under the current key by the
            // next commit of these inodes.
            st.dirty.extend(inline);
            v
        };
        let total = todo.len() as u64;
        self.commit(false)?;
        progress(0, total);
        let mut since_commit = 0;
        for (n, (ino, idx, r)) in todo.into_iter().enumerate() {
            let data = self
                .store
                .get(Kind::Chunk, &r.name(), store::MAX_OBJECT)
                .map_err(|e| {
                    log::error!(
                        "re-key: chunk {} of {} is unreadable: {e}",
                        r.name(),
                        self.path_of(ino)
                    );
                    FsError::IO
                })?;
            let gen = chunk_gen(&data).unwrap_or(0);
            if gen == keys.cur.0 {
                // Done already (an interrupted re-key): the generation in
                // the object's header is not trusted until the chunk
                // opens under the current key (it is in the AD), or a
                // chunk still under the old key could be passed off as
                // done and be lost when the old key is dropped.
                open_chunk(&keys.cur.1, &sid, &r.id, gen, r.len as usize, &data).map_err(|e| {
                    log::error!(
                        "re-key: chunk {} of {} claims the new key but does not open under it: {e}",
                        r.name(),
                        self.path_of(ino)
                    );
                    FsError::IO
                })?;
            } else {
                let key = keys.for_gen(gen).ok_or_else(|| {
                    log::error!(
                        "re-key: chunk {} of {} has unknown key generation {gen}",
                        r.name(),
                        self.path_of(ino)
                    );
                    FsError::IO
                })?;
                let plain =
                    open_chunk(key, &sid, &r.id, gen, r.len as usize, &data).map_err(|e| {
                        log::error!("re-key: chunk {} of {}: {e}", r.name(), self.path_of(ino));
                        FsError::IO
                    })?;
                let id: [u8; 16] = crypto::random_bytes();
                let obj = seal_chunk(&keys.cur.1, &sid, &id, keys.cur.0, &plain);
                self.put_chunk(&hex::encode(id), obj).map_err(|e| {
                    log::error!("re-key: writing a chunk failed: {e}");
                    FsError::from(e)
                })?;
                let mut st = self.state.lock();
                let epoch = st.seq + 1;
                let mut swapped = false;
                if let Some(Inode {
                    data: InodeData::File(fd),
                    ..
                }) = st.inodes.get_mut(&ino)
                {
                    if let Some(c) = fd.chunks.get_mut(&idx).filter(|c| c.id == r.id) {
                        *c = ChunkRef {
                            id,
                            epoch,
                            len: r.len,
                        };
                        swapped = true;
                    }
                }
                if swapped {
                    st.pending_free.push(r.id);
                    st.dirty.insert(ino);
                    since_commit += 1;
                } else {
                    // changed meanwhile (cannot happen offline): drop ours
                    st.pending_free.push(id);
                }
                drop(st);
                if since_commit >= 256 {
                    self.commit(false)?;
                    since_commit = 0;
                }
            }
            progress(n as u64 + 1, total);
        }
        self.commit(true)
    }

    /// Store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Volume id (hex).
    pub fn id(&self) -> String {
        volume_id_hex(&self.hdr.store_id)
    }

    /// Chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.hdr.chunk_size
    }

    /// Whether the volume was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Last committed sequence number.
    pub fn committed_seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// The master key (id, version) that wraps the content key.
    pub fn content_key_id(&self) -> (String, u32) {
        (self.hdr.vck.key_id.clone(), self.hdr.vck.key_version)
    }

    /// Proceed with a content operation (holding the returned guard), or
    /// EACCES while the content key is revoked or destroyed.
    fn content_guard(&self) -> FsResult<parking_lot::RwLockReadGuard<'_, Option<String>>> {
        // Fair: a waiting revocation blocks new operations (content
        // operations never take this twice on one thread).
        let g = self.content_gate.read();
        if g.is_some() {
            return Err(FsError::ACCES);
        }
        Ok(g)
    }

    /// Why file content is unavailable (None: it is available).
    pub fn content_unavailable(&self) -> Option<String> {
        self.content_gate.read_recursive().clone()
    }

    /// The wrapped content keys, (generation, wrapped key) with the current
    /// one first, and the encryption context they are bound to (for a
    /// daemon that watches its key's state).
    pub fn wrapped_content_keys(&self) -> (Vec<(u32, kms::WrappedKey)>, kms::EncryptionContext) {
        let mut v = vec![(self.hdr.content_gen, self.hdr.vck.clone())];
        if let Some(r) = &self.hdr.rekey {
            v.push((r.old_gen, r.old_vck.clone()));
        }
        (v, kms::volume_context(&self.id(), "content"))
    }

    /// Revoke access to file content (the master key was disabled, scheduled
    /// for deletion, lost its material or was destroyed): content
    /// operations fail with EACCES from now on, data written before is
    /// committed while the key is still here, inline content is sealed
    /// again, and the content key and decrypted chunks are dropped from
    /// memory. Metadata stays available.
    pub fn revoke_content(&self, why: &str) {
        {
            // Waits for content operations in progress; new ones fail.
            let mut g = self.content_gate.write();
            let first = g.is_none();
            *g = Some(why.to_string());
            if !first {
                return;
            }
        }
        log::warn!("{}: file content revoked: {why}", self.root.display());
        if !self.read_only {
            if let Err(e) = self.commit(false) {
                log::error!(
                    "{}: committing before revocation failed ({e}); unwritten data stays in memory until the key is back",
                    self.root.display()
                );
            }
        }
        let mut st = self.state.lock();
        if let Some(keys) = self.content_key.lock().take() {
            let key = keys.cur.1;
            let sid = self.hdr.data_id;
            for (ino, inode) in st.inodes.iter_mut() {
                if let InodeData::File(fd) = &mut inode.data {
                    if let Some(mut v) = fd.inline.take() {
                        fd.sealed_inline = Some(seal_inline(&key, &sid, *ino, &v));
                        zeroize::Zeroize::zeroize(&mut v);
                    }
                }
            }
        }
        drop(st);
        self.cache.lock().clear();
    }

    /// Give file content back after a revocation, with the content keys
    /// unwrapped again: (generation, key) for each of
    /// [`Volume::wrapped_content_keys`].
    pub fn restore_content(&self, keys: &[(u32, Key32)]) -> Result<(), String> {
        let keys = ContentKeys::new(&self.hdr, keys)
            .ok_or_else(|| "the current content key is missing".to_string())?;
        let key = keys.cur.1.clone();
        let mut g = self.content_gate.write();
        if g.is_none() {
            return Ok(());
        }
        let mut st = self.state.lock();
        let sid = self.hdr.data_id;
        let mut opened = Vec::new();
        for (ino, inode) in st.inodes.iter() {
            if let InodeData::File(FileData {
                sealed_inline: Some(sealed),
                ..
            }) = &inode.data
            {
                let v = open_inline(&key, &sid, *ino, sealed)
                    .map_err(|e| format!("inode {ino}: {e}"))?;
                opened.push((*ino, v));
            }
        }
        for (ino, v) in opened {
            if let Some(Inode {
                data: InodeData::File(fd),
                ..
            }) = st.inodes.get_mut(&ino)
            {
                fd.inline = Some(v);
                fd.sealed_inline = None;
            }
        }
        *self.content_key.lock() = Some(keys);
        *g = None;
        drop(st);
        log::warn!("{}: file content available again", self.root.display());
        Ok(())
    }

    /// Inode numbers of all regular files (to drop the kernel's cached
    /// pages of each after a revocation).
    pub fn file_inodes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = {
            let st = self.state.lock();
            st.inodes
                .iter()
                .filter(|(_, i)| i.kind == FileKind::File)
                .map(|(&n, _)| n)
                .collect()
        };
        v.extend(self.snapshot_file_inodes());
        v
    }

    /// Bytes read and written through the volume since it was opened.
    pub fn io_counters(&self) -> (u64, u64) {
        (
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed),
        )
    }

    /// Start a thread that commits every `interval` while there are changes.
    pub fn start_background_commits(self: &Arc<Self>, interval: Duration) {
        let weak: Weak<Volume> = Arc::downgrade(self);
        let stop = self.stop_bg.clone();
        std::thread::Builder::new()
            .name("sealfs-commit".into())
            .spawn(move || {
                let step = Duration::from_millis(100);
                let mut waited = Duration::ZERO;
                let mut since_renew = Duration::ZERO;
                loop {
                    std::thread::sleep(step);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    since_renew += step;
                    if let Some(v) = weak.upgrade() {
                        v.drop_uncommitted();
                    }
                    if since_renew >= LEASE_RENEW {
                        since_renew = Duration::ZERO;
                        let Some(v) = weak.upgrade() else { return };
                        v.renew_lease();
                    }
                    waited += step;
                    if waited < interval {
                        continue;
                    }
                    waited = Duration::ZERO;
                    let Some(v) = weak.upgrade() else { return };
                    if let Err(e) = v.commit(false) {
                        log::error!("background commit failed: {e}");
                    }
                }
            })
            .expect("spawn commit thread");
    }

    /// Delete the chunk objects of removed files that no commit references
    /// (see `State::uncommitted_free`). Only when no commit is in flight:
    /// one may be writing a record that references them.
    pub fn drop_uncommitted(&self) {
        let Some(_c) = self.commit_lock.try_lock() else {
            return;
        };
        let ids: Vec<[u8; 16]> = {
            let mut st = self.state.lock();
            if st.uncommitted_free.is_empty() {
                return;
            }
            let seq = st.seq;
            let all = std::mem::take(&mut st.uncommitted_free);
            let (now, committed): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, e)| *e > seq);
            st.pending_free
                .extend(committed.into_iter().map(|(id, _)| id));
            now.into_iter().map(|(id, _)| id).collect()
        };
        for id in ids {
            let _ = self.store.delete(Kind::Chunk, &hex::encode(id));
        }
    }

    /// Write a chunk object (non-durable; see [`Volume::sync_chunks`]).
    fn put_chunk(&self, name: &str, obj: Vec<u8>) -> io::Result<()> {
        self.store.put(Kind::Chunk, name, &obj, false)?;
        let mut u = self.unsynced.lock();
        if u.bytes + obj.len() > UNSYNCED_MAX {
            // too much to keep: a failing sync before the next good one
            // cannot be recovered from (see sync_chunks)
            u.overflowed = true;
            u.objs = Vec::new();
            u.bytes = 0;
        } else if !u.overflowed {
            u.bytes += obj.len();
            u.objs.push((name.to_string(), obj));
        }
        Ok(())
    }

    /// Make every chunk object written so far durable. A file system that
    /// reports a write-back error may already have dropped data it could
    /// not write (Linux marks such pages clean): after a failed sync, the
    /// objects written since the last good one are written again before
    /// the next sync, so that no commit acknowledges a chunk the store
    /// lost.
    ///
    /// At most [`UNSYNCED_MAX`] bytes are kept for this; when more was
    /// written between two syncs and the second fails, nothing can be
    /// trusted to be in the store: every later commit fails with EIO until
    /// the volume is mounted again (it then opens at the last good
    /// commit), as databases do after a failed fsync.
    fn sync_chunks(&self) -> io::Result<()> {
        let (objs, lost, overflowed) = {
            let mut u = self.unsynced.lock();
            u.bytes = 0;
            (std::mem::take(&mut u.objs), u.lost, u.overflowed)
        };
        if lost && overflowed {
            return Err(io::Error::other(
                "an earlier write-back error lost chunks that cannot be written again; unmount and mount the volume again (it opens at its last good commit)",
            ));
        }
        let give_back = |objs: Vec<(String, Vec<u8>)>| {
            let mut u = self.unsynced.lock();
            u.lost = true;
            u.bytes += objs.iter().map(|(_, o)| o.len()).sum::<usize>();
            let newer = std::mem::replace(&mut u.objs, objs);
            u.objs.extend(newer);
        };
        if lost {
            for (n, o) in &objs {
                if let Err(e) = self.store.put(Kind::Chunk, n, o, false) {
                    give_back(objs);
                    return Err(e);
                }
            }
        }
        match self.store.sync() {
            Ok(()) => {
                let mut u = self.unsynced.lock();
                u.lost = false;
                u.overflowed = false;
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "{}: the store's file system reported a write error ({e}); the chunks written since the last good sync will be written again",
                    self.root.display()
                );
                give_back(objs);
                Err(e)
            }
        }
    }

    /// Renew the writer lease; when it was lost, stop writing (the volume
    /// turns read-only) instead of forking the store's history.
    pub fn renew_lease(&self) {
        if self.read_only || self.lease_lost.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.lock.renew() {
            if self.lock.lost() {
                self.lease_lost.store(true, Ordering::Relaxed);
                log::error!(
                    "{}: {e}; this mount no longer writes to the store (it is read-only from now on; changes not yet committed are lost). Unmount it",
                    self.root.display()
                );
            } else {
                log::warn!("{}: cannot renew the lease: {e}", self.root.display());
            }
        }
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.read_only || self.lease_lost.load(Ordering::Relaxed) {
            Err(FsError::ROFS)
        } else {
            Ok(())
        }
    }

    // ----- commit -----------------------------------------------------

    /// Commit all changes: write dirty chunks, sync them, then append one
    /// sealed journal record (or a checkpoint when one is due, or when
    /// `checkpoint` is set). Returns once the commit is durable.
    pub fn commit(&self, checkpoint: bool) -> FsResult<()> {
        if self.read_only {
            return Ok(());
        }
        if self.lease_lost.load(Ordering::Relaxed) {
            return Err(FsError::ROFS);
        }
        let r = {
            let _c = self.commit_lock.lock();
            self.commit_locked(checkpoint, None)
        };
        // The local record of the commit is durable before the commit is
        // reported done: a crash right after an fsync must still show a
        // store whose tail was then cut as a rollback. (It is written
        // outside the commit lock, so concurrent commits overlap it.)
        self.flush_seen();
        r
    }

    /// [`Volume::commit`] with the commit lock held. `capture(state, seq)`
    /// is called with the state lock held at the instant the state equals
    /// the commit being written (for snapshots); if the commit then fails,
    /// the error is returned.
    fn commit_locked(
        &self,
        checkpoint: bool,
        mut capture: Option<&mut Capture<'_>>,
    ) -> FsResult<()> {
        let mut st = self.state.lock();
        let due = checkpoint
            || st.records_since_ckpt >= CHECKPOINT_RECORDS
            || st.journal_bytes_since_ckpt >= CHECKPOINT_BYTES.max(st.ckpt_bytes);
        // (pending frees need a commit too: objects of a file unlinked while
        // open are only released at its last close)
        if st.dirty.is_empty()
            && st.deleted.is_empty()
            && st.pending_free.is_empty()
            && !(checkpoint && st.records_since_ckpt > 0)
        {
            if let Some(c) = capture.as_mut() {
                let seq = st.seq;
                c(&st, seq);
            }
            return Ok(());
        }
        // 1. Write every dirty chunk: encrypt outside the lock (in parallel),
        // wait for flushes other threads started, then write whatever was
        // dirtied meanwhile under the lock so the record sees a still state.
        st.commit_waiting = true;
        let inos: Vec<u64> = st.dirty.iter().copied().collect();
        let mut jobs = Vec::new();
        for ino in &inos {
            jobs.extend(self.start_flush(&mut st, *ino, None));
        }
        let mut st = self.run_flush_jobs(st, jobs);
        while st.inflight > 0 {
            self.flush_cv.wait(&mut st);
        }
        st.commit_waiting = false;
        let dirty: Vec<u64> = st.dirty.iter().copied().collect();
        for ino in &dirty {
            self.flush_inode_chunks(&mut st, *ino)?;
        }
        let seq = st.seq + 1;
        let prev = st.last_tag;
        let sid = self.hdr.store_id;
        let did = self.hdr.data_id;
        let ckeys = self.content_key.lock().clone();
        let ckey = ckeys.as_ref().map(|k| k.cur.1.clone());
        let (obj, name, is_ckpt) = if due {
            let inodes = st
                .inodes
                .iter()
                .filter(|(_, i)| i.persistent())
                .map(|(&n, i)| (n, i.to_record(n, ckey.as_deref(), &did)))
                .collect();
            let body = CheckpointBody {
                next_ino: st.next_ino,
                inodes,
                history: st.history.iter().copied().collect(),
            };
            let (obj, _) = seal_checkpoint(&self.meta_key, &sid, seq, &body);
            (obj, checkpoint_name(seq), true)
        } else {
            let mut upserts = Vec::new();
            let mut deletes: Vec<u64> = st.deleted.iter().copied().collect();
            for ino in &dirty {
                match st.inodes.get(ino) {
                    Some(i) if i.persistent() => {
                        upserts.push((*ino, i.to_record(*ino, ckey.as_deref(), &did)))
                    }
                    _ => deletes.push(*ino),
                }
            }
            deletes.sort_unstable();
            deletes.dedup();
            let body = JournalBody {
                next_ino: st.next_ino,
                upserts,
                deletes,
            };
            let (obj, _) = seal_journal(&self.meta_key, &sid, seq, &prev, &body);
            (obj, journal_name(seq), false)
        };
        if let Some(c) = capture.as_mut() {
            c(&st, seq);
        }
        let saved_dirty = std::mem::take(&mut st.dirty);
        let saved_deleted = std::mem::take(&mut st.deleted);
        let mut frees = std::mem::take(&mut st.pending_free);
        // (chunks of files removed before this capture are in no record
        // this one follows, nor in this one: freed after it)
        frees.extend(
            std::mem::take(&mut st.uncommitted_free)
                .into_iter()
                .map(|(id, _)| id),
        );
        drop(st);

        // 2. Make chunks durable, then the record.
        let res = self
            .sync_chunks()
            .and_then(|_| self.store.put(Kind::Meta, &name, &obj, true));
        let mut st = self.state.lock();
        if let Err(e) = res {
            log::error!("commit {seq} of {} failed: {e}", self.root.display());
            st.dirty.extend(saved_dirty);
            st.deleted.extend(saved_deleted);
            let mut f = frees;
            f.append(&mut st.pending_free);
            st.pending_free = f;
            let _ = self.store.delete(Kind::Meta, &name);
            return Err(e.into());
        }
        st.seq = seq;
        st.last_tag = if is_ckpt {
            // the chain continues from the checkpoint's last frame
            crypto::tag_of(last_frame(&obj))
        } else {
            crypto::tag_of(&obj)
        };
        let old_ckpt = st.ckpt_seq;
        if is_ckpt {
            st.ckpt_seq = seq;
            st.records_since_ckpt = 0;
            st.journal_bytes_since_ckpt = 0;
            st.ckpt_bytes = obj.len() as u64;
        } else {
            st.records_since_ckpt += 1;
            st.journal_bytes_since_ckpt += obj.len() as u64;
        }
        let tag = st.last_tag;
        // removed chunks this commit's record may reference are now
        // committed: they are freed after the next commit, as usual
        let (still, now_committed): (Vec<_>, Vec<_>) = std::mem::take(&mut st.uncommitted_free)
            .into_iter()
            .partition(|(_, e)| *e > seq);
        st.uncommitted_free = still;
        st.pending_free
            .extend(now_committed.into_iter().map(|(id, _)| id));
        st.history.push_back((seq, tag));
        while st.history.len() > format::HISTORY_MAX {
            st.history.pop_front();
        }
        drop(st);
        self.record_seq(seq, &tag);
        // 3. Free what the committed state no longer references, unless a
        // snapshot still holds it (copy-on-write).
        for id in self.unheld(frees) {
            let _ = self.store.delete(Kind::Chunk, &hex::encode(id));
        }
        if is_ckpt {
            let _ = self.store.delete(Kind::Meta, &checkpoint_name(old_ckpt));
            for s in old_ckpt + 1..seq {
                let _ = self.store.delete(Kind::Meta, &journal_name(s));
            }
        }
        Ok(())
    }

    /// Commit everything, write a checkpoint and stop background work.
    /// Called on unmount; safe to call twice.
    pub fn close(&self) -> FsResult<()> {
        self.stop_bg.store(true, Ordering::Relaxed);
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Drop inodes that were unlinked while open: nothing can use them now.
        {
            let mut st = self.state.lock();
            let orphans: Vec<u64> = st
                .inodes
                .iter()
                .filter(|(_, i)| !i.persistent())
                .map(|(&n, _)| n)
                .collect();
            for ino in orphans {
                self.remove_inode(&mut st, ino);
            }
        }
        let r = self.commit(true);
        self.flush_seen();
        r
    }

    // ----- chunk I/O --------------------------------------------------

    fn load_chunk(&self, r: &ChunkRef) -> FsResult<Arc<Vec<u8>>> {
        if let Some(c) = self.cache.lock().get(&r.id) {
            return Ok(c.clone());
        }
        let data = self
            .store
            .get(Kind::Chunk, &r.name(), store::MAX_OBJECT)
            .map_err(|e| {
                log::error!("chunk {} is unreadable: {e}", r.name());
                FsError::IO
            })?;
        let keys = self.content_key.lock().clone().ok_or(FsError::ACCES)?;
        // During a re-key a chunk may still be under the previous key.
        let gen = chunk_gen(&data).unwrap_or(keys.cur.0);
        let key = keys.for_gen(gen).unwrap_or(&keys.cur.1);
        let plain =
            open_chunk(key, &self.hdr.data_id, &r.id, gen, r.len as usize, &data).map_err(|e| {
                log::error!("chunk {}: {e}", r.name());
                FsError::IO
            })?;
        let a = Arc::new(plain);
        self.cache.lock().put(r.id, a.clone());
        Ok(a)
    }

    /// Encrypt and write every dirty chunk buffer of `ino`.
    fn flush_inode_chunks(&self, st: &mut State, ino: u64) -> FsResult<()> {
        let epoch = st.seq + 1;
        let Some(inode) = st.inodes.get_mut(&ino) else {
            return Ok(());
        };
        let InodeData::File(fd) = &mut inode.data else {
            return Ok(());
        };
        if fd.dirty.is_empty() {
            return Ok(());
        }
        let dirty = std::mem::take(&mut fd.dirty);
        let mut freed = Vec::new();
        let mut flushed = 0usize;
        let mut result = Ok(());
        let mut remaining = BTreeMap::new();
        for (idx, buf) in dirty {
            if result.is_err() {
                remaining.insert(idx, buf);
                continue;
            }
            let Some(keys) = self.content_key.lock().clone() else {
                result = Err(FsError::ACCES);
                remaining.insert(idx, buf);
                continue;
            };
            let id: [u8; 16] = crypto::random_bytes();
            let obj = seal_chunk(&keys.cur.1, &self.hdr.data_id, &id, keys.cur.0, &buf);
            if let Err(e) = self.put_chunk(&hex::encode(id), obj) {
                log::error!("writing a chunk to {} failed: {e}", self.root.display());
                result = Err(FsError::from(e));
                remaining.insert(idx, buf);
                continue;
            }
            flushed += buf.len();
            let r = ChunkRef {
                id,
                epoch,
                len: buf.len() as u32,
            };
            if let Some(old) = fd.chunks.insert(idx, r) {
                freed.push(old.id);
            }
            self.cache.lock().put(id, Arc::new(buf));
        }
        fd.dirty = remaining;
        st.dirty_bytes = st.dirty_bytes.saturating_sub(flushed);
        st.pending_free.extend(freed);
        result
    }

    /// Keep dirty memory bounded: write out every dirty chunk (outside the
    /// lock) once more than the dirty limit is held in memory.
    fn maybe_flush<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if st.dirty_bytes <= self.dirty_limit || st.commit_waiting {
            return st;
        }
        let inos: Vec<u64> = st.dirty.iter().copied().collect();
        let mut jobs = Vec::new();
        for ino in inos {
            jobs.extend(self.start_flush(&mut st, ino, None));
        }
        self.run_flush_jobs(st, jobs)
    }

    /// Move dirty chunks of `ino` (with `only`, just those of the listed
    /// indices that are complete) into
    /// the in-flight set and return the jobs that will write them.
    fn start_flush(&self, st: &mut State, ino: u64, only: Option<&[u64]>) -> Vec<FlushJob> {
        let cs = self.hdr.chunk_size as usize;
        let epoch = st.seq + 1;
        let mut token = st.next_token;
        let mut jobs = Vec::new();
        let mut bytes = 0;
        if let Some(Inode {
            data: InodeData::File(fd),
            ..
        }) = st.inodes.get_mut(&ino)
        {
            let idxs: Vec<u64> = fd
                .dirty
                .iter()
                .filter(|(k, b)| only.is_none_or(|o| o.contains(k) && b.len() == cs))
                .map(|(k, _)| *k)
                .collect();
            for idx in idxs {
                let buf = Arc::new(fd.dirty.remove(&idx).expect("listed above"));
                bytes += buf.len();
                fd.flushing.insert(idx, (token, buf.clone()));
                jobs.push(FlushJob {
                    ino,
                    idx,
                    token,
                    data: buf,
                    id: crypto::random_bytes(),
                    epoch,
                    result: Ok(()),
                });
                token += 1;
            }
        }
        st.next_token = token;
        st.inflight += jobs.len();
        st.dirty_bytes = st.dirty_bytes.saturating_sub(bytes);
        jobs
    }

    /// Release the lock, encrypt and store the jobs' chunks (on up to four
    /// threads), re-take the lock and install the results.
    fn run_flush_jobs<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        mut jobs: Vec<FlushJob>,
    ) -> MutexGuard<'a, State> {
        if jobs.is_empty() {
            return st;
        }
        drop(st);
        let keys = self.content_key.lock().clone();
        let work = |jobs: &mut [FlushJob]| {
            for j in jobs {
                let Some(keys) = keys.as_ref() else {
                    j.result = Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the content key is not available",
                    ));
                    continue;
                };
                let obj = seal_chunk(&keys.cur.1, &self.hdr.data_id, &j.id, keys.cur.0, &j.data);
                j.result = self.put_chunk(&hex::encode(j.id), obj);
            }
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4);
        if jobs.len() >= 4 && threads > 1 {
            let per = jobs.len().div_ceil(threads);
            std::thread::scope(|sc| {
                for part in jobs.chunks_mut(per) {
                    sc.spawn(|| work(part));
                }
            });
        } else {
            work(&mut jobs);
        }
        let mut st = self.state.lock();
        let mut cache = Vec::new();
        let mut flush_error = None;
        for j in jobs {
            st.inflight -= 1;
            let freed;
            let mut restore = None;
            match st.inodes.get_mut(&j.ino) {
                Some(Inode {
                    data: InodeData::File(fd),
                    ..
                }) if fd.flushing.get(&j.idx).map(|(t, _)| *t) == Some(j.token) => {
                    fd.flushing.remove(&j.idx);
                    match &j.result {
                        Ok(()) => {
                            let r = ChunkRef {
                                id: j.id,
                                epoch: j.epoch,
                                len: j.data.len() as u32,
                            };
                            freed = fd.chunks.insert(j.idx, r).map(|o| o.id);
                            cache.push((j.id, j.data.clone()));
                        }
                        Err(e) => {
                            flush_error = Some(FsError::from(
                                e.raw_os_error()
                                    .map(io::Error::from_raw_os_error)
                                    .unwrap_or_else(|| io::Error::from(e.kind())),
                            ));
                            // keep the data dirty; the next commit retries
                            if let std::collections::btree_map::Entry::Vacant(e) =
                                fd.dirty.entry(j.idx)
                            {
                                restore = Some(j.data.len());
                                e.insert(j.data.as_ref().clone());
                            }
                            freed = Some(j.id);
                        }
                    }
                }
                // re-dirtied, truncated or removed meanwhile: the new object
                // is not referenced by anything
                _ => freed = Some(j.id),
            }
            if let Err(e) = &j.result {
                log::error!("writing a chunk to {} failed: {e}", self.root.display());
            }
            if let Some(n) = restore {
                st.dirty_bytes += n;
                st.dirty.insert(j.ino);
            }
            st.pending_free.extend(freed);
        }
        st.flush_error = flush_error;
        if !cache.is_empty() {
            let mut c = self.cache.lock();
            for (id, d) in cache {
                c.put(id, d);
            }
        }
        self.flush_cv.notify_all();
        st
    }

    // ----- lookups ----------------------------------------------------

    fn attr_of(&self, ino: u64, i: &Inode) -> Attr {
        i.attr(ino)
    }

    /// Find the path of an inode (for log messages); O(n).
    pub fn path_of(&self, ino: u64) -> String {
        let st = self.state.lock();
        st.path_of(ino).unwrap_or_else(|| format!("<inode {ino}>"))
    }

    /// Look up `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        // "." of any inode: the kernel asks so to open a file handle
        // (open_by_handle_at, NFS) whose inode it no longer caches.
        if name == b"." {
            return self.getattr(parent);
        }
        if let Some(r) = self.virt_lookup(parent, name) {
            return r;
        }
        let st = self.state.lock();
        let ino = st.lookup(parent, name)?;
        let i = st.get(ino)?;
        Ok(self.attr_of(ino, i))
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if is_virtual(ino) {
            return self.virt_getattr(ino);
        }
        let st = self.state.lock();
        Ok(self.attr_of(ino, st.get(ino)?))
    }

    /// Change attributes (chmod, chown, truncate, utimensat).
    pub fn setattr(&self, ino: u64, s: &SetAttr) -> FsResult<Attr> {
        self.check_changeable(ino, None)?;
        self.check_writable()?;
        let _content = match s.size {
            Some(_) => Some(self.content_guard()?),
            None => None,
        };
        let mut st = self.state.lock();
        if !st.inodes.contains_key(&ino) {
            // The kernel writing back times of a file that was removed
            // meanwhile (on syncfs): nothing to keep.
            if let Some(a) = st.gone.get(&ino) {
                return Ok(*a);
            }
        }
        let now = Timespec::now();
        if let Some(size) = s.size {
            self.truncate_locked(&mut st, ino, size)?;
        }
        let i = st.get_mut(ino)?;
        if let Some(m) = s.mode {
            i.perm = (m & 0o7777) as u16;
            acl::chmod(i);
        }
        if let Some(u) = s.uid {
            i.uid = u;
        }
        if let Some(g) = s.gid {
            i.gid = g;
        }
        if (s.uid.is_some() || s.gid.is_some()) && s.mode.is_none() && i.kind != FileKind::Dir {
            // chown of a non-directory clears set-user-ID, and set-group-ID
            // only together with group execute: without it the bit marks
            // mandatory locking and stays (as the VFS does for local file
            // systems). When the kernel already worked out the new mode it
            // sends it along, and that mode is taken as it is.
            i.perm &= !0o4000;
            if i.perm & 0o010 != 0 {
                i.perm &= !0o2000;
            }
        }
        match s.atime {
            Some(SetTime::Now) => i.atime = now,
            Some(SetTime::At(t)) => i.atime = t,
            None => {}
        }
        match s.mtime {
            Some(SetTime::Now) => i.mtime = now,
            Some(SetTime::At(t)) => i.mtime = t,
            None => {}
        }
        i.ctime = s.ctime.unwrap_or(now);
        let a = self.attr_of(ino, i);
        st.dirty.insert(ino);
        Ok(a)
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        if is_virtual(ino) {
            return self.virt_readlink(ino);
        }
        let st = self.state.lock();
        match &st.get(ino)?.data {
            InodeData::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::INVAL),
        }
    }

    /// Entries of a directory, including `.` and `..`.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, FileKind, Vec<u8>)>> {
        if is_virtual(ino) {
            return self.virt_readdir(ino);
        }
        let st = self.state.lock();
        let i = st.get(ino)?;
        let InodeData::Dir { parent, entries } = &i.data else {
            return Err(FsError::NOTDIR);
        };
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((ino, FileKind::Dir, b".".to_vec()));
        out.push((*parent, FileKind::Dir, b"..".to_vec()));
        for (name, &child) in entries {
            let kind = st
                .inodes
                .get(&child)
                .map(|c| c.kind)
                .unwrap_or(FileKind::File);
            out.push((child, kind, name.clone()));
        }
        Ok(out)
    }

    // ----- namespace changes -------------------------------------------

    fn check_name(name: &[u8]) -> FsResult<()> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(FsError::INVAL);
        }
        if name.len() > NAME_MAX {
            return Err(FsError::NAMETOOLONG);
        }
        Ok(())
    }

    fn new_child(
        &self,
        parent: u64,
        name: &[u8],
        make: impl FnOnce(u64, &Inode, Timespec) -> Inode,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        Self::check_name(name)?;
        self.check_changeable(parent, Some(name))?;
        let mut st = self.state.lock();
        let now = Timespec::now();
        let p = st.get(parent)?;
        let InodeData::Dir { entries, .. } = &p.data else {
            return Err(FsError::NOTDIR);
        };
        if entries.contains_key(name) {
            return Err(FsError::EXIST);
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let child = make(ino, st.get(parent)?, now);
        let is_dir = child.kind == FileKind::Dir;
        let attr = self.attr_of(ino, &child);
        st.inodes.insert(ino, child);
        let p = st.get_mut(parent)?;
        if let InodeData::Dir { entries, .. } = &mut p.data {
            entries.insert(name.to_vec(), ino);
        }
        if is_dir {
            p.nlink += 1;
        }
        p.mtime = now;
        p.ctime = now;
        st.dirty.insert(parent);
        st.dirty.insert(ino);
        Ok(attr)
    }

    /// Create a regular file, FIFO, socket or device node (`perm` is
    /// final: no umask).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        self.mknod_umask(parent, name, kind, perm, 0, uid, gid, rdev)
    }

    /// mknod with the caller's umask, which applies unless the parent has a
    /// default ACL (then the new node inherits it, see [`acl::inherit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod_umask(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        umask: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            return Err(FsError::INVAL);
        }
        // A regular file has (empty) content: it needs the content key.
        let _content = match kind {
            FileKind::File => Some(self.content_guard()?),
            _ => None,
        };
        self.new_child(parent, name, |_ino, p, now| {
            let gid = if p.perm & 0o2000 != 0 { p.gid } else { gid };
            let mut i = Inode::new(kind, (perm & 0o7777) as u16, uid, gid, rdev, now);
            acl::inherit(p, &mut i, umask);
            i
        })
    }

    /// Create a directory (`perm` is final: no umask).
    pub fn mkdir(&self, parent: u64, name: &[u8], perm: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.mkdir_umask(parent, name, perm, 0, uid, gid)
    }

    /// mkdir with the caller's umask (see [`Volume::mknod_umask`]).
    pub fn mkdir_umask(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        if let Some(r) = self.virt_mkdir(parent, name) {
            return r;
        }
        self.new_child(parent, name, |_ino, p, now| {
            let sgid = p.perm & 0o2000 != 0;
            let gid = if sgid { p.gid } else { gid };
            let mut perm = (perm & 0o7777) as u16;
            if sgid {
                perm |= 0o2000;
            }
            let mut i = Inode::new_dir(parent, perm, uid, gid, now);
            acl::inherit(p, &mut i, umask);
            i
        })
    }

    /// Create a symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        if target.is_empty() || target.len() > 4095 {
            return Err(FsError::NAMETOOLONG);
        }
        self.new_child(parent, name, |_ino, p, now| {
            let gid = if p.perm & 0o2000 != 0 { p.gid } else { gid };
            let mut i = Inode::new(FileKind::Symlink, 0o777, uid, gid, 0, now);
            i.size = target.len() as u64;
            i.data = InodeData::Symlink(target.to_vec());
            i
        })
    }

    /// Add a hard link.
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        self.check_changeable(ino, None)?;
        self.check_changeable(newparent, Some(newname))?;
        self.check_writable()?;
        Self::check_name(newname)?;
        let mut st = self.state.lock();
        let now = Timespec::now();
        if st.get(ino)?.kind == FileKind::Dir {
            return Err(FsError::PERM);
        }
        if st.get(ino)?.nlink == 0 {
            return Err(FsError::NOENT);
        }
        let p = st.get_mut(newparent)?;
        let InodeData::Dir { entries, .. } = &mut p.data else {
            return Err(FsError::NOTDIR);
        };
        if entries.contains_key(newname) {
            return Err(FsError::EXIST);
        }
        entries.insert(newname.to_vec(), ino);
        p.mtime = now;
        p.ctime = now;
        let i = st.get_mut(ino)?;
        i.nlink += 1;
        i.ctime = now;
        let a = self.attr_of(ino, i);
        st.dirty.insert(ino);
        st.dirty.insert(newparent);
        Ok(a)
    }

    /// Drop one link to `ino`; remove it when no links and no opens remain.
    fn drop_link(&self, st: &mut State, ino: u64, now: Timespec) {
        let Some(i) = st.inodes.get_mut(&ino) else {
            return;
        };
        if i.kind == FileKind::Dir {
            i.nlink = 0;
        } else {
            i.nlink = i.nlink.saturating_sub(1);
        }
        i.ctime = now;
        let gone = i.nlink == 0;
        st.dirty.insert(ino);
        if gone {
            st.deleted.insert(ino);
            if st.open_count(ino) == 0 {
                self.remove_inode(st, ino);
            }
        }
    }

    fn remove_inode(&self, st: &mut State, ino: u64) {
        if let Some(i) = st.inodes.remove(&ino) {
            let mut a = self.attr_of(ino, &i);
            a.nlink = 0;
            st.gone.put(ino, a);
            if let InodeData::File(fd) = i.data {
                let dirty: usize = fd.dirty.values().map(|b| b.len()).sum();
                st.dirty_bytes = st.dirty_bytes.saturating_sub(dirty);
                let seq = st.seq;
                for c in fd.chunks.values() {
                    if c.epoch > seq {
                        st.uncommitted_free.push((c.id, c.epoch));
                    } else {
                        st.pending_free.push(c.id);
                    }
                }
            }
        }
        st.dirty.remove(&ino);
        st.deleted.insert(ino);
        st.opens.remove(&ino);
    }

    /// Remove a non-directory entry.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.check_changeable(parent, Some(name))?;
        self.check_writable()?;
        let mut st = self.state.lock();
        let now = Timespec::now();
        let ino = st.lookup(parent, name)?;
        if st.get(ino)?.kind == FileKind::Dir {
            return Err(FsError::ISDIR);
        }
        st.remove_entry(parent, name, now)?;
        self.drop_link(&mut st, ino, now);
        Ok(())
    }

    /// Remove an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        if let Some(r) = self.virt_rmdir(parent, name) {
            return r;
        }
        self.check_changeable(parent, Some(name))?;
        self.check_writable()?;
        if name == b"." {
            return Err(FsError::INVAL);
        }
        if name == b".." {
            return Err(FsError::NOTEMPTY);
        }
        let mut st = self.state.lock();
        let now = Timespec::now();
        let ino = st.lookup(parent, name)?;
        match &st.get(ino)?.data {
            InodeData::Dir { entries, .. } if !entries.is_empty() => return Err(FsError::NOTEMPTY),
            InodeData::Dir { .. } => {}
            _ => return Err(FsError::NOTDIR),
        }
        st.remove_entry(parent, name, now)?;
        st.get_mut(parent)?.nlink -= 1;
        self.drop_link(&mut st, ino, now);
        Ok(())
    }

    /// rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE (a whiteout
    /// left by RENAME_WHITEOUT belongs to root; see [`Volume::rename_as`]).
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.rename_as(parent, name, newparent, newname, flags, 0, 0)
    }

    /// renameat2(2) with RENAME_NOREPLACE, RENAME_EXCHANGE and
    /// RENAME_WHITEOUT; a whiteout belongs to `uid`:`gid` (the caller, as on
    /// ext4). The kernel checks CAP_MKNOD for RENAME_WHITEOUT.
    #[allow(clippy::too_many_arguments)]
    pub fn rename_as(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<()> {
        self.check_changeable(parent, Some(name))?;
        self.check_changeable(newparent, Some(newname))?;
        self.check_writable()?;
        Self::check_name(newname)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) != 0
            || flags & (RENAME_NOREPLACE | RENAME_EXCHANGE) == RENAME_NOREPLACE | RENAME_EXCHANGE
            || flags & (RENAME_WHITEOUT | RENAME_EXCHANGE) == RENAME_WHITEOUT | RENAME_EXCHANGE
        {
            return Err(FsError::INVAL);
        }
        let mut st = self.state.lock();
        let now = Timespec::now();
        let src = st.lookup(parent, name)?;
        st.get(newparent)?;
        if !matches!(st.get(newparent)?.data, InodeData::Dir { .. }) {
            return Err(FsError::NOTDIR);
        }
        let dst = st.lookup(newparent, newname).ok();
        let src_is_dir = st.get(src)?.kind == FileKind::Dir;

        if flags & RENAME_EXCHANGE != 0 {
            let Some(dst) = dst else {
                return Err(FsError::NOENT);
            };
            let dst_is_dir = st.get(dst)?.kind == FileKind::Dir;
            if src == dst {
                return Ok(());
            }
            if (src_is_dir && st.is_ancestor(src, newparent))
                || (dst_is_dir && st.is_ancestor(dst, parent))
            {
                return Err(FsError::INVAL);
            }
            st.set_entry(parent, name, dst);
            st.set_entry(newparent, newname, src);
            if parent != newparent {
                if src_is_dir {
                    st.set_parent(src, newparent);
                }
                if dst_is_dir {
                    st.set_parent(dst, parent);
                }
                if src_is_dir != dst_is_dir {
                    let (from, to) = if src_is_dir {
                        (parent, newparent)
                    } else {
                        (newparent, parent)
                    };
                    st.get_mut(from)?.nlink -= 1;
                    st.get_mut(to)?.nlink += 1;
                }
            }
            for n in [src, dst, parent, newparent] {
                if let Ok(i) = st.get_mut(n) {
                    i.ctime = now;
                }
                st.dirty.insert(n);
            }
            for n in [parent, newparent] {
                st.get_mut(n)?.mtime = now;
            }
            return Ok(());
        }

        if let Some(dst) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(FsError::EXIST);
            }
            if dst == src {
                return Ok(());
            }
            let dst_is_dir = st.get(dst)?.kind == FileKind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(FsError::NOTDIR),
                (false, true) => return Err(FsError::ISDIR),
                (true, true) => {
                    if let InodeData::Dir { entries, .. } = &st.get(dst)?.data {
                        if !entries.is_empty() {
                            return Err(FsError::NOTEMPTY);
                        }
                    }
                }
                _ => {}
            }
        }
        if src_is_dir && st.is_ancestor(src, newparent) {
            return Err(FsError::INVAL);
        }
        if let Some(dst) = dst {
            let dst_is_dir = st.get(dst)?.kind == FileKind::Dir;
            st.remove_entry(newparent, newname, now)?;
            if dst_is_dir {
                st.get_mut(newparent)?.nlink -= 1;
            }
            self.drop_link(&mut st, dst, now);
        }
        st.remove_entry(parent, name, now)?;
        st.set_entry(newparent, newname, src);
        if flags & RENAME_WHITEOUT != 0 {
            let wo = st.next_ino;
            st.next_ino += 1;
            st.inodes
                .insert(wo, Inode::new(FileKind::CharDev, 0, uid, gid, 0, now));
            st.set_entry(parent, name, wo);
            st.dirty.insert(wo);
        }
        if src_is_dir && parent != newparent {
            st.set_parent(src, newparent);
            st.get_mut(parent)?.nlink -= 1;
            st.get_mut(newparent)?.nlink += 1;
        }
        st.get_mut(src)?.ctime = now;
        for n in [parent, newparent] {
            let p = st.get_mut(n)?;
            p.mtime = now;
            p.ctime = now;
            st.dirty.insert(n);
        }
        st.dirty.insert(src);
        Ok(())
    }

    // ----- open files ---------------------------------------------------

    /// Note that `ino` was opened.
    pub fn open_file(&self, ino: u64) -> FsResult<()> {
        if is_virtual(ino) {
            return self.virt_getattr(ino).map(|_| ());
        }
        let mut st = self.state.lock();
        st.get(ino)?;
        *st.opens.entry(ino).or_insert(0) += 1;
        Ok(())
    }

    /// Note that one open of `ino` was closed; an unlinked inode goes away
    /// with its last close.
    pub fn release_file(&self, ino: u64) {
        if is_virtual(ino) {
            return;
        }
        let mut st = self.state.lock();
        let left = match st.opens.get_mut(&ino) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            st.opens.remove(&ino);
            if st.inodes.get(&ino).is_some_and(|i| i.nlink == 0) {
                self.remove_inode(&mut st, ino);
            }
        }
    }

    /// Read up to `size` bytes at `off`.
    pub fn read(&self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        if is_virtual(ino) {
            return self.virt_read(ino, off, size);
        }
        let _content = self.content_guard()?;
        for attempt in 0..3 {
            match self.read_once(ino, off, size) {
                Err(FsError::IO) if attempt < 2 => continue,
                Err(e) => {
                    if e == FsError::IO {
                        log::error!(
                            "read of {} in {} failed: its content is damaged or missing",
                            self.path_of(ino),
                            self.root.display()
                        );
                    }
                    return Err(e);
                }
                Ok(v) => {
                    self.bytes_read.fetch_add(v.len() as u64, Ordering::Relaxed);
                    return Ok(v);
                }
            }
        }
        Err(FsError::IO)
    }

    fn read_once(&self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        enum Part {
            Bytes(Vec<u8>),
            Chunk(ChunkRef, usize, usize),
            Zero(usize),
        }
        let cs = self.hdr.chunk_size as u64;
        let mut parts = Vec::new();
        {
            let st = self.state.lock();
            let i = st.get(ino)?;
            let InodeData::File(fd) = &i.data else {
                return Err(not_a_file(i.kind));
            };
            if off >= i.size || size == 0 {
                return Ok(Vec::new());
            }
            let end = (off + size as u64).min(i.size);
            if let Some(inl) = &fd.inline {
                let mut v = vec![0u8; (end - off) as usize];
                copy_window(&mut v, inl, off as usize);
                return Ok(v);
            }
            let mut pos = off;
            while pos < end {
                let idx = pos / cs;
                let cstart = idx * cs;
                let a = (pos - cstart) as usize;
                let b = ((end - cstart).min(cs)) as usize;
                let buffered: Option<&[u8]> = fd
                    .dirty
                    .get(&idx)
                    .map(|buf| buf.as_slice())
                    .or_else(|| fd.flushing.get(&idx).map(|(_, buf)| buf.as_slice()));
                if let Some(buf) = buffered {
                    let mut v = vec![0u8; b - a];
                    copy_window(&mut v, buf, a);
                    parts.push(Part::Bytes(v));
                } else if let Some(r) = fd.chunks.get(&idx) {
                    parts.push(Part::Chunk(*r, a, b));
                } else {
                    parts.push(Part::Zero(b - a));
                }
                pos = cstart + b as u64;
            }
        }
        // Decrypt the needed chunks, on two threads when there are several
        // that are not cached (large sequential reads).
        let refs: Vec<ChunkRef> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Chunk(r, _, _) => Some(*r),
                _ => None,
            })
            .collect();
        let loaded: Vec<FsResult<Arc<Vec<u8>>>> = if refs.len() >= 2 {
            // Object reads wait on the disk as much as on the CPU: up to
            // four loads at a time.
            let per = refs.len().div_ceil(4).max(1);
            std::thread::scope(|sc| {
                let handles: Vec<_> = refs
                    .chunks(per)
                    .map(|part| {
                        sc.spawn(move || {
                            part.iter().map(|r| self.load_chunk(r)).collect::<Vec<_>>()
                        })
                    })
                    .collect();
                let mut v = Vec::with_capacity(refs.len());
                for (h, part) in handles.into_iter().zip(refs.chunks(per)) {
                    v.extend(
                        h.join()
                            .unwrap_or_else(|_| vec![Err(FsError::IO); part.len()]),
                    );
                }
                v
            })
        } else {
            refs.iter().map(|r| self.load_chunk(r)).collect()
        };
        let mut loaded = loaded.into_iter();
        let mut out = Vec::with_capacity(size as usize);
        for p in parts {
            match p {
                Part::Bytes(v) => out.extend_from_slice(&v),
                Part::Zero(n) => out.resize(out.len() + n, 0),
                Part::Chunk(_r, a, b) => {
                    let c = loaded.next().unwrap_or(Err(FsError::IO))?;
                    let start = out.len();
                    out.resize(start + (b - a), 0);
                    copy_window(&mut out[start..], &c, a);
                }
            }
        }
        Ok(out)
    }

    /// Get a chunk's current plaintext for modification (dirty buffer,
    /// stored chunk or empty for a hole).
    fn chunk_for_update(&self, fd: &mut FileData, idx: u64, pinned: &Pinned) -> FsResult<Vec<u8>> {
        if let Some(b) = fd.dirty.remove(&idx) {
            return Ok(b);
        }
        if let Some((_, b)) = fd.flushing.remove(&idx) {
            return Ok(b.as_ref().clone());
        }
        if let Some(b) = pinned.get(&idx) {
            return Ok(b.as_ref().clone());
        }
        match fd.chunks.get(&idx) {
            Some(r) => Ok(self.load_chunk(r)?.as_ref().clone()),
            None => Ok(Vec::new()),
        }
    }

    /// Load the stored chunks among `idxs` that an operation on `ino` will
    /// read-modify-write, before it changes anything: a damaged chunk then
    /// fails the operation with EIO and leaves the inode untouched.
    fn preload(&self, st: &State, ino: u64, idxs: &[u64]) -> FsResult<Pinned> {
        let mut out = Pinned::new();
        if let Ok(Inode {
            data: InodeData::File(fd),
            ..
        }) = st.get(ino)
        {
            for &idx in idxs {
                if fd.dirty.contains_key(&idx) || fd.flushing.contains_key(&idx) {
                    continue;
                }
                if let Some(r) = fd.chunks.get(&idx) {
                    out.insert(idx, self.load_chunk(r)?);
                }
            }
        }
        Ok(out)
    }

    /// Write `data` at `off`; returns the bytes written.
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        self.check_changeable(ino, None)?;
        self.check_writable()?;
        let _content = self.content_guard()?;
        if data.is_empty() {
            return Ok(0);
        }
        let end = off.checked_add(data.len() as u64).ok_or(FsError::FBIG)?;
        if end > i64::MAX as u64 {
            return Err(FsError::FBIG);
        }
        let mut st = self.state.lock();
        if st.dirty_bytes >= self.dirty_limit.saturating_mul(2) && st.flush_error.is_some() {
            // The store refused the last chunk writes (full, or failing)
            // and written data piles up in memory: try once more, then
            // refuse instead of buffering without bound.
            drop(st);
            self.drop_uncommitted();
            st = self.maybe_flush(self.state.lock());
            if st.dirty_bytes >= self.dirty_limit.saturating_mul(2) {
                if let Some(e) = st.flush_error {
                    return Err(e);
                }
            }
        }
        let ended = self.write_locked(&mut st, ino, off, data)?;
        let now = Timespec::now();
        let i = st.get_mut(ino)?;
        i.mtime = now;
        i.ctime = now;
        // writing clears set-user-ID (like the kernel does for local files)
        if i.perm & 0o6000 != 0 && i.uid != 0 {
            i.perm &= !0o4000;
        }
        st.dirty.insert(ino);
        // Chunks this write completed up to their end (sequential writing)
        // are encrypted and written right away, outside the lock, so that
        // large writes proceed in parallel. Chunks touched by small random
        // writes stay dirty until the next commit.
        if !st.commit_waiting {
            let jobs = self.start_flush(&mut st, ino, Some(&ended));
            st = self.run_flush_jobs(st, jobs);
        }
        drop(self.maybe_flush(st));
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len())
    }

    /// Returns the indices of chunks whose end this write reached.
    fn write_locked(&self, st: &mut State, ino: u64, off: u64, data: &[u8]) -> FsResult<Vec<u64>> {
        let cs = self.hdr.chunk_size as u64;
        let inline_max = self.hdr.inline_max as u64;
        let end = off + data.len() as u64;
        let mut added = 0usize;
        let mut ended = Vec::new();
        let pinned = self.preload(st, ino, &[off / cs, (end - 1) / cs])?;
        {
            let i = st.get_mut(ino)?;
            let size = i.size;
            let InodeData::File(fd) = &mut i.data else {
                return Err(not_a_file(i.kind));
            };
            if let Some(inl) = &mut fd.inline {
                if end <= inline_max {
                    if (inl.len() as u64) < end {
                        inl.resize(end as usize, 0);
                    }
                    inl[off as usize..end as usize].copy_from_slice(data);
                    i.size = size.max(end);
                    return Ok(ended);
                }
                let v = fd.inline.take().expect("inline");
                if !v.is_empty() {
                    added += v.len();
                    fd.dirty.insert(0, v);
                }
            }
            let mut pos = off;
            while pos < end {
                let idx = pos / cs;
                let cstart = idx * cs;
                let a = (pos - cstart) as usize;
                let b = ((end - cstart).min(cs)) as usize;
                let mut buf = if a == 0 && b == cs as usize {
                    if let Some(old) = fd.dirty.remove(&idx) {
                        added = added.wrapping_sub(old.len());
                    }
                    fd.flushing.remove(&idx);
                    vec![0u8; b]
                } else {
                    let had = fd.dirty.get(&idx).map(|x| x.len());
                    let v = self.chunk_for_update(fd, idx, &pinned)?;
                    if let Some(h) = had {
                        added = added.wrapping_sub(h);
                    }
                    v
                };
                if buf.len() < b {
                    buf.resize(b, 0);
                }
                let src = (pos - off) as usize;
                buf[a..b].copy_from_slice(&data[src..src + (b - a)]);
                added = added.wrapping_add(buf.len());
                fd.dirty.insert(idx, buf);
                if b == cs as usize {
                    ended.push(idx);
                }
                pos = cstart + b as u64;
            }
            i.size = size.max(end);
        }
        st.dirty_bytes = st.dirty_bytes.wrapping_add(added);
        Ok(ended)
    }

    fn truncate_locked(&self, st: &mut State, ino: u64, new_size: u64) -> FsResult<()> {
        let cs = self.hdr.chunk_size as u64;
        let inline_max = self.hdr.inline_max as u64;
        if new_size > i64::MAX as u64 {
            return Err(FsError::FBIG);
        }
        let mut freed = Vec::new();
        let mut dirty_delta: isize = 0;
        let pinned = if new_size % cs != 0 {
            self.preload(st, ino, &[new_size / cs])?
        } else {
            Pinned::new()
        };
        {
            let i = st.get_mut(ino)?;
            let InodeData::File(fd) = &mut i.data else {
                return Err(not_a_file(i.kind));
            };
            if let Some(inl) = &mut fd.inline {
                if new_size <= inline_max {
                    inl.resize(new_size as usize, 0);
                } else {
                    let v = fd.inline.take().expect("inline");
                    if !v.is_empty() {
                        dirty_delta += v.len() as isize;
                        fd.dirty.insert(0, v);
                    }
                }
            } else if new_size < i.size {
                let first_gone = new_size.div_ceil(cs);
                for (_, b) in fd.dirty.split_off(&first_gone) {
                    dirty_delta -= b.len() as isize;
                }
                for (_, r) in fd.chunks.split_off(&first_gone) {
                    freed.push(r.id);
                }
                fd.flushing.split_off(&first_gone);
                let idx = new_size / cs;
                let keep = (new_size % cs) as usize;
                if keep > 0 {
                    if let Some(b) = fd.dirty.get_mut(&idx) {
                        if b.len() > keep {
                            dirty_delta -= (b.len() - keep) as isize;
                            b.truncate(keep);
                        }
                    } else if fd.flushing.get(&idx).is_some_and(|(_, b)| b.len() > keep)
                        || (!fd.flushing.contains_key(&idx)
                            && fd.chunks.get(&idx).is_some_and(|r| r.len as usize > keep))
                    {
                        let mut b = self.chunk_for_update(fd, idx, &pinned)?;
                        b.truncate(keep);
                        dirty_delta += b.len() as isize;
                        fd.dirty.insert(idx, b);
                    }
                }
                if new_size == 0 {
                    freed.extend(fd.chunks.values().map(|r| r.id));
                    fd.chunks.clear();
                    for b in fd.dirty.values() {
                        dirty_delta -= b.len() as isize;
                    }
                    fd.dirty.clear();
                    fd.flushing.clear();
                    fd.inline = Some(Vec::new());
                }
            }
            i.size = new_size;
            let now = Timespec::now();
            i.mtime = now;
            i.ctime = now;
        }
        st.dirty_bytes = (st.dirty_bytes as isize + dirty_delta).max(0) as usize;
        st.pending_free.extend(freed);
        st.dirty.insert(ino);
        Ok(())
    }

    /// fsync: commit everything (metadata and data) durably.
    pub fn fsync(&self, _ino: u64) -> FsResult<()> {
        if is_virtual(_ino) {
            return Ok(());
        }
        self.commit(false)
    }

    /// fallocate(2): mode 0 and KEEP_SIZE allocate (sealfs stores holes
    /// sparsely, so this only extends the size); PUNCH_HOLE and ZERO_RANGE
    /// are supported.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        self.check_changeable(ino, None)?;
        self.check_writable()?;
        let _content = self.content_guard()?;
        let end = off.checked_add(len).ok_or(FsError::FBIG)?;
        if len == 0 {
            return Err(FsError::INVAL);
        }
        if end > i64::MAX as u64 {
            return Err(FsError::FBIG);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
        {
            return Err(FsError::NOTSUP);
        }
        if punch && !keep {
            return Err(FsError::INVAL);
        }
        // Allocating modes must not promise space that is not there: the
        // part of the range that holds no data yet has to fit into the free
        // space of the store's file system (sealfs cannot reserve it there;
        // see README, Limitations).
        let free = if punch {
            None
        } else {
            let s =
                rustix::fs::statvfs(&self.root).map_err(|e| FsError::from(io::Error::from(e)))?;
            Some(s.f_bavail.saturating_mul(s.f_frsize))
        };
        let mut st = self.state.lock();
        let size = st.get(ino)?.size;
        if st.get(ino)?.kind != FileKind::File {
            return Err(FsError::NOTSUP);
        }
        if let Some(free) = free {
            let needed = self.unallocated_in(st.get(ino)?, off, end);
            if needed > free {
                return Err(FsError::NOSPC);
            }
        }
        if punch || zero {
            let zend = end.min(size);
            if off < zend {
                self.zero_range(&mut st, ino, off, zend)?;
            }
        }
        if !keep && end > size {
            self.truncate_locked(&mut st, ino, end)?;
        }
        let now = Timespec::now();
        let i = st.get_mut(ino)?;
        i.ctime = now;
        if punch || zero {
            i.mtime = now;
        }
        st.dirty.insert(ino);
        Ok(())
    }

    /// Bytes of [off, end) of a file that hold no data yet (holes and the
    /// part past the data of each chunk).
    fn unallocated_in(&self, i: &Inode, off: u64, end: u64) -> u64 {
        let InodeData::File(fd) = &i.data else {
            return 0;
        };
        let overlap = |a: u64, b: u64| b.min(end).saturating_sub(a.max(off));
        let have = if let Some(inl) = &fd.inline {
            overlap(0, inl.len() as u64)
        } else {
            let cs = self.hdr.chunk_size as u64;
            let first = off / cs;
            let last = (end - 1) / cs;
            let idxs: BTreeSet<u64> = fd
                .chunks
                .range(first..=last)
                .map(|(k, _)| *k)
                .chain(fd.dirty.range(first..=last).map(|(k, _)| *k))
                .chain(fd.flushing.range(first..=last).map(|(k, _)| *k))
                .collect();
            idxs.into_iter()
                .map(|idx| {
                    let l = fd.data_len(idx).unwrap_or(0).min(cs);
                    overlap(idx * cs, idx * cs + l)
                })
                .sum()
        };
        (end - off).saturating_sub(have)
    }

    fn zero_range(&self, st: &mut State, ino: u64, off: u64, end: u64) -> FsResult<()> {
        let cs = self.hdr.chunk_size as u64;
        let mut freed = Vec::new();
        let mut delta: isize = 0;
        let pinned = self.preload(st, ino, &[off / cs, (end - 1) / cs])?;
        {
            let i = st.get_mut(ino)?;
            let InodeData::File(fd) = &mut i.data else {
                return Err(FsError::INVAL);
            };
            if let Some(inl) = &mut fd.inline {
                let hi = (end as usize).min(inl.len());
                if (off as usize) < hi {
                    inl[off as usize..hi].fill(0);
                }
                return Ok(());
            }
            let mut pos = off;
            while pos < end {
                let idx = pos / cs;
                let cstart = idx * cs;
                let a = (pos - cstart) as usize;
                let b = ((end - cstart).min(cs)) as usize;
                if a == 0 && b == cs as usize {
                    if let Some(d) = fd.dirty.remove(&idx) {
                        delta -= d.len() as isize;
                    }
                    if let Some(r) = fd.chunks.remove(&idx) {
                        freed.push(r.id);
                    }
                    fd.flushing.remove(&idx);
                } else if fd.present(idx) {
                    let had = fd.dirty.get(&idx).map(|x| x.len() as isize).unwrap_or(0);
                    let mut buf = self.chunk_for_update(fd, idx, &pinned)?;
                    let hi = b.min(buf.len());
                    if a < hi {
                        buf[a..hi].fill(0);
                    }
                    delta += buf.len() as isize - had;
                    fd.dirty.insert(idx, buf);
                }
                pos = cstart + b as u64;
            }
        }
        st.dirty_bytes = (st.dirty_bytes as isize + delta).max(0) as usize;
        st.pending_free.extend(freed);
        Ok(())
    }

    /// lseek(2) with SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> FsResult<u64> {
        if is_virtual(ino) {
            let size = self.virt_getattr(ino)?.size;
            return match whence {
                _ if off >= size => Err(FsError::NXIO),
                libc::SEEK_DATA => Ok(off),
                libc::SEEK_HOLE => Ok(size),
                _ => Err(FsError::INVAL),
            };
        }
        let st = self.state.lock();
        let i = st.get(ino)?;
        let size = i.size;
        match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE => {}
            _ => return Err(FsError::INVAL),
        }
        if off >= size {
            return Err(FsError::NXIO);
        }
        let InodeData::File(fd) = &i.data else {
            return Ok(if whence == libc::SEEK_DATA { off } else { size });
        };
        if fd.inline.is_some() {
            return Ok(if whence == libc::SEEK_DATA { off } else { size });
        }
        let cs = self.hdr.chunk_size as u64;
        // Data of chunk idx: [idx * cs, idx * cs + data_len) within the size.
        let data_end = |idx: u64| -> Option<u64> {
            let l = fd.data_len(idx)?.min(cs);
            (l > 0).then(|| (idx * cs + l).min(size))
        };
        if whence == libc::SEEK_DATA {
            // the first chunk at or after off's with data beyond off
            let first = off / cs;
            let mut cands: BTreeSet<u64> = BTreeSet::new();
            let mut it_c = fd.chunks.range(first..).map(|(k, _)| *k);
            let mut it_d = fd.dirty.range(first..).map(|(k, _)| *k);
            let mut it_f = fd.flushing.range(first..).map(|(k, _)| *k);
            loop {
                // merge the three index streams in order, a few at a time
                for it in [
                    &mut it_c as &mut dyn Iterator<Item = u64>,
                    &mut it_d,
                    &mut it_f,
                ] {
                    if let Some(k) = it.next() {
                        cands.insert(k);
                    }
                }
                let Some(idx) = cands.pop_first() else {
                    return Err(FsError::NXIO);
                };
                if idx * cs >= size {
                    return Err(FsError::NXIO);
                }
                if let Some(end) = data_end(idx) {
                    let start = off.max(idx * cs);
                    if start < end {
                        return Ok(start);
                    }
                }
            }
        } else {
            let mut pos = off;
            loop {
                if pos >= size {
                    return Ok(size);
                }
                let idx = pos / cs;
                match data_end(idx) {
                    Some(end) if pos < end => {
                        pos = end;
                        if end < (idx + 1) * cs {
                            return Ok(pos.min(size));
                        }
                    }
                    _ => return Ok(pos),
                }
            }
        }
    }

    // ----- xattrs ---------------------------------------------------------

    /// setxattr(2) with XATTR_CREATE / XATTR_REPLACE.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if is_virtual(ino) {
            return self.virt_setxattr(ino, name);
        }
        self.check_writable()?;
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::RANGE);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TOOBIG);
        }
        // POSIX ACLs: validated and kept in line with the mode (acl.rs).
        if name.starts_with(b"system.posix_acl_") && !acl::is_acl_name(name) {
            return Err(FsError::NOTSUP);
        }
        let mut st = self.state.lock();
        let i = st.get_mut(ino)?;
        if acl::is_acl_name(name) {
            acl::set(i, name, value)?;
            i.ctime = Timespec::now();
            st.dirty.insert(ino);
            return Ok(());
        }
        let exists = i.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::EXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NODATA);
        }
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.ctime = Timespec::now();
        st.dirty.insert(ino);
        Ok(())
    }

    /// getxattr(2).
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if is_virtual(ino) {
            return self.virt_getxattr(ino, name);
        }
        let st = self.state.lock();
        st.get(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NODATA)
    }

    /// listxattr(2): NUL-terminated names.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        if is_virtual(ino) {
            return self.virt_listxattr(ino);
        }
        let st = self.state.lock();
        let mut out = Vec::new();
        for k in st.get(ino)?.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    /// removexattr(2).
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.check_changeable(ino, None)?;
        self.check_writable()?;
        let mut st = self.state.lock();
        let i = st.get_mut(ino)?;
        if i.xattrs.remove(name).is_none() {
            return Err(FsError::NODATA);
        }
        i.ctime = Timespec::now();
        st.dirty.insert(ino);
        Ok(())
    }

    /// statfs(2), based on the free space of the store's file system.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let s = rustix::fs::statvfs(&self.root).map_err(|e| FsError::from(io::Error::from(e)))?;
        let bsize = 4096u64;
        let scale = |n: u64| n.saturating_mul(s.f_frsize) / bsize;
        let files = self.state.lock().inodes.len() as u64;
        let blocks = scale(s.f_blocks);
        Ok(StatFs {
            blocks,
            bfree: scale(s.f_bfree),
            bavail: scale(s.f_bavail),
            files: files + s.f_ffree,
            ffree: s.f_ffree,
            bsize: bsize as u32,
            namelen: NAME_MAX as u32,
        })
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::SeqCst) {
            if let Err(e) = self.close() {
                log::error!("closing {} failed: {e}", self.root.display());
            }
        }
    }
}

/// The error for a content operation on something that is not a file.
fn not_a_file(kind: FileKind) -> FsError {
    if kind == FileKind::Dir {
        FsError::ISDIR
    } else {
        FsError::INVAL
    }
}

fn last_frame(ckpt: &[u8]) -> &[u8] {
    // walk the frames: 14-byte header, then len ‖ frame ...
    let mut pos = 14;
    let mut last = &ckpt[0..0];
    while pos + 4 <= ckpt.len() {
        let len = u32::from_le_bytes(ckpt[pos..pos + 4].try_into().expect("4")) as usize;
        pos += 4;
        if pos + len > ckpt.len() {
            break;
        }
        last = &ckpt[pos..pos + len];
        pos += len;
    }
    last
}

/// Fill `dst` from `src` starting at offset `a`; what `src` does not
/// have (past its end) stays as it is in `dst` (zeros: holes and short
/// chunks read as zeros).
pub(crate) fn copy_window(dst: &mut [u8], src: &[u8], a: usize) {
    if src.len() > a {
        let n = (src.len() - a).min(dst.len());
        dst[..n].copy_from_slice(&src[a..a + n]);
    }
}

/// Used by tests and `sealfs info`: the store id of a store without keys.
pub fn peek_store_id(root: &Path) -> Option<String> {
    let data = read_header_bytes(&LocalDirStore::open(root).ok()?).ok()?;
    decode_header(&data)
        .ok()
        .map(|h| volume_id_hex(&h.store_id))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Volume>();
}

#[cfg(test)]
mod decoder_props;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
