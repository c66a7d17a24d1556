//! Creating, opening and checking stores: the header, the writer lock, the
//! chain of metadata objects, and the local record of the last commit seen
//! (rollback and fork detection). The file-system operations on an open
//! volume are in `mod.rs`.

use super::*;

/// The default of [`OpenOptions2::accept_rollback`], set by the command
/// line (`--accept-rollback`).
pub static ACCEPT_ROLLBACK: AtomicBool = AtomicBool::new(false);

/// The local record of the last commit seen of a volume (a text file):
/// `sealfs-seen 1`, `seq N`, `tag HEX` on three lines.
pub(crate) fn encode_seen(seq: u64, tag: &[u8; TAG_LEN]) -> String {
    format!("sealfs-seen 1\nseq {seq}\ntag {}\n", hex::encode(tag))
}

/// Parse [`encode_seen`]'s text, or the bare sequence number earlier
/// versions wrote (no tag).
pub(crate) fn decode_seen(text: &str) -> Result<(u64, Option<[u8; TAG_LEN]>), String> {
    if text.len() > 1024 {
        return Err("it is too long".into());
    }
    let t = text.trim();
    if let Ok(seq) = t.parse::<u64>() {
        return Ok((seq, None));
    }
    let mut lines = t.lines();
    if lines.next() != Some("sealfs-seen 1") {
        return Err("it is not a record sealfs wrote".into());
    }
    let seq = lines
        .next()
        .and_then(|l| l.strip_prefix("seq "))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or("no sequence number")?;
    let tag = lines
        .next()
        .and_then(|l| l.strip_prefix("tag "))
        .and_then(|v| hex::decode(v).ok())
        .and_then(|v| <[u8; TAG_LEN]>::try_from(v.as_slice()).ok())
        .ok_or("no commit tag")?;
    if lines.next().is_some() {
        return Err("trailing lines".into());
    }
    Ok((seq, Some(tag)))
}

/// Check the chain read from a store (ending at commit `seq`, with the
/// tags from its checkpoint on) against the local record `sf` of the last
/// commit seen. A missing record is a volume never seen here.
pub(crate) fn check_seen(
    root: &Path,
    sf: &Path,
    tags: &[(u64, [u8; TAG_LEN])],
    seq: u64,
) -> Result<(), OpenError> {
    let text = match fs::read(sf) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(OpenError::BadSeenState {
                state_file: sf.to_path_buf(),
                why: e.to_string(),
            })
        }
    };
    let (seen, seen_tag) = std::str::from_utf8(&text)
        .map_err(|_| "it is not text".to_string())
        .and_then(decode_seen)
        .map_err(|why| OpenError::BadSeenState {
            state_file: sf.to_path_buf(),
            why,
        })?;
    if seen > seq {
        return Err(OpenError::Rollback {
            path: root.to_path_buf(),
            found: seq,
            seen,
            state_file: sf.to_path_buf(),
        });
    }
    // The commit seen must be the one the store has at that number (when
    // the store still holds it: older records are folded into the
    // checkpoint, whose own tag is compared when it is the one seen).
    if let (Some(want), Some((_, got))) = (seen_tag, tags.iter().find(|(s, _)| *s == seen)) {
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &got[..])) {
            return Err(OpenError::Diverged {
                path: root.to_path_buf(),
                seq: seen,
            });
        }
    }
    Ok(())
}

/// Where sealfs keeps per-machine state: `$SEALFS_STATE_DIR`, else
/// `/var/lib/sealfs` for root, else `$XDG_STATE_HOME/sealfs` or
/// `~/.local/state/sealfs`. Never a shared, world-writable place such as
/// `/tmp`: with none of these, an error says what to set.
pub fn default_state_dir() -> io::Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = nonempty("SEALFS_STATE_DIR") {
        return Ok(PathBuf::from(p));
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/sealfs"));
    }
    nonempty("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("sealfs"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no state directory for sealfs: set HOME, XDG_STATE_HOME or SEALFS_STATE_DIR",
            )
        })
}

