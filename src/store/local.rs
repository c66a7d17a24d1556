//! The local-directory backend of [`ObjectStore`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{
    bad_name, valid_name, Holder, Kind, LockError, LogSegments, ObjectStore, Space, WriterLock,
};

/// The local-directory backend.
#[derive(Debug)]
pub struct LocalDirStore {
    root: PathBuf,
    root_fd: File,
    /// Deleted chunk files kept for reuse (see [`RECYCLE_DIR`]).
    recycle: parking_lot::Mutex<Recycle>,
}

/// Deleted chunk objects are renamed into this directory and reused for
/// new objects, instead of being unlinked and created again: ext4 spends
/// most of its time allocating and freeing inodes when many files are
/// replaced quickly. They are truncated to zero bytes when recycled.
pub const RECYCLE_DIR: &str = "recycle";
/// At most this many files are kept for reuse.
const RECYCLE_MAX: usize = 16384;

#[derive(Debug, Default)]
struct Recycle {
    free: Vec<PathBuf>,
    next: u64,
}

/// fsync a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".tmp-");
    tmp_name.push(file_name);
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

impl LocalDirStore {
    /// Lay out the directories of a new store under `root` (which must exist).
    pub fn init(root: &Path) -> io::Result<()> {
        let chunks = root.join("chunks");
        fs::create_dir_all(&chunks)?;
        for i in 0..=255u8 {
            fs::create_dir_all(chunks.join(format!("{i:02x}")))?;
        }
        fs::create_dir_all(root.join("meta"))?;
        fs::create_dir_all(root.join(RECYCLE_DIR))?;
        sync_dir(&chunks)?;
        sync_dir(root)
    }

    /// Open an existing store directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        let root_fd = File::open(root)?;
        for sub in ["chunks", "meta"] {
            if !root.join(sub).is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is missing", root.join(sub).display()),
                ));
            }
        }
        let rdir = root.join(RECYCLE_DIR);
        let mut recycle = Recycle::default();
        match fs::read_dir(&rdir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_prefix('r')) {
                        if let Ok(k) = n.parse::<u64>() {
                            recycle.next = recycle.next.max(k + 1);
                            recycle.free.push(e.path());
                        }
                    }
                }
            }
            Err(_) => {
                let _ = fs::create_dir_all(&rdir);
            }
        }
        Ok(LocalDirStore {
            root: root.to_path_buf(),
            root_fd,
            recycle: parking_lot::Mutex::new(recycle),
        })
    }

    /// The file of an object (for `sealfs clone`, which hard-links or
    /// copies immutable chunk objects into a new store).
    pub fn object_path(&self, kind: Kind, name: &str) -> io::Result<PathBuf> {
        self.path(kind, name)
    }

    fn path(&self, kind: Kind, name: &str) -> io::Result<PathBuf> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        Ok(match kind {
            Kind::Chunk => {
                if name.len() < 2 {
                    return Err(bad_name(name));
                }
                self.root.join("chunks").join(&name[..2]).join(name)
            }
            Kind::Meta => self.root.join("meta").join(name),
            Kind::Header => self.root.join(super::HEADER_NAME),
            Kind::Node => {
                if name.len() < 2 {
                    return Err(bad_name(name));
                }
                self.root.join("nodes").join(&name[..2]).join(name)
            }
        })
    }

    fn dirs(&self, kind: Kind) -> Vec<PathBuf> {
        match kind {
            Kind::Chunk => (0..=255u8)
                .map(|i| self.root.join("chunks").join(format!("{i:02x}")))
                .collect(),
            Kind::Meta => vec![self.root.join("meta")],
            Kind::Node => (0..=255u8)
                .map(|i| self.root.join("nodes").join(format!("{i:02x}")))
                .collect(),
            Kind::Header => vec![],
        }
    }
}

impl ObjectStore for LocalDirStore {
    fn put(&self, kind: Kind, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
        let p = self.path(kind, name)?;
        if durable {
            write_atomic(&p, data)
        } else {
            // Non-durable puts are only used for fresh, never-referenced
            // names: a crash can leave a partial object, but no committed
            // metadata points at it until after `sync`.
            if kind == Kind::Chunk {
                let reuse = self.recycle.lock().free.pop();
                if let Some(r) = reuse {
                    if fs::rename(&r, &p).is_err() {
                        let _ = fs::remove_file(&r);
                    }
                }
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)?;
            f.write_all(data)
        }
    }

    fn get(&self, kind: Kind, name: &str, _max_len: usize) -> io::Result<Vec<u8>> {
        fs::read(self.path(kind, name)?)
    }

