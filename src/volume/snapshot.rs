//! Snapshots: sealed, read-only copies of the inode table at a commit
//! point, the copy-on-write rule that keeps the chunk objects they
//! reference, the virtual `.snapshots` directory, and `gc`.
//!
//! A snapshot is a manifest object `meta/snapshot-<id>` (see
//! docs/FORMAT.md) holding every inode record of the commit it froze.
//! Taking one costs one metadata write; no chunk is copied. The open
//! volume keeps the chunk ids that any snapshot references, with how many
//! snapshots do ([`Snaps::refs`]): a chunk the live volume frees is deleted
//! only when
//! no snapshot holds it, and deleting a snapshot deletes exactly the
//! chunks that neither the live volume nor another snapshot references.
//!
//! Inode numbers seen through FUSE: live inodes are below 2^48; the
//! `.snapshots` directory is [`SNAPDIR_INO`]; inode `i` of the snapshot in
//! slot `s` (a per-mount number, 1..=65534) is `s << 48 | i`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::format::*;
use super::state::{InodeData, State};
use super::{Attr, FsError, FsResult, Volume, ROOT_INO};
use crate::crypto;
use crate::store::Kind;

/// Name of the virtual snapshot directory in the root of a mount.
pub const SNAPDIR_NAME: &[u8] = b".snapshots";
const SLOT_SHIFT: u32 = 48;
const SLOT_MAX: u16 = 0xfffe;
/// Inode number of the virtual `.snapshots` directory.
pub const SNAPDIR_INO: u64 = (0xffff << SLOT_SHIFT) | 1;
/// xattr on `.snapshots`: set it to run gc in the daemon; read it for the
/// report of the last run.
pub const XATTR_GC: &[u8] = b"user.sealfs.gc";
/// xattr on a snapshot's root directory: a one-line description.
pub const XATTR_SNAPSHOT: &[u8] = b"user.sealfs.snapshot";

/// Whether an inode number belongs to the virtual snapshot namespace.
pub fn is_virtual(ino: u64) -> bool {
    ino >> SLOT_SHIFT != 0
}

/// A virtual inode number split up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Virt {
    Live(u64),
    SnapDir,
    Snap(u16, u64),
}

fn split(ino: u64) -> Virt {
    match (ino >> SLOT_SHIFT) as u16 {
        0 => Virt::Live(ino),
        0xffff => Virt::SnapDir,
        s => Virt::Snap(s, ino & ((1 << SLOT_SHIFT) - 1)),
    }
}

fn join(slot: u16, ino: u64) -> u64 {
    ((slot as u64) << SLOT_SHIFT) | ino
}

/// One loaded snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub id: u64,
    pub slot: u16,
    /// Inode records sorted by inode number.
    pub body: Arc<SnapshotBody>,
}

impl Snap {
    fn get(&self, ino: u64) -> FsResult<&InodeRecord> {
        self.body
            .inodes
            .binary_search_by_key(&ino, |(n, _)| *n)
            .map(|i| &self.body.inodes[i].1)
            .map_err(|_| FsError::NOENT)
    }

    /// The distinct chunk ids the snapshot references.
    fn chunk_ids(&self) -> HashSet<[u8; 16]> {
        self.chunks().map(|c| c.id).collect()
    }

    /// Every chunk the snapshot references, with its plaintext length.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.body.inodes.iter().flat_map(|(_, r)| match &r.data {
            RecordData::ChunkedFile(c) => c.iter().map(|(_, r)| r).collect::<Vec<_>>(),
            _ => Vec::new(),
        })
    }
}

/// The snapshots of an open volume.
#[derive(Debug, Default)]
pub(crate) struct Snaps {
    pub list: Vec<Snap>,
    /// Every chunk id a snapshot references, with the number of
    /// snapshots that do.
    pub refs: HashMap<[u8; 16], u32>,
    next_slot: u16,
    /// Manifests that failed to open (their object names): gc refuses to
    /// run while there are any, since it cannot know what they hold.
    pub damaged: Vec<String>,
    /// Report of the last gc run through `.snapshots` (for `sealfs gc`).
    pub last_gc: String,
}

impl Snaps {
    /// Whether a snapshot holds chunk `id`, so that it must be kept when
    /// the live volume (or another snapshot) frees it. While a manifest
    /// could not be loaded nobody knows what it holds, so every chunk is
    /// kept (as an orphan for a later gc).
    pub fn holds(&self, id: &[u8; 16]) -> bool {
        !self.damaged.is_empty() || self.refs.contains_key(id)
    }

    /// Whether one more snapshot fits in the inode-number space.
    pub fn has_free_slot(&self) -> bool {
        self.next_slot < SLOT_MAX
    }