/// The live volume's committed metadata as its chain of objects holds it:
/// the newest checkpoint `c`, then journal records `c+1, c+2, …`, each
/// authenticated and chained to the tag before it (docs/FORMAT.md, "Mount /
/// recovery algorithm"). Reading stops at the first fault; what was read
/// up to it is kept (fsck names the files of that state).
pub(crate) struct Chain {
    /// Sequence number of the checkpoint (0 when there is none).
    pub ckpt: u64,
    /// Sequence number of the last commit applied.
    pub seq: u64,
    /// Tag of the last object applied (the next record chains to it).
    pub tag: [u8; TAG_LEN],
    /// The tag after each object applied, from the checkpoint on, after
    /// the history the checkpoint carries: every commit known, oldest
    /// first.
    pub tags: Vec<(u64, [u8; TAG_LEN])>,
    pub next_ino: u64,
    pub records: BTreeMap<u64, InodeRecord>,
    /// Names of the metadata objects the chain reached (read or not).
    pub used: Vec<String>,
    pub fault: Option<ChainFault>,
}

/// Why reading the chain stopped early.
pub(crate) enum ChainFault {
    NoCheckpoint,
    /// Record `expect` is missing; `found` is the next one present.
    Missing {
        expect: u64,
        found: u64,
    },
    /// An object of the chain could not be read (`io`) or did not open.
    Bad {
        object: String,
        seq: u64,
        io: Option<io::Error>,
        why: String,
    },
}

pub(crate) fn read_chain(
    store: &dyn ObjectStore,
    names: &[String],
    meta_key: &AeadKey,
    store_id: &[u8; 16],
) -> Chain {
    let mut chain = Chain {
        ckpt: 0,
        seq: 0,
        tag: [0; TAG_LEN],
        tags: Vec::new(),
        next_ino: ROOT_INO + 1,
        records: BTreeMap::new(),
        used: Vec::new(),
        fault: None,
    };
    let seqs = |prefix: &str| -> BTreeSet<u64> {
        names.iter().filter_map(|n| parse_seq(n, prefix)).collect()
    };
    let Some(&c) = seqs("checkpoint").iter().next_back() else {
        chain.fault = Some(ChainFault::NoCheckpoint);
        return chain;
    };
    let bad = |object: String, seq: u64, io: Option<io::Error>, why: String| {
        Some(ChainFault::Bad {
            object,
            seq,
            io,
            why,
        })
    };
    let cname = checkpoint_name(c);
    chain.used.push(cname.clone());
    chain.ckpt = c;
    chain.seq = c;
    let opened = match store.get(Kind::Meta, &cname, store::MAX_OBJECT) {
        Ok(d) => open_checkpoint(meta_key, store_id, c, &d),
        Err(e) => {
            let why = e.to_string();
            chain.fault = bad(cname, c, Some(e), why);
            return chain;
        }
    };
    match opened {
        Ok((body, tag)) => {
            chain.tag = tag;
            chain.tags = body.history;
            chain.tags.push((c, tag));
            chain.next_ino = body.next_ino;
            chain.records = body.inodes.into_iter().collect();
        }
        Err(e) => {
            chain.fault = bad(cname, c, None, e.to_string());
            return chain;
        }
    }
    for (expect, j) in (c + 1..).zip(seqs("journal").range(c + 1..).copied()) {
        if j != expect {
            chain.fault = Some(ChainFault::Missing { expect, found: j });
            break;
        }
        let jname = journal_name(j);
        chain.used.push(jname.clone());
        let opened = match store.get(Kind::Meta, &jname, store::MAX_OBJECT) {
            Ok(d) => open_journal(meta_key, store_id, j, &chain.tag, &d),
            Err(e) => {
                let why = e.to_string();
                chain.fault = bad(jname, j, Some(e), why);
                break;
            }
        };
        match opened {
            Ok((body, t)) => {
                for (ino, rec) in body.upserts {
                    chain.records.insert(ino, rec);
                }
                for ino in body.deletes {
                    chain.records.remove(&ino);
                }
                chain.next_ino = chain.next_ino.max(body.next_ino);
                chain.tag = t;
                chain.tags.push((j, t));
                chain.seq = j;
            }
            Err(e) => {
                chain.fault = bad(jname, j, None, e.to_string());
                break;
            }
        }
    }
    chain
}

