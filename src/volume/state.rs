//! In-memory metadata of an open volume and its conversion to and from the
//! persisted records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::format::*;
use super::{Attr, FsError, FsResult, ROOT_INO};
use crate::crypto::{AeadKey, TAG_LEN};

/// Content of a regular file.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileData {
    /// Whole content when the file is small (len == size).
    pub inline: Option<Vec<u8>>,
    /// Inline content kept sealed (as in its record) because the content
    /// key is not available: revoked on a live mount, or destroyed.
    /// When set, `inline` is None and there are no chunks.
    pub sealed_inline: Option<Vec<u8>>,
    /// Chunks written to the store.
    pub chunks: BTreeMap<u64, ChunkRef>,
    /// Modified chunks not yet written (plaintext).
    pub dirty: BTreeMap<u64, Vec<u8>>,
    /// Chunks being encrypted and written outside the state lock:
    /// index -> (flush token, plaintext).
    pub flushing: BTreeMap<u64, (u64, Arc<Vec<u8>>)>,
}

impl FileData {
    /// Whether chunk `idx` holds data (stored, dirty or being written).
    pub fn present(&self, idx: u64) -> bool {
        self.chunks.contains_key(&idx)
            || self.dirty.contains_key(&idx)
            || self.flushing.contains_key(&idx)
    }