    pub fn add(&mut self, id: u64, mut body: SnapshotBody) -> FsResult<&Snap> {
        if self.next_slot >= SLOT_MAX {
            return Err(FsError::NOSPC);
        }
        self.next_slot += 1;
        body.inodes.sort_by_key(|(n, _)| *n);
        let s = Snap {
            id,
            slot: self.next_slot,
            body: Arc::new(body),
        };
        for id in s.chunk_ids() {
            *self.refs.entry(id).or_default() += 1;
        }
        self.list.push(s);
        Ok(self.list.last().expect("just pushed"))
    }

    /// Take snapshot `id` out; returns it.
    fn remove(&mut self, id: u64) -> Option<Snap> {
        let i = self.list.iter().position(|s| s.id == id)?;
        let s = self.list.remove(i);
        for c in s.chunk_ids() {
            if let Some(n) = self.refs.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&c);
                }
            }
        }
        Some(s)
    }

    fn by_name(&self, name: &[u8]) -> Option<&Snap> {
        self.list.iter().find(|s| s.body.name.as_bytes() == name)
    }

    fn by_slot(&self, slot: u16) -> FsResult<&Snap> {
        self.list
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(FsError::NOENT)
    }
}

/// What `sealfs snapshot list` shows of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub id: String,
    pub created: u64,
    /// The commit it froze.
    pub seq: u64,
    /// Bytes of chunk objects it references.
    pub referenced: u64,
    /// Bytes of chunk objects only it holds (freed by deleting it).
    pub exclusive: u64,
}

impl SnapshotInfo {
    /// One line, `key=value` separated by spaces (the `.snapshots` xattr).
    pub fn to_line(&self) -> String {
        format!(
            "id={} seq={} created={} referenced={} exclusive={}",
            self.id, self.seq, self.created, self.referenced, self.exclusive
        )
    }

    /// Parse [`SnapshotInfo::to_line`] back (name given separately).
    pub fn from_line(name: &str, line: &str) -> Option<SnapshotInfo> {
        let mut s = SnapshotInfo {
            name: name.to_string(),
            id: String::new(),
            created: 0,
            seq: 0,
            referenced: 0,
            exclusive: 0,
        };
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "id" => s.id = v.to_string(),
                "seq" => s.seq = v.parse().ok()?,
                "created" => s.created = v.parse().ok()?,
                "referenced" => s.referenced = v.parse().ok()?,
                "exclusive" => s.exclusive = v.parse().ok()?,
                _ => {}
            }
        }
        Some(s)
    }
}

/// What a gc run found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk objects referenced by the live volume or a snapshot.
    pub referenced: u64,
    /// Unreferenced chunk objects removed, and their bytes.
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Stale metadata objects removed.
    pub meta_removed: u64,
}

impl GcReport {
    pub fn to_line(&self) -> String {
        format!(
            "referenced={} chunks_removed={} bytes_removed={} meta_removed={}",
            self.referenced, self.chunks_removed, self.bytes_removed, self.meta_removed
        )
    }

    pub fn from_line(line: &str) -> Option<GcReport> {
        let mut r = GcReport::default();
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "referenced" => r.referenced = v,
                "chunks_removed" => r.chunks_removed = v,
                "bytes_removed" => r.bytes_removed = v,
                "meta_removed" => r.meta_removed = v,
                _ => {}
            }
        }
        Some(r)
    }
}

/// Why a snapshot command failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a snapshot named {0:?} already exists; choose another name or delete it first")]
    Exists(String),
    #[error("there is no snapshot named {0:?}; see `sealfs snapshot list`")]
    Unknown(String),
    #[error("invalid snapshot name {0:?}: use 1 to 128 characters, not starting with '.', without '/', '@' or control characters")]
    BadName(String),
    #[error("the volume is read-only (mounted ro or as a snapshot)")]
    ReadOnly,
    #[error("snapshot manifests {0} are damaged; gc cannot tell what they hold, so it does nothing. Run `sealfs fsck` to see the damage")]
    Damaged(String),
    #[error("this mount has used all of its {0} snapshot slots (a slot is used by every snapshot taken or loaded since the mount); remount the volume to take more")]
    NoSlot(u16),
    #[error("a re-key of this volume is under way; finish it first (`sealfs rekey STORE` with the volume unmounted), then take the snapshot")]
    RekeyUnderWay,
    #[error("{0}")]
    Fs(FsError),
}