    fn delete(&self, kind: Kind, name: &str) -> io::Result<()> {
        let p = self.path(kind, name)?;
        if kind == Kind::Chunk {
            let mut r = self.recycle.lock();
            if r.free.len() < RECYCLE_MAX {
                let to = self.root.join(RECYCLE_DIR).join(format!("r{}", r.next));
                r.next += 1;
                match fs::rename(&p, &to) {
                    Ok(()) => {
                        // A chunk hard-linked into a clone (`sealfs clone`)
                        // is shared: it must only be unlinked, never
                        // truncated and reused. Checked after the rename,
                        // so no new link can appear in between (a clone
                        // linking the old name now gets ENOENT).
                        use std::os::unix::fs::MetadataExt;
                        let shared = fs::metadata(&to).map(|m| m.nlink() > 1).unwrap_or(true);
                        if shared {
                            return match fs::remove_file(&to) {
                                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                                other => other,
                            };
                        }
                        // free the blocks now; keep the inode for reuse
                        let _ = OpenOptions::new()
                            .write(true)
                            .open(&to)
                            .and_then(|f| f.set_len(0));
                        r.free.push(to);
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(_) => {} // fall back to unlinking
                }
            }
        }
        match fs::remove_file(p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn list(&self, kind: Kind) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for d in self.dirs(kind) {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in rd {
                let e = e?;
                if let Some(n) = e.file_name().to_str() {
                    if valid_name(n) {
                        out.push(n.to_string());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn sync(&self) -> io::Result<()> {
        rustix::fs::syncfs(&self.root_fd).map_err(io::Error::from)
    }

    fn usage(&self, kind: Kind) -> io::Result<(u64, u64)> {
        let mut bytes = 0;
        let mut count = 0;
        for d in self.dirs(kind) {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    bytes += m.len();
                    count += 1;
                }
            }
        }
        Ok((bytes, count))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn space(&self) -> io::Result<Space> {
        let s = rustix::fs::fstatvfs(&self.root_fd).map_err(io::Error::from)?;
        Ok(Space {
            total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
            free_bytes: s.f_bfree.saturating_mul(s.f_frsize),
            avail_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            free_objects: s.f_ffree,
        })
    }

    fn log_append(&self, _seq: u64, _record: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "log: not yet"))
    }

    fn log_read(&self, _from: u64, _max_total: usize) -> io::Result<LogSegments> {
        Ok(Vec::new())
    }

    fn log_trim(&self, _upto: u64) -> io::Result<()> {
        Ok(())
    }

    fn lock(&self, _holder: &Holder, _force: bool) -> Result<Box<dyn WriterLock>, LockError> {
        Err(LockError::Io(io::Error::new(
            io::ErrorKind::Unsupported,
            "lock: not yet",
        )))
    }

    fn lock_holder(&self) -> io::Result<Option<Holder>> {
        Ok(None)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl LocalDirStore {
    /// Hard-link object `name` of `kind` from `src` into this store; false
    /// when the two are on different file systems.
    pub fn link_from(&self, src: &LocalDirStore, kind: Kind, name: &str) -> io::Result<bool> {
        let a = src.path(kind, name)?;
        let b = self.path(kind, name)?;
        match fs::hard_link(&a, &b) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let d = tempfile::tempdir().unwrap();
        LocalDirStore::init(d.path()).unwrap();
        let s = LocalDirStore::open(d.path()).unwrap();
        s.put(Kind::Chunk, "abcdef", b"x", false).unwrap();
        s.put(Kind::Meta, "journal-1", b"y", true).unwrap();
        s.sync().unwrap();
        assert_eq!(s.get(Kind::Chunk, "abcdef", 100).unwrap(), b"x");
        assert!(d.path().join("chunks/ab/abcdef").exists());
        assert_eq!(s.list(Kind::Chunk).unwrap(), vec!["abcdef"]);
        assert_eq!(s.list(Kind::Meta).unwrap(), vec!["journal-1"]);
        s.delete(Kind::Chunk, "abcdef").unwrap();
        s.delete(Kind::Chunk, "abcdef").unwrap();
        assert!(s.list(Kind::Chunk).unwrap().is_empty());
        // the deleted file is recycled for the next chunk
        assert_eq!(fs::read_dir(d.path().join(RECYCLE_DIR)).unwrap().count(), 1);
        s.put(Kind::Chunk, "cdef01", b"new", false).unwrap();
        assert_eq!(s.get(Kind::Chunk, "cdef01", 100).unwrap(), b"new");
        assert_eq!(fs::read_dir(d.path().join(RECYCLE_DIR)).unwrap().count(), 0);
        drop(s);
        let s = LocalDirStore::open(d.path()).unwrap();
        // a hard-linked chunk (shared with a clone) is unlinked, not recycled
        s.put(Kind::Chunk, "abcd02", b"shared", false).unwrap();
        let other = d.path().join("clone-of-abcd02");
        fs::hard_link(s.object_path(Kind::Chunk, "abcd02").unwrap(), &other).unwrap();
        s.delete(Kind::Chunk, "abcd02").unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"shared");
        assert_eq!(fs::read_dir(d.path().join(RECYCLE_DIR)).unwrap().count(), 0);
        assert!(s.put(Kind::Meta, "../evil", b"", true).is_err());
        assert!(s.put(Kind::Meta, ".hidden", b"", true).is_err());
        assert_eq!(s.usage(Kind::Meta).unwrap(), (1, 1));
    }
}