/// Open the store directory of a volume.
pub(crate) fn open_store(root: &Path) -> Result<LocalDirStore, OpenError> {
    LocalDirStore::open(root).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => OpenError::NotAStore(root.to_path_buf()),
        _ => io_at(root)(e),
    })
}

/// Take the store's single-writer lock for this process and write its
/// lease (see [`store::set_lock_context`] for what it says it is doing).
pub(crate) fn lock_store(store: &dyn ObjectStore) -> Result<Box<dyn store::WriterLock>, OpenError> {
    let lock = take_lock(store)?;
    lock.renew().map_err(io_at(Path::new(&store.location())))?;
    Ok(lock)
}

/// Take the lock without writing the lease yet (see [`store::WriterLock`]).
pub(crate) fn take_lock(store: &dyn ObjectStore) -> Result<Box<dyn store::WriterLock>, OpenError> {
    let (what, force) = store::lock_context();
    let me = store::Holder::this_process(&what);
    store.lock(&me, force).map_err(|e| match e {
        store::LockError::Held(holder) => OpenError::InUse {
            path: PathBuf::from(store.location()),
            holder,
        },
        store::LockError::Foreign(why) => OpenError::Lease(why),
        store::LockError::Io(e) => io_at(Path::new(&store.location()))(e),
    })
}