impl SnapshotError {
    /// The errno for a FUSE reply.
    pub fn errno(&self) -> FsError {
        match self {
            SnapshotError::Exists(_) => FsError::EXIST,
            SnapshotError::Unknown(_) => FsError::NOENT,
            SnapshotError::BadName(_) => FsError::INVAL,
            SnapshotError::ReadOnly => FsError::ROFS,
            SnapshotError::Damaged(_) => FsError::IO,
            SnapshotError::NoSlot(_) => FsError::NOSPC,
            SnapshotError::RekeyUnderWay => FsError(libc::EBUSY),
            SnapshotError::Fs(e) => *e,
        }
    }
}

impl From<FsError> for SnapshotError {
    fn from(e: FsError) -> Self {
        SnapshotError::Fs(e)
    }
}

/// Find the manifest of the snapshot named `name` among the metadata
/// objects `names` of `store` (for a snapshot mount and for clone). An
/// unreadable manifest is logged and skipped; two manifests with the name
/// mean one was put back from elsewhere, and nobody can tell which is
/// genuine: that is an error, not a choice.
/// The ids of snapshots deleted through this machine (see
/// `Volume::tombstone_file`), from the file at `p`.
pub(crate) fn read_tombstones(p: &std::path::Path) -> HashSet<u64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect()
}

/// The tombstone file of a volume in a state directory.
pub(crate) fn tombstone_path(
    state_dir: &std::path::Path,
    store_id: &[u8; 16],
) -> std::path::PathBuf {
    state_dir
        .join("volumes")
        .join(format!("{}.deleted-snapshots", hex::encode(store_id)))
}

/// Find the snapshot named `name`; manifests whose id is in `dead` (deleted
/// through this machine, put back from an older copy) are not considered.
pub(crate) fn find_snapshot(
    store: &dyn crate::store::ObjectStore,
    names: &[String],
    meta_key: &crypto::AeadKey,
    store_id: &[u8; 16],
    name: &str,
    dead: &HashSet<u64>,
) -> Result<Option<SnapshotBody>, String> {
    let mut found: Option<(String, SnapshotBody)> = None;
    for n in names {
        let Some(id) = parse_seq(n, "snapshot") else {
            continue;
        };
        if dead.contains(&id) {
            log::warn!("snapshot manifest {n} was deleted through this machine and is back (put back from an older copy); ignoring it");
            continue;
        }
        let body = store
            .get(Kind::Meta, n, crate::store::MAX_OBJECT)
            .map_err(|e| e.to_string())
            .and_then(|d| open_snapshot(meta_key, store_id, id, &d).map_err(|e| e.to_string()));
        match body {
            Ok(b) if b.name == name => {
                if let Some((first, _)) = &found {
                    return Err(format!(
                        "snapshot manifests {first} and {n} are both named {name:?} (one was put \
                         back from elsewhere); neither is used: run `sealfs fsck`"
                    ));
                }
                found = Some((n.clone(), b));
            }
            Ok(_) => {}
            Err(e) => log::warn!("{e}"),
        }
    }
    Ok(found.map(|(_, b)| b))
}

/// Check a snapshot name.
pub fn check_snapshot_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c == '@' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

/// Attributes of a snapshot inode from its record.
fn record_attr(ino: u64, r: &InodeRecord) -> Attr {
    let stored: u64 = match &r.data {
        RecordData::InlineFile(s) => s.len().saturating_sub(28) as u64,
        RecordData::ChunkedFile(c) => c.iter().map(|(_, c)| c.len as u64).sum(),
        RecordData::Dir { entries, .. } => 4096 + entries.len() as u64 * 64,
        RecordData::Symlink(t) => t.len() as u64,
        RecordData::Special => 0,
    };
    Attr {
        ino,
        kind: r.kind,
        perm: r.perm,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        size: if r.kind == FileKind::Dir {
            4096
        } else {
            r.size
        },
        blocks: stored.div_ceil(512),
        atime: r.atime,
        mtime: r.mtime,
        ctime: r.ctime,
        crtime: r.crtime,
    }
}

/// Chunk ids the live state references, including those freed since the
/// last commit (the committed state may still point at them).
fn live_refs(st: &State) -> HashSet<[u8; 16]> {
    let mut s: HashSet<[u8; 16]> = st.pending_free.iter().copied().collect();
    for i in st.inodes.values() {
        if let InodeData::File(fd) = &i.data {
            s.extend(fd.chunks.values().map(|c| c.id));
        }
    }
    s
}

/// The persisted records of every inode with a name, sorted by number.
fn records_of(
    st: &State,
    ckey: Option<&crate::crypto::AeadKey>,
    data_id: &[u8; 16],
) -> Vec<(u64, InodeRecord)> {
    let mut inodes: Vec<(u64, InodeRecord)> = st
        .inodes
        .iter()
        .filter(|(_, i)| i.persistent())
        .map(|(&n, i)| (n, i.to_record(n, ckey, data_id)))
        .collect();
    inodes.sort_by_key(|(n, _)| *n);
    inodes
}