    /// Bytes of chunk `idx` that hold data (from its start; the rest of
    /// the chunk reads as zeros), or None if the chunk is a hole. The
    /// newest copy counts: dirty, then being written, then stored.
    pub fn data_len(&self, idx: u64) -> Option<u64> {
        if let Some(b) = self.dirty.get(&idx) {
            return Some(b.len() as u64);
        }
        if let Some((_, b)) = self.flushing.get(&idx) {
            return Some(b.len() as u64);
        }
        self.chunks.get(&idx).map(|r| r.len as u64)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum InodeData {
    File(FileData),
    Dir {
        parent: u64,
        entries: BTreeMap<Vec<u8>, u64>,
    },
    Symlink(Vec<u8>),
    Special,
}

#[derive(Debug, Clone)]
pub(crate) struct Inode {
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
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub data: InodeData,
}

impl Inode {
    pub fn new(kind: FileKind, perm: u16, uid: u32, gid: u32, rdev: u32, now: Timespec) -> Inode {
        let data = match kind {
            FileKind::File => InodeData::File(FileData {
                inline: Some(Vec::new()),
                ..Default::default()
            }),
            FileKind::Symlink => InodeData::Symlink(Vec::new()),
            FileKind::Dir => InodeData::Dir {
                parent: ROOT_INO,
                entries: BTreeMap::new(),
            },
            _ => InodeData::Special,
        };
        Inode {
            kind,
            perm,
            uid,
            gid,
            nlink: 1,
            rdev,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            xattrs: BTreeMap::new(),
            data,
        }
    }

    pub fn new_dir(parent: u64, perm: u16, uid: u32, gid: u32, now: Timespec) -> Inode {
        let mut i = Inode::new(FileKind::Dir, perm, uid, gid, 0, now);
        i.nlink = 2;
        i.data = InodeData::Dir {
            parent,
            entries: BTreeMap::new(),
        };
        i
    }

    /// Whether the inode belongs in persisted metadata (has a name).
    pub fn persistent(&self) -> bool {
        self.nlink > 0
    }

    pub fn attr(&self, ino: u64) -> Attr {
        let stored: u64 = match &self.data {
            InodeData::File(fd) => match &fd.inline {
                Some(v) => v.len() as u64,
                None if fd.sealed_inline.is_some() => self.size,
                None => {
                    let mut n: u64 = fd.chunks.values().map(|c| c.len as u64).sum();
                    let pending = fd.dirty.iter().map(|(k, b)| (k, b.len())).chain(
                        fd.flushing
                            .iter()
                            .filter(|(k, _)| !fd.dirty.contains_key(k))
                            .map(|(k, (_, b))| (k, b.len())),
                    );
                    for (k, len) in pending {
                        n += len as u64;
                        if let Some(c) = fd.chunks.get(k) {
                            n -= c.len as u64;
                        }
                    }
                    n
                }
            },
            InodeData::Dir { entries, .. } => 4096 + entries.len() as u64 * 64,
            InodeData::Symlink(t) => t.len() as u64,
            InodeData::Special => 0,
        };
        Attr {
            ino,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            size: if self.kind == FileKind::Dir {
                4096
            } else {
                self.size
            },
            blocks: stored.div_ceil(512),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
        }
    }

    /// A record without any inline content (used for the root of a new
    /// volume, which has none).
    pub fn to_record_plain(&self) -> InodeRecord {
        assert!(!matches!(self.data, InodeData::File(_)));
        self.record_with(match &self.data {
            InodeData::Dir { parent, entries } => RecordData::Dir {
                parent: *parent,
                entries: map_to_vec(entries),
            },
            InodeData::Symlink(t) => RecordData::Symlink(t.clone()),
            _ => RecordData::Special,
        })
    }

    /// The persisted form. Dirty chunks must have been flushed. Plaintext
    /// inline content needs the content key; while it is unavailable all
    /// inline content is held sealed (see [`FileData::sealed_inline`]).
    pub fn to_record(
        &self,
        ino: u64,
        content_key: Option<&AeadKey>,
        store_id: &[u8; 16],
    ) -> InodeRecord {
        let data = match &self.data {
            InodeData::File(fd) => {
                debug_assert!(
                    fd.dirty.is_empty() && fd.flushing.is_empty(),
                    "dirty chunks flushed before records"
                );
                match (&fd.inline, &fd.sealed_inline, content_key) {
                    (Some(v), _, Some(k)) => {
                        RecordData::InlineFile(seal_inline(k, store_id, ino, v))
                    }
                    (None, Some(sealed), _) => RecordData::InlineFile(sealed.clone()),
                    (Some(_), _, None) => {
                        // Unreachable by construction: revocation seals all
                        // inline content before dropping the key, and no
                        // content can be written without it.
                        unreachable!("plaintext inline content without a content key")
                    }
                    (None, None, _) => RecordData::ChunkedFile(map_to_vec(&fd.chunks)),
                }
            }
            InodeData::Dir { parent, entries } => RecordData::Dir {
                parent: *parent,
                entries: map_to_vec(entries),
            },
            InodeData::Symlink(t) => RecordData::Symlink(t.clone()),
            InodeData::Special => RecordData::Special,
        };
        self.record_with(data)
    }

    fn record_with(&self, data: RecordData) -> InodeRecord {
        InodeRecord {
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            rdev: self.rdev,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            xattrs: map_to_vec(&self.xattrs),
            data,
        }
    }

    pub fn from_record(
        ino: u64,
        r: InodeRecord,
        content_keys: &[&AeadKey],
        store_id: &[u8; 16],
    ) -> Result<Inode, FormatError> {
        let data = match (r.kind, r.data) {
            (FileKind::File, RecordData::InlineFile(sealed)) if content_keys.is_empty() => {
                InodeData::File(FileData {
                    sealed_inline: Some(sealed),
                    ..Default::default()
                })
            }
            (FileKind::File, RecordData::InlineFile(sealed)) => {
                // During a re-key, inline content may be under the
                // previous key: AEAD tells which one opens it.
                let mut opened = None;
                for k in content_keys {
                    if let Ok(v) = open_inline(k, store_id, ino, &sealed) {
                        opened = Some(v);
                        break;
                    }
                }
                let v = opened.ok_or_else(|| {
                    FormatError::Bad("inline file content failed authentication".into())
                })?;
                if v.len() as u64 != r.size {
                    return Err(FormatError::Bad(
                        "inline content does not match the file size".into(),
                    ));
                }
                InodeData::File(FileData {
                    inline: Some(v),
                    ..Default::default()
                })
            }
            (FileKind::File, RecordData::ChunkedFile(chunks)) => InodeData::File(FileData {
                inline: None,
                chunks: chunks.into_iter().collect(),
                ..Default::default()
            }),
            (FileKind::Dir, RecordData::Dir { parent, entries }) => InodeData::Dir {
                parent,
                entries: entries.into_iter().collect(),
            },
            (FileKind::Symlink, RecordData::Symlink(t)) => InodeData::Symlink(t),
            (
                FileKind::Fifo | FileKind::Socket | FileKind::CharDev | FileKind::BlockDev,
                RecordData::Special,
            ) => InodeData::Special,
            _ => return Err(FormatError::Bad("inode kind and content disagree".into())),
        };
        Ok(Inode {
            kind: r.kind,
            perm: r.perm,
            uid: r.uid,
            gid: r.gid,
            nlink: r.nlink,
            rdev: r.rdev,
            size: r.size,
            atime: r.atime,
            mtime: r.mtime,
            ctime: r.ctime,
            crtime: r.crtime,
            xattrs: r.xattrs.into_iter().collect(),
            data,
        })
    }
}

/// Mutable state of an open volume, behind one mutex.
#[derive(Debug)]
pub(crate) struct State {
    pub inodes: HashMap<u64, Inode>,
    pub next_ino: u64,
    /// Last committed sequence number.
    pub seq: u64,
    /// Tag the next journal record chains to.
    pub last_tag: [u8; TAG_LEN],
    /// `(seq, tag)` of recent commits, oldest first, up to and including
    /// `seq` (at most `format::HISTORY_MAX`); written into checkpoints.
    pub history: std::collections::VecDeque<(u64, [u8; TAG_LEN])>,
    pub ckpt_seq: u64,
    pub ckpt_bytes: u64,
    pub records_since_ckpt: u64,
    pub journal_bytes_since_ckpt: u64,
    /// Inodes changed since the last commit.
    pub dirty: BTreeSet<u64>,
    /// Inodes removed (or unlinked) since the last commit.
    pub deleted: BTreeSet<u64>,
    /// Chunk objects to delete after the next commit.
    pub pending_free: Vec<[u8; 16]>,
    /// Chunk objects (id, epoch) of removed files that no commit has
    /// referenced yet (epoch > seq): deleted right away when no commit is
    /// in flight, so that deleting files frees space on a full store.
    pub uncommitted_free: Vec<([u8; 16], u64)>,
    /// Open handles per inode.
    pub opens: HashMap<u64, u32>,
    /// Bytes held in dirty chunk buffers.
    pub dirty_bytes: usize,
    /// Chunk flushes running outside the lock.
    pub inflight: usize,
    /// Source of flush tokens.
    pub next_token: u64,
    /// A commit is waiting for in-flight flushes: start no new ones.
    pub commit_waiting: bool,
    /// The last chunk flush failed with this (the store is full, or
    /// failing): writes stop being buffered once dirty data reaches twice
    /// the limit.
    pub flush_error: Option<super::FsError>,
    /// Last attributes of inodes removed (unlinked and closed), which the
    /// kernel may still hold and write back times for (syncfs, writeback
    /// cache). Inode numbers are never reused; bounded.
    pub gone: lru::LruCache<u64, Attr>,
}

/// How many removed inodes' attributes are remembered.
pub const GONE_MAX: usize = 4096;

impl State {
    pub fn new() -> State {
        State {
            inodes: HashMap::new(),
            next_ino: ROOT_INO + 1,
            seq: 0,
            last_tag: [0; TAG_LEN],
            history: Default::default(),
            ckpt_seq: 0,
            ckpt_bytes: 0,
            records_since_ckpt: 0,
            journal_bytes_since_ckpt: 0,
            dirty: BTreeSet::new(),
            deleted: BTreeSet::new(),
            gone: lru::LruCache::new(std::num::NonZeroUsize::new(GONE_MAX).expect("non-zero")),
            pending_free: Vec::new(),
            uncommitted_free: Vec::new(),
            opens: HashMap::new(),
            dirty_bytes: 0,
            inflight: 0,
            next_token: 1,
            commit_waiting: false,
            flush_error: None,
        }
    }

    pub fn get(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(FsError::NOENT)
    }

    pub fn get_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(FsError::NOENT)
    }

    pub fn open_count(&self, ino: u64) -> u32 {
        self.opens.get(&ino).copied().unwrap_or(0)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        let p = self.get(parent)?;
        let InodeData::Dir {
            parent: pp,
            entries,
        } = &p.data
        else {
            return Err(FsError::NOTDIR);
        };
        if name == b"." {
            return Ok(parent);
        }
        if name == b".." {
            return Ok(*pp);
        }
        if name.len() > super::NAME_MAX {
            return Err(FsError::NAMETOOLONG);
        }
        entries.get(name).copied().ok_or(FsError::NOENT)
    }

    pub fn remove_entry(&mut self, parent: u64, name: &[u8], now: Timespec) -> FsResult<u64> {
        let p = self.get_mut(parent)?;
        let InodeData::Dir { entries, .. } = &mut p.data else {
            return Err(FsError::NOTDIR);
        };
        let ino = entries.remove(name).ok_or(FsError::NOENT)?;
        p.mtime = now;
        p.ctime = now;
        self.dirty.insert(parent);
        Ok(ino)
    }

    pub fn set_entry(&mut self, parent: u64, name: &[u8], ino: u64) {
        if let Some(p) = self.inodes.get_mut(&parent) {
            if let InodeData::Dir { entries, .. } = &mut p.data {
                entries.insert(name.to_vec(), ino);
            }
        }
        self.dirty.insert(parent);
    }

    pub fn set_parent(&mut self, dir: u64, parent: u64) {
        if let Some(d) = self.inodes.get_mut(&dir) {
            if let InodeData::Dir { parent: p, .. } = &mut d.data {
                *p = parent;
            }
        }
        self.dirty.insert(dir);
    }

    /// Whether `anc` is `ino` or one of its ancestors.
    pub fn is_ancestor(&self, anc: u64, mut ino: u64) -> bool {
        for _ in 0..100_000 {
            if ino == anc {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            match self.inodes.get(&ino).map(|i| &i.data) {
                Some(InodeData::Dir { parent, .. }) => ino = *parent,
                _ => return false,
            }
        }
        false
    }

    /// Path of an inode, found by walking the tree (for messages only).
    pub fn path_of(&self, target: u64) -> Option<String> {
        if target == ROOT_INO {
            return Some("/".into());
        }
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, path)) = stack.pop() {
            if let Some(InodeData::Dir { entries, .. }) = self.inodes.get(&ino).map(|i| &i.data) {
                for (name, &child) in entries {
                    let p = format!("{path}/{}", String::from_utf8_lossy(name));
                    if child == target {
                        return Some(p);
                    }
                    if matches!(self.inodes.get(&child).map(|i| i.kind), Some(FileKind::Dir)) {
                        stack.push((child, p));
                    }
                }
            }
        }
        None
    }
}