/// Read the header object of a store.
pub(crate) fn read_header_bytes(store: &dyn ObjectStore) -> Result<Vec<u8>, OpenError> {
    let root = PathBuf::from(store.location());
    match store.get(Kind::Header, store::HEADER_NAME, MAX_HEADER) {
        Ok(d) => Ok(d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(OpenError::NotAStore(root)),
        Err(e) => Err(io_at(&root)(e)),
    }
}

/// Replace the header object (durably, atomically).
pub(crate) fn write_header(store: &dyn ObjectStore, data: &[u8]) -> Result<(), OpenError> {
    store
        .put(Kind::Header, store::HEADER_NAME, data, true)
        .map_err(io_at(Path::new(&store.location())))
}

/// Read and authenticate a store header with the keystore; returns the
/// header, the unwrapped VMK and the result of unwrapping the VCK (which
/// can fail on its own: the header is authenticated with the VMK alone).
pub(crate) fn read_header(
    store: &dyn ObjectStore,
    ks: &Keystore,
) -> Result<(HeaderBody, Key32, ContentKeyResult), OpenError> {
    let root = &PathBuf::from(store.location());
    let data = read_header_bytes(store)?;
    let hdr = decode_header(&data).map_err(|source| OpenError::Format {
        path: root.to_path_buf(),
        source,
    })?;
    let vid = volume_id_hex(&hdr.store_id);
    let vmk = ks
        .unwrap(&hdr.vmk, &kms::volume_context(&vid, "metadata"))
        .map_err(|e| match e {
            KmsError::UnwrapFailed { .. } => OpenError::HeaderTampered {
                path: root.to_path_buf(),
            },
            other => OpenError::Kms(other),
        })?;
    let mac_key = vmk.derive(LABEL_HEADER_MAC);
    if !verify_header(&data, &mac_key) {
        return Err(OpenError::HeaderTampered {
            path: root.to_path_buf(),
        });
    }
    let vck = ks.unwrap(&hdr.vck, &kms::volume_context(&vid, "content"));
    Ok((hdr, vmk, vck))
}

/// Re-wrap the volume keys under the newest versions of their master keys
/// (the content key under `content_key`, or its current master key) and
/// rewrite the header atomically. O(1): no content is touched.
pub(crate) fn rewrap_header(
    store: &dyn ObjectStore,
    ks: &Keystore,
    hdr: &HeaderBody,
    vmk: &Key32,
    vck: &Key32,
    content_key: Option<&str>,
) -> Result<HeaderBody, OpenError> {
    let vid = volume_id_hex(&hdr.store_id);
    let mut new = hdr.clone();
    let svc = ks.service_key()?;
    if svc.current_version() != hdr.vmk.key_version || svc.id != hdr.vmk.key_id {
        let id = svc.id.clone();
        new.vmk = ks.wrap_op(
            "ReEncrypt",
            &id,
            &kms::volume_context(&vid, "metadata"),
            vmk,
        )?;
    }
    let target = content_key.unwrap_or(&hdr.vck.key_id).to_string();
    let k = ks.check_usable(&target)?;
    if k.id != hdr.vck.key_id || k.current_version() != hdr.vck.key_version {
        new.vck = ks.wrap_op(
            "ReEncrypt",
            &target,
            &kms::volume_context(&vid, "content"),
            vck,
        )?;
    }
    // Older formats are upgraded by the first header write (format 3 adds
    // the data id; see docs/FORMAT.md).
    let on_disk = read_header_bytes(store)
        .map(|d| header_version(&d))
        .unwrap_or(0);
    if new != *hdr || on_disk < FORMAT_VERSION {
        let mac_key = vmk.derive(LABEL_HEADER_MAC);
        write_header(store, &encode_header(&new, &mac_key))?;
    }
    Ok(new)
}

impl Volume {
    /// Create a new, empty volume at `root` (a missing or empty directory).
    pub fn create(root: &Path, ks: &Keystore, opts: &CreateOptions) -> Result<String, OpenError> {
        if !opts.chunk_size.is_power_of_two() || !(4096..=(16 << 20)).contains(&opts.chunk_size) {
            return Err(OpenError::BadChunkSize(opts.chunk_size));
        }
        // Resolve keys before touching the disk.
        ks.check_usable(&opts.kms_key)?;
        let created_dir = match fs::read_dir(root) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(OpenError::NotEmpty(root.to_path_buf()));
                }
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(root).map_err(io_at(root))?;
                true
            }
            Err(e) => return Err(io_at(root)(e)),
        };
        let result = Self::create_inner(root, ks, opts);
        if result.is_err() {
            // Never leave a half-made store behind.
            if created_dir {
                let _ = fs::remove_dir_all(root);
            } else if let Ok(rd) = fs::read_dir(root) {
                for e in rd.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                }
            }
        }
        result
    }

    pub(super) fn create_inner(
        root: &Path,
        ks: &Keystore,
        opts: &CreateOptions,
    ) -> Result<String, OpenError> {
        LocalDirStore::init(root).map_err(io_at(root))?;
        let store = LocalDirStore::open(root).map_err(io_at(root))?;
        let _lock = lock_store(&store)?;
        let store_id: [u8; 16] = crypto::random_bytes();
        let vid = volume_id_hex(&store_id);
        let vmk = Key32::random();
        let vck = Key32::random();
        let svc = ks.service_key()?.id.clone();
        let wvmk = ks.wrap(&svc, &kms::volume_context(&vid, "metadata"), &vmk)?;
        let wvck = ks.wrap(&opts.kms_key, &kms::volume_context(&vid, "content"), &vck)?;
        let hdr = HeaderBody {
            store_id,
            created: kms::now_secs(),
            chunk_size: opts.chunk_size,
            inline_max: opts.inline_max.min(opts.chunk_size),
            vmk: wvmk,
            vck: wvck,
            content_gen: 1,
            rekey: None,
            data_id: store_id,
        };
        let (meta_key, mac_key, _content) = derive_keys(&vmk, &vck);
        let now = Timespec::now();
        let root_inode = Inode::new_dir(
            ROOT_INO,
            0o755,
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
            now,
        );
        let ckpt = CheckpointBody {
            next_ino: ROOT_INO + 1,
            inodes: vec![(ROOT_INO, root_inode.to_record_plain())],
            history: Vec::new(),
        };
        let (obj, _tag) = seal_checkpoint(&meta_key, &store_id, 0, &ckpt);
        store
            .put(Kind::Meta, &checkpoint_name(0), &obj, true)
            .map_err(io_at(root))?;
        // The header goes last: its presence marks a complete store.
        write_header(&store, &encode_header(&hdr, &mac_key))?;
        Ok(vid)
    }

    /// `sealfs rewrap`: re-wrap the content key under the newest version of
    /// its master key, or under `kms_key`, and the metadata key under the
    /// newest service key version. Rewrites only the header (O(1)); the
    /// store must not be mounted. Returns (old, new) wrapping key and
    /// version, and the bytes written.
    pub fn rewrap(
        root: &Path,
        ks: &Keystore,
        kms_key: Option<&str>,
    ) -> Result<(KeyRef, KeyRef, u64), OpenError> {
        if !root.join(HEADER_FILE).exists() {
            return Err(OpenError::NotAStore(root.to_path_buf()));
        }
        let store = open_store(root)?;
        let _lock = lock_store(&store)?;
        let (hdr, vmk, vck) = read_header(&store, ks)?;
        let vck = vck?;
        let new = rewrap_header(&store, ks, &hdr, &vmk, &vck, kms_key)?;
        let written = if new != hdr {
            read_header_bytes(&store)
                .map(|d| d.len() as u64)
                .unwrap_or(0)
        } else {
            0
        };
        Ok((
            (hdr.vck.key_id.clone(), hdr.vck.key_version),
            (new.vck.key_id.clone(), new.vck.key_version),
            written,
        ))
    }

    /// `sealfs rekey`, step 1 (store not mounted): start a full re-key
    /// unless one is already under way. A fresh content key, wrapped under
    /// `kms_key` (default: the current master key), becomes the current
    /// generation; the previous one stays in the header until every object
    /// is re-encrypted. Returns true when resuming an interrupted re-key.
    pub fn rekey_begin(
        root: &Path,
        ks: &Keystore,
        kms_key: Option<&str>,
    ) -> Result<bool, OpenError> {
        if !root.join(HEADER_FILE).exists() {
            return Err(OpenError::NotAStore(root.to_path_buf()));
        }
        let store = open_store(root)?;
        let _lock = lock_store(&store)?;
        let (hdr, vmk, vck) = read_header(&store, ks)?;
        vck?;
        // Snapshots hold chunks under the current content key: a re-key
        // would have to keep that key or rewrite every snapshot. Refuse.
        let snaps: Vec<String> = store
            .list(Kind::Meta)
            .map_err(io_at(root))?
            .into_iter()
            .filter(|n| parse_seq(n, "snapshot").is_some())
            .collect();
        if !snaps.is_empty() {
            return Err(OpenError::Kms(KmsError::Refused(format!(
                "{} has {} snapshot(s) (meta/{}), which keep chunks under the current content key; \
                 delete them first (`sealfs snapshot delete`), or make a fully re-encrypted copy \
                 with `sealfs clone --reencrypt`",
                root.display(),
                snaps.len(),
                snaps.join(", meta/")
            ))));
        }
        if hdr.rekey.is_some() {
            if let Some(k) = kms_key {
                let want = ks.resolve(k)?.id.clone();
                if want != hdr.vck.key_id {
                    return Err(OpenError::Kms(KmsError::Refused(format!(
                        "an interrupted re-key to key {} is under way; finish it first with `sealfs rekey {}` (no --kms-key), then re-key again",
                        hdr.vck.key_id,
                        root.display()
                    ))));
                }
            }
            return Ok(true);
        }
        let target = kms_key.unwrap_or(&hdr.vck.key_id).to_string();
        ks.check_usable(&target)?;
        let vid = volume_id_hex(&hdr.store_id);
        let fresh = Key32::random();
        let wrapped = ks.wrap(&target, &kms::volume_context(&vid, "content"), &fresh)?;
        let mut new = hdr.clone();
        new.rekey = Some(RekeyState {
            old_vck: hdr.vck.clone(),
            old_gen: hdr.content_gen,
        });
        new.vck = wrapped;
        new.content_gen = hdr.content_gen + 1;
        let mac_key = vmk.derive(LABEL_HEADER_MAC);
        write_header(&store, &encode_header(&new, &mac_key))?;
        Ok(false)
    }

    /// `sealfs rekey`, step 3 (after the volume is closed): drop the previous
    /// content key from the header. The re-key is complete.
    pub fn rekey_finish(root: &Path, ks: &Keystore) -> Result<(), OpenError> {
        let store = open_store(root)?;
        let _lock = lock_store(&store)?;
        let (hdr, vmk, _vck) = read_header(&store, ks)?;
        if hdr.rekey.is_none() {
            return Ok(());
        }
        let mut new = hdr;
        new.rekey = None;
        let mac_key = vmk.derive(LABEL_HEADER_MAC);
        write_header(&store, &encode_header(&new, &mac_key))
    }

    /// Describe a store (needs the keystore to authenticate the header).
    pub fn info(root: &Path, ks: &Keystore) -> Result<VolumeInfo, OpenError> {
        let store = open_store(root)?;
        let (hdr, _vmk, vck) = read_header(&store, ks)?;
        let content_unavailable = vck.err().map(|e| e.to_string());
        let (chunk_bytes, chunk_objects) = store.usage(Kind::Chunk).map_err(io_at(root))?;
        let (meta_bytes, meta_objects) = store.usage(Kind::Meta).map_err(io_at(root))?;
        let snapshots = store
            .list(Kind::Meta)
            .map_err(io_at(root))?
            .iter()
            .filter(|n| parse_seq(n, "snapshot").is_some())
            .count() as u64;
        Ok(VolumeInfo {
            store_id: volume_id_hex(&hdr.store_id),
            created: hdr.created,
            chunk_size: hdr.chunk_size,
            inline_max: hdr.inline_max,
            format_version: read_header_bytes(&store)
                .map(|d| header_version(&d))
                .unwrap_or(FORMAT_VERSION),
            metadata_key: (hdr.vmk.key_id.clone(), hdr.vmk.key_version),
            content_key: (hdr.vck.key_id.clone(), hdr.vck.key_version),
            content_gen: hdr.content_gen,
            content_unavailable,
            chunk_objects,
            chunk_bytes,
            meta_objects,
            meta_bytes,
            snapshots,
            shares_data_of: (hdr.data_id != hdr.store_id).then(|| volume_id_hex(&hdr.data_id)),
        })
    }

    /// Open a volume: lock the store, authenticate the header, unwrap the
    /// keys once, replay checkpoint and journal, check for rollback.
    pub fn open(root: &Path, ks: &Keystore, opts: &OpenOptions2) -> Result<Arc<Volume>, OpenError> {
        if !root.join(HEADER_FILE).exists() {
            return Err(OpenError::NotAStore(root.to_path_buf()));
        }
        Self::open_in(Box::new(open_store(root)?), ks, opts)
    }

    /// [`Volume::open`] on a given object store (tests wrap the local one
    /// to inject faults).
    pub fn open_in(
        store: Box<dyn ObjectStore>,
        ks: &Keystore,
        opts: &OpenOptions2,
    ) -> Result<Arc<Volume>, OpenError> {
        let root_buf = PathBuf::from(store.location());
        let root = root_buf.as_path();
        let lock = take_lock(&*store)?;
        let (mut hdr, vmk, vck) = read_header(&*store, ks)?;
        let mut rewrap_vck = None;
        let (content_key, unavailable) = match vck {
            Ok(vck) => {
                // (a snapshot view is read-only too: it writes nothing)
                if !opts.read_only && opts.snapshot.is_none() {
                    // Mount re-wraps under the newest key versions, once
                    // the chain and rollback checks passed (below).
                    rewrap_vck = Some(vck.clone());
                }
                let keys = unwrap_content_keys(ks, &hdr, vck)?;
                (ContentKeys::new(&hdr, &keys), None)
            }
            // A destroyed key: the metadata still opens (ls, stat work);
            // file content is gone for good.
            Err(e @ KmsError::KeyDeleted { .. }) => {
                log::warn!("{}: {e}; only metadata is available", root.display());
                (None, Some(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let meta_key = AeadKey::new(&vmk.derive(LABEL_META));
        let meta_err = |why: String| OpenError::Metadata {
            path: root.to_path_buf(),
            why,
        };
        let names = store.list(Kind::Meta).map_err(io_at(root))?;
        let chain = read_chain(&*store, &names, &meta_key, &hdr.store_id);
        match chain.fault {
            None => {}
            Some(ChainFault::NoCheckpoint) => {
                return Err(meta_err(
                    "no checkpoint found (the metadata was deleted)".into(),
                ))
            }
            Some(ChainFault::Missing { expect, found }) => {
                return Err(meta_err(format!(
                    "journal record {expect} is missing (found {found} after it)"
                )))
            }
            Some(ChainFault::Bad { io: Some(e), .. }) => return Err(io_at(root)(e)),
            Some(ChainFault::Bad { why, .. }) => return Err(meta_err(why)),
        }
        let ckeys: Vec<&AeadKey> = content_key.as_ref().map(|k| k.all()).unwrap_or_default();
        let mut st = State::new();
        st.next_ino = chain.next_ino;
        for (ino, rec) in chain.records {
            let inode = Inode::from_record(ino, rec, &ckeys, &hdr.data_id)
                .map_err(|e| meta_err(format!("inode {ino}: {e}")))?;
            st.inodes.insert(ino, inode);
        }
        let (cseq, seq, tag) = (chain.ckpt, chain.seq, chain.tag);
        let chain_tags = chain.tags;
        st.history = chain_tags
            .iter()
            .skip(chain_tags.len().saturating_sub(format::HISTORY_MAX))
            .copied()
            .collect();
        if !st.inodes.contains_key(&ROOT_INO) {
            return Err(meta_err("the root directory is missing".into()));
        }
        st.seq = seq;
        st.last_tag = tag;
        st.ckpt_seq = cseq;
        st.records_since_ckpt = seq - cseq;
        // Rollback detection against local state.
        let state_dir = match &opts.state_dir {
            Some(d) => d.clone(),
            None => default_state_dir().map_err(io_at(root))?,
        };
        let sf = state_dir
            .join("volumes")
            .join(format!("{}.seq", volume_id_hex(&hdr.store_id)));
        if let Err(e) = check_seen(root, &sf, &chain_tags, seq) {
            if !opts.accept_rollback {
                return Err(e);
            }
            log::warn!(
                "{}: --accept-rollback: accepting the store at commit {seq} although {e}",
                root.display()
            );
            if let Err(ae) = ks.audit_volume_event(
                "AcceptRollback",
                &volume_id_hex(&hdr.store_id),
                format!("accepted the store {} at commit {seq}: {e}", root.display()),
            ) {
                return Err(OpenError::Kms(ae));
            }
        }
        let seen = Some(SeenWriter::new(sf.clone()));
        let state_file = Some(sf);
        // A snapshot mount shows the snapshot's tree instead (after the
        // live chain passed the rollback check above).
        let mut snap_state = None;
        if let Some(name) = &opts.snapshot {
            let dead =
                snapshot::read_tombstones(&snapshot::tombstone_path(&state_dir, &hdr.store_id));
            let found =
                snapshot::find_snapshot(&*store, &names, &meta_key, &hdr.store_id, name, &dead)
                    .map_err(meta_err)?;
            let Some(body) = found else {
                return Err(OpenError::UnknownSnapshot {
                    path: root.to_path_buf(),
                    name: name.clone(),
                });
            };
            let mut vs = State::new();
            vs.next_ino = body.next_ino;
            vs.seq = body.seq;
            for (ino, rec) in body.inodes {
                let inode = Inode::from_record(ino, rec, &ckeys, &hdr.data_id)
                    .map_err(|e| meta_err(format!("snapshot {name:?}, inode {ino}: {e}")))?;
                vs.inodes.insert(ino, inode);
            }
            if !vs.inodes.contains_key(&ROOT_INO) {
                return Err(meta_err(format!("snapshot {name:?} has no root directory")));
            }
            snap_state = Some(vs);
        }
        let snapshot_view = snap_state.is_some();
        // Every check passed: only now is anything written to the store.
        lock.renew().map_err(io_at(root))?;
        if let Some(vck) = rewrap_vck {
            hdr = rewrap_header(&*store, ks, &hdr, &vmk, &vck, None)?;
        }
        drop(vmk);
        let st = snap_state.unwrap_or(st);
        let cache_entries = (opts.cache_bytes / hdr.chunk_size as usize).max(16);
        let vol = Arc::new(Volume {
            root: root.to_path_buf(),
            store,
            meta_key,
            content_key: Mutex::new(content_key),
            content_gate: RwLock::new(unavailable),
            state: Mutex::new(st),
            flush_cv: Condvar::new(),
            commit_lock: Mutex::new(()),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(cache_entries).expect("nonzero"),
            )),
            lock,
            lease_lost: AtomicBool::new(false),
            unsynced: Mutex::new(Unsynced::default()),
            read_only: opts.read_only || snapshot_view,
            dirty_limit: opts.dirty_bytes.max(1 << 20),
            state_file,
            seen,
            closed: AtomicBool::new(false),
            stop_bg: Arc::new(AtomicBool::new(false)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            snaps: RwLock::new(Default::default()),
            snapshot_view,
            hdr,
        });
        vol.record_seq(seq, &tag);
        vol.flush_seen();
        if !snapshot_view {
            vol.load_snapshots(&names);
        }
        if !vol.read_only {
            // Remove records and checkpoints a crash left behind after a
            // newer checkpoint was written, and temp files of torn writes.
            for n in &names {
                let stale = parse_seq(n, "journal").is_some_and(|s| s <= cseq)
                    || parse_seq(n, "checkpoint").is_some_and(|s| s < cseq);
                if stale {
                    let _ = vol.store.delete(Kind::Meta, n);
                }
            }
            if let Err(e) = vol.store.remove_temps() {
                log::warn!(
                    "{}: cannot remove temp files of torn writes: {e}",
                    root.display()
                );
            }
        }
        Ok(vol)
    }

    /// Record the last commit seen in the local state, durably.
    pub(super) fn record_seq(&self, seq: u64, tag: &[u8; TAG_LEN]) {
        if let Some(w) = &self.seen {
            w.record(seq, tag);
        }
    }

    /// Wait until the last commit handed to the local record is on disk.
    pub(super) fn flush_seen(&self) {
        if let Some(w) = &self.seen {
            w.flush();
        }
    }
}

/// Write the local record of the last commit seen durably (temp file,
/// fsync, rename, directory fsync).
fn write_seen(sf: &Path, seq: u64, tag: &[u8; TAG_LEN]) {
    let write = || -> io::Result<()> {
        if let Some(d) = sf.parent() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        store::write_atomic(sf, encode_seen(seq, tag).as_bytes())
    };
    if let Err(e) = write() {
        log::warn!(
            "cannot record commit {seq} in {}: {e} (rollback detection is weaker)",
            sf.display()
        );
    }
}

/// Keeps the local record of the last commit seen, off the commit path:
/// a commit hands over its (seq, tag) and returns; a thread writes the
/// newest one durably, so commits that come while it writes are coalesced
/// into one write (the two fsyncs of a durable replace would otherwise be
/// paid by every `fsync(2)` on the volume). Closing the volume waits for
/// the last one.
pub(crate) struct SeenWriter {
    file: PathBuf,
    shared: Arc<SeenShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SeenShared {
    st: Mutex<SeenState>,
    cv: Condvar,
}

#[derive(Default)]
struct SeenState {
    pending: Option<(u64, [u8; TAG_LEN])>,
    writing: bool,
    stop: bool,
}

impl SeenWriter {
    pub(crate) fn new(file: PathBuf) -> SeenWriter {
        let shared = Arc::new(SeenShared {
            st: Mutex::new(SeenState::default()),
            cv: Condvar::new(),
        });
        let sh = shared.clone();
        let path = file.clone();
        let thread = std::thread::Builder::new()
            .name("sealfs-seen".into())
            .spawn(move || {
                let mut g = sh.st.lock();
                loop {
                    if let Some((seq, tag)) = g.pending.take() {
                        g.writing = true;
                        drop(g);
                        write_seen(&file, seq, &tag);
                        g = sh.st.lock();
                        g.writing = false;
                        sh.cv.notify_all();
                        continue;
                    }
                    if g.stop {
                        return;
                    }
                    sh.cv.wait(&mut g);
                }
            })
            .ok();
        if thread.is_none() {
            log::warn!("no thread for the local record of commits; writing it on the commit path");
        }
        SeenWriter {
            file: path,
            shared,
            thread,
        }
    }

    fn record(&self, seq: u64, tag: &[u8; TAG_LEN]) {
        if self.thread.is_none() {
            write_seen(&self.file, seq, tag);
            return;
        }
        let mut g = self.shared.st.lock();
        g.pending = Some((seq, *tag));
        self.shared.cv.notify_all();
    }

    fn flush(&self) {
        let mut g = self.shared.st.lock();
        while self.thread.is_some() && (g.pending.is_some() || g.writing) {
            self.shared.cv.wait(&mut g);
        }
    }
}

impl Drop for SeenWriter {
    fn drop(&mut self) {
        self.shared.st.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