pub(crate) fn object_bytes(c: &ChunkRef) -> u64 {
    padded_len(c.len as usize) as u64 + 38
}

impl Volume {
    /// Whether the virtual `.snapshots` directory exists in this mount
    /// (not in a mount of a snapshot itself).
    fn snapdir_visible(&self) -> bool {
        !self.snapshot_view
    }

    /// Whether `ino` can only be read (read-only volume or a snapshot).
    pub fn read_only_ino(&self, ino: u64) -> bool {
        self.read_only || is_virtual(ino)
    }

    /// Fail with EROFS for a change to a virtual inode or to the name
    /// `.snapshots` in the root.
    pub(crate) fn check_changeable(&self, parent: u64, name: Option<&[u8]>) -> FsResult<()> {
        if is_virtual(parent)
            || (parent == ROOT_INO && name == Some(SNAPDIR_NAME) && self.snapdir_visible())
        {
            return Err(FsError::ROFS);
        }
        Ok(())
    }

    /// Local state: ids of the snapshots deleted through this machine
    /// (`STATE_DIR/volumes/<volume id>.deleted-snapshots`, one hex id a
    /// line). A manifest with such an id that shows up again was put back
    /// from an older copy; it is ignored (and gc removes it).
    fn tombstone_file(&self) -> Option<std::path::PathBuf> {
        self.state_file
            .as_ref()
            .map(|f| f.with_extension("deleted-snapshots"))
    }

    fn tombstones(&self) -> HashSet<u64> {
        let Some(p) = self.tombstone_file() else {
            return HashSet::new();
        };
        read_tombstones(&p)
    }

    fn add_tombstone(&self, id: u64) {
        let Some(p) = self.tombstone_file() else {
            return;
        };
        let mut all: Vec<u64> = self.tombstones().into_iter().collect();
        all.push(id);
        all.sort_unstable();
        let text: String = all.iter().map(|i| format!("{i:016x}\n")).collect();
        if let Err(e) = crate::store::write_atomic(&p, text.as_bytes()) {
            log::warn!(
                "cannot record the deleted snapshot in {}: {e} (a restored copy of it would not be noticed)",
                p.display()
            );
        }
    }

    /// Load every snapshot manifest in the store (at open).
    pub(crate) fn load_snapshots(&self, names: &[String]) {
        let dead = self.tombstones();
        let mut sn = self.snaps.write();
        for n in names {
            let Some(id) = parse_seq(n, "snapshot") else {
                continue;
            };
            if dead.contains(&id) {
                log::error!(
                    "{}: snapshot manifest {n} was deleted through this machine and is back \
                     (restored from an older copy of the store?); ignoring it (`sealfs gc` removes it)",
                    self.root.display()
                );
                continue;
            }
            let body = self
                .store
                .get(Kind::Meta, n, crate::store::MAX_OBJECT)
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    open_snapshot(&self.meta_key, &self.hdr.store_id, id, &d)
                        .map_err(|e| e.to_string())
                });
            match body {
                Ok(b) => {
                    if let Some(other) = sn.by_name(b.name.as_bytes()).map(|s| s.id) {
                        // Names are unique when taken: two manifests with one
                        // name mean one was put back from elsewhere, and
                        // nobody can tell which is genuine.
                        log::error!(
                            "{}: snapshot manifests {n} and {} have the same name {:?}; \
                             neither is used (run `sealfs fsck`)",
                            self.root.display(),
                            snapshot_name(other),
                            b.name
                        );
                        sn.remove(other);
                        sn.damaged.push(snapshot_name(other));
                        sn.damaged.push(n.clone());
                    } else if sn.add(id, b).is_err() {
                        log::error!(
                            "{}: too many snapshots; {n} is not loaded",
                            self.root.display()
                        );
                        sn.damaged.push(n.clone());
                    }
                }
                Err(e) => {
                    log::error!("{}: {e}; run `sealfs fsck`", self.root.display());
                    sn.damaged.push(n.clone());
                }
            }
        }
        if !sn.damaged.is_empty() {
            log::warn!(
                "{}: while snapshot manifests cannot be read, chunks the volume frees are kept \
                 (`sealfs gc` removes them once every manifest reads again, or is removed)",
                self.root.display()
            );
        }
    }

    /// Of the chunks the live volume no longer references, those no
    /// snapshot holds (they can be deleted).
    pub(crate) fn unheld(&self, ids: Vec<[u8; 16]>) -> Vec<[u8; 16]> {
        let sn = self.snaps.read();
        ids.into_iter().filter(|id| !sn.holds(id)).collect()
    }

    /// Inode numbers of the regular files in every snapshot (their cached
    /// pages are dropped on revocation, like the live files').
    pub(crate) fn snapshot_file_inodes(&self) -> Vec<u64> {
        let sn = self.snaps.read();
        sn.list
            .iter()
            .flat_map(|s| {
                s.body
                    .inodes
                    .iter()
                    .filter(|(_, r)| r.kind == FileKind::File)
                    .map(move |(n, _)| join(s.slot, *n))
            })
            .collect()
    }

    /// Number of snapshots.
    pub fn snapshot_count(&self) -> usize {
        self.snaps.read().list.len()
    }

    /// Take a snapshot named `name` of the current state: every write that
    /// returned before is in it, none that started after. Commits first;
    /// then writes one sealed manifest (no chunk is copied).
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        check_snapshot_name(name)?;
        if self.read_only {
            return Err(SnapshotError::ReadOnly);
        }
        let _c = self.commit_lock.lock();
        if self.snaps.read().by_name(name.as_bytes()).is_some() {
            return Err(SnapshotError::Exists(name.to_string()));
        }
        if self.hdr.rekey.is_some() {
            // A snapshot would keep chunks under the old key and block the
            // re-key from finishing.
            return Err(SnapshotError::RekeyUnderWay);
        }
        if !self.snaps.read().has_free_slot() {
            return Err(SnapshotError::NoSlot(SLOT_MAX));
        }
        let did = self.hdr.data_id;
        let mut body = None;
        self.commit_locked(
            false,
            Some(&mut |st: &State, seq: u64| {
                // Under the state lock: the content key cannot come or go
                // (revocation, restore) while the records are sealed.
                let ckey = self.content_key.lock().clone();
                let ckey = ckey.as_ref().map(|k| k.cur.1.clone());
                body = Some(SnapshotBody {
                    name: name.to_string(),
                    created: crate::kms::now_secs(),
                    seq,
                    next_ino: st.next_ino,
                    inodes: records_of(st, ckey.as_deref(), &did),
                });
            }),
        )?;
        let body = body.ok_or(FsError::IO)?;
        let mut id: u64 = u64::from_le_bytes(crypto::random_bytes());
        while self.snaps.read().list.iter().any(|s| s.id == id) {
            id = u64::from_le_bytes(crypto::random_bytes());
        }
        let obj = seal_snapshot(&self.meta_key, &self.hdr.store_id, id, &body);
        let stored = self
            .store
            .put(Kind::Meta, &snapshot_name(id), &obj, true)
            .map_err(|e| {
                log::error!("writing snapshot {name:?} failed: {e}");
                FsError::from(e)
            })
            .and_then(|_| self.snaps.write().add(id, body).map(|_| ()));
        if let Err(e) = stored {
            // Not taken: a manifest left behind would hold chunks nobody
            // protects.
            let _ = self.store.delete(Kind::Meta, &snapshot_name(id));
            return Err(e.into());
        }
        log::info!("{}: snapshot {name:?} created", self.root.display());
        Ok(self
            .snapshot_infos(Some(name))
            .into_iter()
            .next()
            .expect("just added"))
    }

    /// Delete snapshot `name`; frees exactly the chunk objects that only
    /// it held. Returns (objects freed, bytes freed).
    pub fn snapshot_delete(&self, name: &str) -> Result<(u64, u64), SnapshotError> {
        if self.read_only {
            return Err(SnapshotError::ReadOnly);
        }
        let _c = self.commit_lock.lock();
        let snap = self
            .snaps
            .read()
            .by_name(name.as_bytes())
            .cloned()
            .ok_or_else(|| SnapshotError::Unknown(name.to_string()))?;
        // The manifest goes first (and durably): a crash afterwards leaves
        // orphan chunks for gc, never a snapshot missing chunks.
        self.store
            .delete(Kind::Meta, &snapshot_name(snap.id))
            .and_then(|_| self.store.sync())
            .map_err(FsError::from)?;
        self.add_tombstone(snap.id);
        let snap = self.snaps.write().remove(snap.id).expect("listed above");
        let live = live_refs(&self.state.lock());
        let sn = self.snaps.read();
        let mut freed = (0, 0);
        let mut seen = HashSet::new();
        for c in snap.chunks() {
            if !sn.holds(&c.id) && !live.contains(&c.id) && seen.insert(c.id) {
                let _ = self.store.delete(Kind::Chunk, &c.name());
                freed.0 += 1;
                freed.1 += object_bytes(c);
            }
        }
        drop(sn);
        log::info!(
            "{}: snapshot {name:?} deleted; {} chunk objects freed",
            self.root.display(),
            freed.0
        );
        Ok(freed)
    }

    /// Every snapshot with its sizes, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        self.snapshot_infos(None)
    }

    /// The snapshots (all, or the one named `only`) with their sizes.
    fn snapshot_infos(&self, only: Option<&str>) -> Vec<SnapshotInfo> {
        let live = live_refs(&self.state.lock());
        let sn = self.snaps.read();
        let mut out = Vec::new();
        for s in sn
            .list
            .iter()
            .filter(|s| only.is_none_or(|n| s.body.name == n))
        {
            let mut seen = HashSet::new();
            let (mut referenced, mut exclusive) = (0, 0);
            for c in s.chunks() {
                if !seen.insert(c.id) {
                    continue;
                }
                referenced += object_bytes(c);
                if !live.contains(&c.id) && sn.refs.get(&c.id) == Some(&1) {
                    exclusive += object_bytes(c);
                }
            }
            out.push(SnapshotInfo {
                name: s.body.name.clone(),
                id: format!("{:016x}", s.id),
                created: s.body.created,
                seq: s.body.seq,
                referenced,
                exclusive,
            });
        }
        out.sort_by_key(|s| (s.created, s.seq));
        out
    }

    /// The committed live state as a snapshot body (for cloning a volume
    /// opened read-only, which has no uncommitted changes).
    pub(crate) fn live_records(&self) -> SnapshotBody {
        let ckey = self.content_key.lock().clone();
        let ckey = ckey.as_ref().map(|k| k.cur.1.clone());
        let st = self.state.lock();
        SnapshotBody {
            name: String::new(),
            created: crate::kms::now_secs(),
            seq: st.seq,
            next_ino: st.next_ino,
            inodes: records_of(&st, ckey.as_deref(), &self.hdr.data_id),
        }
    }

    /// Remove every chunk and metadata object that neither the live volume
    /// nor a snapshot references. Safe while mounted: it runs in the
    /// daemon, between commits. `progress(done, total)` as it goes.
    pub fn gc(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<GcReport, SnapshotError> {
        if self.read_only {
            return Err(SnapshotError::ReadOnly);
        }
        let _c = self.commit_lock.lock();
        {
            let sn = self.snaps.read();
            if !sn.damaged.is_empty() {
                return Err(SnapshotError::Damaged(sn.damaged.join(", ")));
            }
        }
        let chunks = self.store.list(Kind::Chunk).map_err(FsError::from)?;
        let metas = self.store.list(Kind::Meta).map_err(FsError::from)?;
        // Chunks written by flushes in progress are not yet in the state:
        // wait for them (they were listed before or are not listed at all).
        let (live, seq, ckpt) = {
            let mut st = self.state.lock();
            while st.inflight > 0 {
                self.flush_cv.wait(&mut st);
            }
            (live_refs(&st), st.seq, st.ckpt_seq)
        };
        let sn = self.snaps.read();
        let mut report = GcReport::default();
        let total = chunks.len() as u64;
        for (i, n) in chunks.iter().enumerate() {
            let id = hex::decode(n)
                .ok()
                .and_then(|v| <[u8; 16]>::try_from(v).ok());
            let referenced = id.is_some_and(|id| live.contains(&id) || sn.refs.contains_key(&id));
            if referenced {
                report.referenced += 1;
            } else if id.is_some() {
                let bytes = self
                    .store
                    .get(Kind::Chunk, n, crate::store::MAX_OBJECT)
                    .map(|d| d.len())
                    .unwrap_or(0);
                if self.store.delete(Kind::Chunk, n).is_ok() {
                    report.chunks_removed += 1;
                    report.bytes_removed += bytes as u64;
                }
            }
            if i % 1024 == 0 {
                progress(i as u64, total);
            }
        }
        progress(total, total);
        for n in &metas {
            let stale = parse_seq(n, "journal").is_some_and(|s| s <= ckpt || s > seq)
                || parse_seq(n, "checkpoint").is_some_and(|s| s != ckpt)
                || parse_seq(n, "snapshot").is_some_and(|id| !sn.list.iter().any(|s| s.id == id));
            if stale && self.store.delete(Kind::Meta, n).is_ok() {
                report.meta_removed += 1;
            }
        }
        drop(sn);
        self.snaps.write().last_gc = report.to_line();
        Ok(report)
    }

    // ----- the virtual namespace (called from the FUSE-facing methods) --

    fn snapdir_attr(&self) -> Attr {
        let st = self.state.lock();
        let mut a = st
            .get(ROOT_INO)
            .map(|r| r.attr(ROOT_INO))
            .expect("the root exists");
        a.ino = SNAPDIR_INO;
        a.perm = 0o755;
        a.nlink = 2 + self.snaps.read().list.len() as u32;
        a.size = 4096;
        a.blocks = 8;
        a
    }

    fn snap_attr(&self, slot: u16, ino: u64) -> FsResult<Attr> {
        let sn = self.snaps.read();
        let s = sn.by_slot(slot)?;
        Ok(record_attr(join(slot, ino), s.get(ino)?))
    }

    /// Lookup in the virtual namespace; None when it is a live lookup.
    pub(crate) fn virt_lookup(&self, parent: u64, name: &[u8]) -> Option<FsResult<Attr>> {
        match split(parent) {
            Virt::Live(ROOT_INO) if name == SNAPDIR_NAME && self.snapdir_visible() => {
                Some(Ok(self.snapdir_attr()))
            }
            Virt::Live(_) => None,
            Virt::SnapDir => {
                let slot = self.snaps.read().by_name(name).map(|s| s.slot);
                Some(match slot {
                    Some(slot) => self.snap_attr(slot, ROOT_INO),
                    None => Err(FsError::NOENT),
                })
            }
            Virt::Snap(slot, ino) => Some((|| {
                let sn = self.snaps.read();
                let s = sn.by_slot(slot)?;
                let RecordData::Dir { entries, .. } = &s.get(ino)?.data else {
                    return Err(FsError::NOTDIR);
                };
                let child = entries
                    .binary_search_by(|(n, _)| n.as_slice().cmp(name))
                    .map(|i| entries[i].1)
                    .map_err(|_| FsError::NOENT)?;
                Ok(record_attr(join(slot, child), s.get(child)?))
            })()),
        }
    }

    /// getattr in the virtual namespace.
    pub(crate) fn virt_getattr(&self, ino: u64) -> FsResult<Attr> {
        match split(ino) {
            Virt::SnapDir if self.snapdir_visible() => Ok(self.snapdir_attr()),
            Virt::Snap(slot, i) => self.snap_attr(slot, i),
            _ => Err(FsError::NOENT),
        }
    }

    /// readdir in the virtual namespace.
    pub(crate) fn virt_readdir(&self, ino: u64) -> FsResult<Vec<(u64, FileKind, Vec<u8>)>> {
        let sn = self.snaps.read();
        match split(ino) {
            Virt::SnapDir => {
                let mut out = vec![
                    (SNAPDIR_INO, FileKind::Dir, b".".to_vec()),
                    (ROOT_INO, FileKind::Dir, b"..".to_vec()),
                ];
                for s in &sn.list {
                    out.push((
                        join(s.slot, ROOT_INO),
                        FileKind::Dir,
                        s.body.name.as_bytes().to_vec(),
                    ));
                }
                Ok(out)
            }
            Virt::Snap(slot, i) => {
                let s = sn.by_slot(slot)?;
                let RecordData::Dir { parent, entries } = &s.get(i)?.data else {
                    return Err(FsError::NOTDIR);
                };
                let up = if i == ROOT_INO {
                    SNAPDIR_INO
                } else {
                    join(slot, *parent)
                };
                let mut out = vec![
                    (join(slot, i), FileKind::Dir, b".".to_vec()),
                    (up, FileKind::Dir, b"..".to_vec()),
                ];
                for (name, child) in entries {
                    let kind = s.get(*child).map(|r| r.kind).unwrap_or(FileKind::File);
                    out.push((join(slot, *child), kind, name.clone()));
                }
                Ok(out)
            }
            Virt::Live(_) => Err(FsError::NOENT),
        }
    }

    /// readlink in a snapshot.
    pub(crate) fn virt_readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let Virt::Snap(slot, i) = split(ino) else {
            return Err(FsError::INVAL);
        };
        let sn = self.snaps.read();
        match &sn.by_slot(slot)?.get(i)?.data {
            RecordData::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::INVAL),
        }
    }

    /// Read file content in a snapshot (needs the content key, like live
    /// content: a revoked key makes this EACCES).
    pub(crate) fn virt_read(&self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        let Virt::Snap(slot, i) = split(ino) else {
            return Err(FsError::ISDIR);
        };
        let _content = self.content_guard()?;
        let rec = {
            let sn = self.snaps.read();
            sn.by_slot(slot)?.get(i)?.clone()
        };
        if rec.kind != FileKind::File {
            return Err(super::not_a_file(rec.kind));
        }
        if off >= rec.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = (off + size as u64).min(rec.size);
        match &rec.data {
            RecordData::InlineFile(sealed) => {
                let keys = self.content_key.lock().clone().ok_or(FsError::ACCES)?;
                let plain = keys
                    .all()
                    .iter()
                    .find_map(|k| open_inline(k, &self.hdr.data_id, i, sealed).ok())
                    .ok_or_else(|| {
                        log::error!("snapshot inline content of inode {i} is damaged");
                        FsError::IO
                    })?;
                let plain = zeroize::Zeroizing::new(plain);
                let mut v = vec![0u8; (end - off) as usize];
                super::copy_window(&mut v, &plain, off as usize);
                Ok(v)
            }
            RecordData::ChunkedFile(chunks) => {
                let cs = self.hdr.chunk_size as u64;
                let mut out = Vec::with_capacity((end - off) as usize);
                let mut pos = off;
                while pos < end {
                    let idx = pos / cs;
                    let cstart = idx * cs;
                    let a = (pos - cstart) as usize;
                    let b = ((end - cstart).min(cs)) as usize;
                    let start = out.len();
                    out.resize(start + (b - a), 0);
                    if let Ok(k) = chunks.binary_search_by_key(&idx, |(n, _)| *n) {
                        let c = self.load_chunk(&chunks[k].1)?;
                        super::copy_window(&mut out[start..], &c, a);
                    }
                    pos = cstart + b as u64;
                }
                Ok(out)
            }
            _ => Err(FsError::INVAL),
        }
    }

    /// getxattr in the virtual namespace.
    pub(crate) fn virt_getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        match split(ino) {
            Virt::SnapDir if name == XATTR_GC => Ok(self.snaps.read().last_gc.clone().into_bytes()),
            Virt::SnapDir => Err(FsError::NODATA),
            Virt::Snap(slot, ROOT_INO) if name == XATTR_SNAPSHOT => {
                let sname = self.snaps.read().by_slot(slot)?.body.name.clone();
                self.snapshot_infos(Some(&sname))
                    .into_iter()
                    .next()
                    .map(|s| s.to_line().into_bytes())
                    .ok_or(FsError::NOENT)
            }
            Virt::Snap(slot, i) => {
                let sn = self.snaps.read();
                let r = sn.by_slot(slot)?.get(i)?;
                r.xattrs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .ok_or(FsError::NODATA)
            }
            Virt::Live(_) => Err(FsError::NOENT),
        }
    }

    /// listxattr in the virtual namespace.
    pub(crate) fn virt_listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        if let Virt::Snap(slot, i) = split(ino) {
            let sn = self.snaps.read();
            for (n, _) in &sn.by_slot(slot)?.get(i)?.xattrs {
                out.extend_from_slice(n);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// mkdir in `.snapshots`: take a snapshot.
    pub(crate) fn virt_mkdir(&self, parent: u64, name: &[u8]) -> Option<FsResult<Attr>> {
        if split(parent) != Virt::SnapDir {
            return None;
        }
        let r = std::str::from_utf8(name)
            .map_err(|_| FsError::INVAL)
            .and_then(|n| self.snapshot_create(n).map_err(|e| e.errno()))
            .and_then(|_| match self.virt_lookup(SNAPDIR_INO, name) {
                Some(r) => r,
                None => Err(FsError::NOENT),
            });
        Some(r)
    }

    /// rmdir in `.snapshots`: delete a snapshot.
    pub(crate) fn virt_rmdir(&self, parent: u64, name: &[u8]) -> Option<FsResult<()>> {
        if split(parent) != Virt::SnapDir {
            return None;
        }
        Some(
            std::str::from_utf8(name)
                .map_err(|_| FsError::NOENT)
                .and_then(|n| self.snapshot_delete(n).map(|_| ()).map_err(|e| e.errno())),
        )
    }

    /// setxattr on `.snapshots`: `user.sealfs.gc` runs gc.
    pub(crate) fn virt_setxattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if split(ino) == Virt::SnapDir && name == XATTR_GC {
            return self.gc(&mut |_, _| {}).map(|_| ()).map_err(|e| {
                log::error!("gc: {e}");
                e.errno()
            });
        }
        Err(FsError::ROFS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers() {
        assert_eq!(split(1), Virt::Live(1));
        assert_eq!(split(SNAPDIR_INO), Virt::SnapDir);
        assert_eq!(split(join(3, 77)), Virt::Snap(3, 77));
        assert!(is_virtual(SNAPDIR_INO) && is_virtual(join(1, 1)) && !is_virtual(1 << 40));
    }

    #[test]
    fn names_and_lines() {
        assert!(check_snapshot_name("nightly-2026.12.01").is_ok());
        for bad in ["", ".hidden", "a/b", "a@b", "x\n", &"n".repeat(129)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
        let i = SnapshotInfo {
            name: "n".into(),
            id: "00ff".into(),
            created: 5,
            seq: 9,
            referenced: 100,
            exclusive: 7,
        };
        assert_eq!(SnapshotInfo::from_line("n", &i.to_line()), Some(i));
        let g = GcReport {
            referenced: 1,
            chunks_removed: 2,
            bytes_removed: 3,
            meta_removed: 4,
        };
        assert_eq!(GcReport::from_line(&g.to_line()), Some(g));
    }
}
