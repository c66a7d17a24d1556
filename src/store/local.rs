//! The local-directory backend of [`ObjectStore`].
//!
//! The directory is hostile input: whoever prepared it may have planted
//! symlinks, FIFOs, device nodes, directories or huge sparse files where
//! objects belong. Every path below the store root is opened relative to a
//! directory handle without following any symlink (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or `O_NOFOLLOW` on every
//! component on kernels without `openat2`), with `O_NONBLOCK` so that a FIFO
//! never blocks, and is checked on the open handle to be a regular file of
//! a plausible size before a byte is read. Nothing is created, truncated or
//! renamed over until it is known to be a plain file inside the store:
//! new objects are created with `O_CREAT | O_EXCL`, temp files are unlinked
//! (never followed) before they are created, and recycled chunk files must
//! be single-link regular files.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{
    bad_name, valid_name, Holder, Kind, LockError, LogSegments, ObjectStore, Space, WriterLock,
};

/// The local-directory backend.
pub struct LocalDirStore {
    root: PathBuf,
    root_fd: OwnedFd,
    meta_fd: OwnedFd,
    chunks_fd: OwnedFd,
    recycle_fd: Option<OwnedFd>,
    /// Fan-out directories `chunks/xx`, opened on first use.
    fans: Box<[OnceLock<OwnedFd>]>,
    /// Deleted chunk files kept for reuse (see [`RECYCLE_DIR`]).
    recycle: parking_lot::Mutex<Recycle>,
}

impl std::fmt::Debug for LocalDirStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDirStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Deleted chunk objects are renamed into this directory and reused for
/// new objects, instead of being unlinked and created again: ext4 spends
/// most of its time allocating and freeing inodes when many files are
/// replaced quickly. They are truncated to zero bytes when recycled.
pub const RECYCLE_DIR: &str = "recycle";
/// At most this many files are kept for reuse.
const RECYCLE_MAX: usize = 16384;
/// The lock file (flock) and the lease (who holds it) at the store root.
pub const LOCK_NAME: &str = "lock";
pub const LEASE_NAME: &str = "lease";
/// Largest lease file.
const MAX_LEASE: usize = 4096;

#[derive(Debug, Default)]
struct Recycle {
    free: Vec<String>,
    next: u64,
}

/// fsync a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` atomically: temp file, fsync, rename, fsync dir.
/// For files sealfs owns outside any store (local state, keystore); inside
/// a store everything goes through [`LocalDirStore`]. The temp file is
/// created exclusively and never followed.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dfd = rfs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    atomic_in(dfd.as_fd(), name, data, 0o600).map_err(|e| at_path(path, e))
}

/// Atomically replace `name` in directory `dir` with `data`.
fn atomic_in(dir: BorrowedFd<'_>, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = format!(".tmp-{name}");
    // Whatever sits at the temp name (a torn earlier write, or a planted
    // link or FIFO) is unlinked, never opened.
    match rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rfs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let mut f = File::from(fd);
    let r = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    drop(f);
    // rename replaces the entry at `name` (a link there is replaced, not
    // followed); a directory there makes it fail
    if let Err(e) = rfs::renameat(dir, tmp.as_str(), dir, name) {
        let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        return Err(e.into());
    }
    rfs::fsync(dir)?;
    Ok(())
}

fn at_path(p: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// Open `rel` (relative, '/'-separated, made of object names) beneath
/// `dir` without following any symlink.
fn open_beneath(dir: BorrowedFd<'_>, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY;
    static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !NO_OPENAT2.load(std::sync::atomic::Ordering::Relaxed) {
        match rfs::openat2(
            dir,
            rel,
            flags,
            mode,
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::NOSYS) | Err(Errno::PERM) => {
                // no openat2 (old kernel, or a seccomp filter)
                NO_OPENAT2.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            r => return r.map_err(Into::into),
        }
    }
    let mut parts = rel.split('/').peekable();
    let mut cur: Option<OwnedFd> = None;
    while let Some(c) = parts.next() {
        if c.is_empty() || c == "." || c == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad path"));
        }
        let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
        if parts.peek().is_some() {
            cur = Some(rfs::openat(
                base,
                c,
                OFlags::RDONLY
                    | OFlags::DIRECTORY
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NONBLOCK,
                Mode::empty(),
            )?);
        } else {
            return Ok(rfs::openat(base, c, flags, mode)?);
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}

/// Open an existing entry of `dir` (one name, not a path) for reading or
/// writing, never following a link, never blocking on a FIFO, never
/// becoming a controlling terminal.
fn open_entry(dir: BorrowedFd<'_>, name: &str, access: OFlags) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
}

/// Open a file of `recycle/` for reuse, truncated to zero bytes: only a
/// single-link regular file qualifies (a chunk hard-linked into a clone is
/// shared and must never be truncated or rewritten; anything else was
/// planted). Checked by name first, so that no device node is opened, and
/// again on the open handle.
fn open_recyclable(dir: BorrowedFd<'_>, name: &str) -> Option<OwnedFd> {
    let plain = |st: &rfs::Stat| {
        FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_nlink == 1
    };
    if !rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| plain(&st)) {
        return None;
    }
    let fd = open_entry(dir, name, OFlags::WRONLY).ok()?;
    if !rfs::fstat(&fd).is_ok_and(|st| plain(&st)) {
        return None;
    }
    rfs::ftruncate(&fd, 0).ok()?;
    Some(fd)
}

fn type_word(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "an unknown kind of file",
    }
}

/// Why a store entry cannot be used, as an `InvalidData` error naming it.
fn refused(root: &Path, rel: &str, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}/{rel} {why}; a store holds only plain files and directories it made (refusing to use it)",
            root.display()
        ),
    )
}

/// Name the entry in an error from opening it.
fn open_err(root: &Path, rel: &str, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => {
            refused(root, rel, "is or passes through a symbolic link".into())
        }
        Some(libc::ENXIO) => refused(root, rel, "is a FIFO or socket".into()),
        Some(libc::ENOTDIR) => refused(root, rel, "has a non-directory on its path".into()),
        Some(libc::EISDIR) => refused(root, rel, "is a directory".into()),
        _ => io::Error::new(e.kind(), format!("{}/{rel}: {e}", root.display())),
    }
}

/// Check that an open handle is a regular file of at most `max` bytes;
/// returns its size.
fn check_file(root: &Path, rel: &str, fd: BorrowedFd<'_>, max: usize) -> io::Result<u64> {
    let st = rfs::fstat(fd).map_err(|e| open_err(root, rel, e.into()))?;
    let t = FileType::from_raw_mode(st.st_mode);
    if t != FileType::RegularFile {
        return Err(refused(root, rel, format!("is {}", type_word(t))));
    }
    let size = st.st_size.max(0) as u64;
    if size > max as u64 {
        return Err(refused(
            root,
            rel,
            format!("is {size} bytes, more than the {max} such an object can be"),
        ));
    }
    Ok(size)
}

/// Read a whole regular file of at most `max` bytes from an open handle.
fn read_checked(root: &Path, rel: &str, fd: OwnedFd, max: usize) -> io::Result<Vec<u8>> {
    let size = check_file(root, rel, fd.as_fd(), max)?;
    let mut out = Vec::with_capacity(size as usize);
    // (a file that grows while it is read is cut at max + 1 and refused)
    File::from(fd)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| open_err(root, rel, e))?;
    if out.len() > max {
        return Err(refused(root, rel, format!("grew past {max} bytes")));
    }
    Ok(out)
}

impl LocalDirStore {
    /// Lay out the directories of a new store under `root` (which must
    /// exist and be empty).
    pub fn init(root: &Path) -> io::Result<()> {
        let rfd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| at_path(root, e.into()))?;
        for sub in ["chunks", "meta", RECYCLE_DIR] {
            rfs::mkdirat(&rfd, sub, Mode::from_raw_mode(0o700))
                .map_err(|e| at_path(&root.join(sub), e.into()))?;
        }
        let chunks = open_beneath(rfd.as_fd(), "chunks", OFlags::DIRECTORY, Mode::empty())?;
        for i in 0..=255u8 {
            rfs::mkdirat(&chunks, format!("{i:02x}"), Mode::from_raw_mode(0o700))?;
        }
        rfs::fsync(&chunks)?;
        rfs::fsync(&rfd)?;
        Ok(())
    }

    /// Open an existing store directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        let root_fd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| at_path(root, e.into()))?;
        let dir = |rel: &str| {
            open_beneath(
                root_fd.as_fd(),
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| open_err(root, rel, e))
        };
        let meta_fd = dir("meta")?;
        let chunks_fd = dir("chunks")?;
        let recycle_fd = match dir(RECYCLE_DIR) {
            Ok(fd) => Some(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // (a store copied by a tool that drops empty directories)
                match rfs::mkdirat(&root_fd, RECYCLE_DIR, Mode::from_raw_mode(0o700)) {
                    Ok(()) => dir(RECYCLE_DIR).ok(),
                    Err(_) => None,
                }
            }
            Err(e) => {
                // (recycling is an optimisation: without it, chunks are
                // created and unlinked)
                log::warn!("{e}; not reusing deleted chunk files");
                None
            }
        };
        let mut recycle = Recycle::default();
        if let Some(rfd) = &recycle_fd {
            for (name, t) in list_dir(rfd.as_fd())? {
                if t != FileType::RegularFile {
                    continue;
                }
                if let Some(k) = name.strip_prefix('r').and_then(|n| n.parse::<u64>().ok()) {
                    recycle.next = recycle.next.max(k.saturating_add(1));
                    if recycle.free.len() < RECYCLE_MAX {
                        recycle.free.push(name);
                    }
                }
            }
        }
        Ok(LocalDirStore {
            root: root.to_path_buf(),
            root_fd,
            meta_fd,
            chunks_fd,
            recycle_fd,
            fans: (0..256).map(|_| OnceLock::new()).collect(),
            recycle: parking_lot::Mutex::new(recycle),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory an object of `kind` named `name` lives in, its path
    /// relative to the root (for messages), and the name within it. With
    /// `create`, a missing fan-out directory is made.
    fn locate<'a>(
        &'a self,
        kind: Kind,
        name: &'a str,
        create: bool,
    ) -> io::Result<(DirRef<'a>, String)> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match kind {
            Kind::Header => {
                if name != super::HEADER_NAME {
                    return Err(bad_name(name));
                }
                Ok((DirRef::Borrowed(self.root_fd.as_fd()), name.to_string()))
            }
            Kind::Meta => Ok((
                DirRef::Borrowed(self.meta_fd.as_fd()),
                format!("meta/{name}"),
            )),
            Kind::Chunk => {
                if name.len() < 2 || !name.is_char_boundary(2) {
                    return Err(bad_name(name));
                }
                let fan = &name[..2];
                let rel = format!("chunks/{fan}/{name}");
                let Ok(i) = u8::from_str_radix(fan, 16) else {
                    return Err(bad_name(name));
                };
                if fan.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(bad_name(name));
                }
                let slot = &self.fans[i as usize];
                if let Some(fd) = slot.get() {
                    return Ok((DirRef::Borrowed(fd.as_fd()), rel));
                }
                let open = || {
                    open_beneath(
                        self.chunks_fd.as_fd(),
                        fan,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
                        Mode::empty(),
                    )
                };
                let fd = match open() {
                    Ok(fd) => fd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                        match rfs::mkdirat(&self.chunks_fd, fan, Mode::from_raw_mode(0o700)) {
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => {
                                return Err(open_err(
                                    &self.root,
                                    &format!("chunks/{fan}"),
                                    e.into(),
                                ))
                            }
                        }
                        open().map_err(|e| open_err(&self.root, &format!("chunks/{fan}"), e))?
                    }
                    Err(e) => return Err(open_err(&self.root, &format!("chunks/{fan}"), e)),
                };
                let _ = slot.set(fd);
                Ok((DirRef::Borrowed(slot.get().expect("set").as_fd()), rel))
            }
            Kind::Node => {
                // nodes/xx/<name>, opened per call (not used by format 3)
                if name.len() < 2 || !name.is_char_boundary(2) {
                    return Err(bad_name(name));
                }
                let fan = format!("nodes/{}", &name[..2]);
                let rel = format!("{fan}/{name}");
                let fd = match open_beneath(
                    self.root_fd.as_fd(),
                    &fan,
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                        for d in ["nodes", fan.as_str()] {
                            match rfs::mkdirat(&self.root_fd, d, Mode::from_raw_mode(0o700)) {
                                Ok(()) | Err(Errno::EXIST) => {}
                                Err(e) => return Err(open_err(&self.root, d, e.into())),
                            }
                        }
                        open_beneath(
                            self.root_fd.as_fd(),
                            &fan,
                            OFlags::RDONLY | OFlags::DIRECTORY,
                            Mode::empty(),
                        )
                        .map_err(|e| open_err(&self.root, &fan, e))?
                    }
                    Err(e) => return Err(open_err(&self.root, &fan, e)),
                };
                Ok((DirRef::Owned(fd), rel))
            }
        }
    }

    /// Create a fresh object file exclusively and write `data` into it.
    fn create_fresh(
        &self,
        dir: BorrowedFd<'_>,
        rel: &str,
        name: &str,
        data: &[u8],
    ) -> io::Result<()> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => {
                // a torn earlier write of this fresh name, or something
                // planted there: remove the entry (never followed)
                rfs::unlinkat(dir, name, AtFlags::empty())
                    .map_err(|e| open_err(&self.root, rel, e.into()))?;
                rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600))
                    .map_err(|e| open_err(&self.root, rel, e.into()))?
            }
            Err(e) => return Err(open_err(&self.root, rel, e.into())),
        };
        File::from(fd)
            .write_all(data)
            .map_err(|e| open_err(&self.root, rel, e))
    }

    /// Reuse a recycled chunk file for a fresh object: it must be a
    /// single-link regular file inside the store. False when there is none
    /// (or it cannot be used; it is then unlinked).
    fn put_recycled(&self, dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> bool {
        let Some(rfd) = &self.recycle_fd else {
            return false;
        };
        let Some(r) = self.recycle.lock().free.pop() else {
            return false;
        };
        let usable = (|| -> io::Result<()> {
            let fd = open_recyclable(rfd.as_fd(), &r)
                .ok_or_else(|| io::Error::other("not a plain file"))?;
            File::from(fd).write_all(data)?;
            rfs::renameat_with(rfd, r.as_str(), dir, name, rfs::RenameFlags::NOREPLACE)?;
            Ok(())
        })();
        if usable.is_err() {
            let _ = rfs::unlinkat(rfd, r.as_str(), AtFlags::empty());
            return false;
        }
        true
    }

    /// Remove temp files left by torn atomic writes (`meta/.tmp-*` and the
    /// header's); entries are unlinked, never followed.
    pub fn remove_temps(&self) -> io::Result<()> {
        for dir in [self.meta_fd.as_fd(), self.root_fd.as_fd()] {
            for (name, _) in list_dir_all(dir)? {
                if name.starts_with(".tmp-") {
                    let _ = rfs::unlinkat(dir, name.as_str(), AtFlags::empty());
                }
            }
        }
        Ok(())
    }

    /// Hard-link object `name` of `kind` from `src` into this store; false
    /// when the two are on different file systems. Only plain single-store
    /// files are linked (the source is checked on its open handle first).
    pub fn link_from(&self, src: &LocalDirStore, kind: Kind, name: &str) -> io::Result<bool> {
        let (sdir, srel) = src.locate(kind, name, false)?;
        let (ddir, _drel) = self.locate(kind, name, true)?;
        let base = srel.rsplit('/').next().unwrap_or(name);
        // check what is there before linking it (linkat never follows a
        // symlink without AT_SYMLINK_FOLLOW, but would link a FIFO)
        let fd = open_entry(sdir.fd(), base, OFlags::RDONLY)
            .map_err(|e| open_err(&src.root, &srel, e.into()))?;
        check_file(&src.root, &srel, fd.as_fd(), super::MAX_OBJECT)?;
        match rfs::linkat(sdir.fd(), base, ddir.fd(), base, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::XDEV) => Ok(false),
            Err(e) => Err(open_err(&self.root, &srel, e.into())),
        }
    }

    /// Whether another process holds the flock on the lock file (a plain
    /// file; anything else reads as not held).
    pub fn lock_file_held(&self) -> bool {
        let Ok(fd) = open_beneath(
            self.root_fd.as_fd(),
            LOCK_NAME,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        ) else {
            return false;
        };
        if check_file(&self.root, LOCK_NAME, fd.as_fd(), usize::MAX).is_err() {
            return false;
        }
        rfs::flock(&fd, rfs::FlockOperation::NonBlockingLockShared).is_err()
    }

    fn read_lease(&self) -> io::Result<Option<Holder>> {
        read_lease_at(&self.root, self.root_fd.as_fd())
    }
}

fn read_lease_at(root: &Path, dir: BorrowedFd<'_>) -> io::Result<Option<Holder>> {
    let fd = match open_beneath(
        dir,
        LEASE_NAME,
        OFlags::RDONLY | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(open_err(root, LEASE_NAME, e)),
    };
    let data = read_checked(root, LEASE_NAME, fd, MAX_LEASE)?;
    match serde_json::from_slice::<Holder>(&data) {
        Ok(h) => Ok(Some(h)),
        Err(_) => {
            log::warn!(
                "{}/{LEASE_NAME} is not a lease sealfs wrote; ignoring it",
                root.display()
            );
            Ok(None)
        }
    }
}

enum DirRef<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl DirRef<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            DirRef::Borrowed(b) => *b,
            DirRef::Owned(o) => o.as_fd(),
        }
    }
}

/// Valid object names in a directory with their types (symlinks and other
/// non-files included, for the caller to skip).
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(String, FileType)>> {
    Ok(list_dir_all(dir)?
        .into_iter()
        .filter(|(n, _)| valid_name(n))
        .collect())
}

/// Every entry of a directory but `.` and `..`, with its type (from
/// `d_type`, or `fstatat` without following when the file system does not
/// say).
fn list_dir_all(dir: BorrowedFd<'_>) -> io::Result<Vec<(String, FileType)>> {
    let mut out = Vec::new();
    for e in rfs::Dir::read_from(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().to_str() else {
            continue;
        };
        if name == "." || name == ".." {
            continue;
        }
        let mut t = e.file_type();
        if t == FileType::Unknown {
            t = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|s| FileType::from_raw_mode(s.st_mode))
                .unwrap_or(FileType::Unknown);
        }
        out.push((name.to_string(), t));
    }
    Ok(out)
}

impl ObjectStore for LocalDirStore {
    fn put(&self, kind: Kind, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
        let (dir, rel) = self.locate(kind, name, true)?;
        if durable || kind == Kind::Header {
            return atomic_in(dir.fd(), name, data, 0o600)
                .map_err(|e| open_err(&self.root, &rel, e));
        }
        // Non-durable puts are only used for fresh, never-referenced
        // names: a crash can leave a partial object, but no committed
        // metadata points at it until after `sync`.
        if kind == Kind::Chunk && self.put_recycled(dir.fd(), name, data) {
            return Ok(());
        }
        self.create_fresh(dir.fd(), &rel, name, data)
    }

    fn get(&self, kind: Kind, name: &str, max_len: usize) -> io::Result<Vec<u8>> {
        let (dir, rel) = self.locate(kind, name, false)?;
        let fd = open_entry(dir.fd(), name, OFlags::RDONLY)
            .map_err(|e| open_err(&self.root, &rel, e.into()))?;
        read_checked(&self.root, &rel, fd, max_len.min(super::MAX_OBJECT))
    }

    fn delete(&self, kind: Kind, name: &str) -> io::Result<()> {
        let (dir, rel) = match self.locate(kind, name, false) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if kind == Kind::Chunk {
            if let Some(rfd) = &self.recycle_fd {
                let mut r = self.recycle.lock();
                if r.free.len() < RECYCLE_MAX {
                    let to = format!("r{}", r.next);
                    r.next = r.next.saturating_add(1);
                    match rfs::renameat(dir.fd(), name, rfd, to.as_str()) {
                        Ok(()) => {
                            // Only a single-link regular file is kept for
                            // reuse: a chunk hard-linked into a clone
                            // (`sealfs clone`) is shared and must only be
                            // unlinked, never truncated; anything that is
                            // not a plain file is unlinked too. Checked
                            // after the rename, so no new link can appear
                            // in between (a clone linking the old name now
                            // gets ENOENT).
                            if open_recyclable(rfd.as_fd(), &to).is_some() {
                                r.free.push(to);
                                return Ok(());
                            }
                            return match rfs::unlinkat(rfd, to.as_str(), AtFlags::empty()) {
                                Ok(()) | Err(Errno::NOENT) => Ok(()),
                                Err(e) => Err(open_err(&self.root, &rel, e.into())),
                            };
                        }
                        Err(Errno::NOENT) => return Ok(()),
                        Err(_) => {} // fall back to unlinking
                    }
                }
            }
        }
        match rfs::unlinkat(dir.fd(), name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(open_err(&self.root, &rel, e.into())),
        }
    }

    fn list(&self, kind: Kind) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        // Every validly named entry is listed, whatever it is: a caller
        // must see that an object of that name exists (a snapshot manifest
        // that cannot be read still holds its chunks); reading it then
        // fails with a clear error.
        let mut add = |dir: BorrowedFd<'_>| -> io::Result<()> {
            for (n, _) in list_dir(dir)? {
                out.push(n);
            }
            Ok(())
        };
        match kind {
            Kind::Header => {}
            Kind::Meta => add(self.meta_fd.as_fd())?,
            Kind::Chunk => {
                for (fan, t) in list_dir_all(self.chunks_fd.as_fd())? {
                    if t != FileType::Directory || fan.len() != 2 {
                        continue;
                    }
                    let fd = open_beneath(
                        self.chunks_fd.as_fd(),
                        &fan,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
                        Mode::empty(),
                    )
                    .map_err(|e| open_err(&self.root, &format!("chunks/{fan}"), e))?;
                    add(fd.as_fd())?;
                }
            }
            Kind::Node => {
                let nodes = match open_beneath(
                    self.root_fd.as_fd(),
                    "nodes",
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(open_err(&self.root, "nodes", e)),
                };
                for (fan, t) in list_dir_all(nodes.as_fd())? {
                    if t != FileType::Directory || fan.len() != 2 {
                        continue;
                    }
                    let fd = open_beneath(
                        nodes.as_fd(),
                        &fan,
                        OFlags::RDONLY | OFlags::DIRECTORY,
                        Mode::empty(),
                    )
                    .map_err(|e| open_err(&self.root, &format!("nodes/{fan}"), e))?;
                    add(fd.as_fd())?;
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn sync(&self) -> io::Result<()> {
        rfs::syncfs(&self.root_fd).map_err(io::Error::from)
    }

    fn usage(&self, kind: Kind) -> io::Result<(u64, u64)> {
        let mut bytes = 0;
        let mut count = 0;
        for n in self.list(kind)? {
            let Ok((dir, _)) = self.locate(kind, &n, false) else {
                continue;
            };
            if let Ok(st) = rfs::statat(dir.fd(), n.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                    bytes += st.st_size.max(0) as u64;
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
        let s = rfs::fstatvfs(&self.root_fd).map_err(io::Error::from)?;
        Ok(Space {
            total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
            free_bytes: s.f_bfree.saturating_mul(s.f_frsize),
            avail_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            free_objects: s.f_ffree,
        })
    }

    fn log_append(&self, _seq: u64, _record: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "store format 3 keeps its journal as metadata objects",
        ))
    }

    fn log_read(&self, _from: u64, _max_total: usize) -> io::Result<LogSegments> {
        Ok(Vec::new())
    }

    fn log_trim(&self, _upto: u64) -> io::Result<()> {
        Ok(())
    }

    fn remove_temps(&self) -> io::Result<()> {
        LocalDirStore::remove_temps(self)
    }

    fn lock(&self, holder: &Holder, force: bool) -> Result<Box<dyn WriterLock>, LockError> {
        let fd = open_beneath(
            self.root_fd.as_fd(),
            LOCK_NAME,
            OFlags::RDWR | OFlags::CREATE | OFlags::NONBLOCK,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| open_err(&self.root, LOCK_NAME, e))?;
        // (a lock file is empty; any size is fine, it is never read)
        check_file(&self.root, LOCK_NAME, fd.as_fd(), usize::MAX)?;
        // One writer per process too: a second open of the same store in
        // this process is refused even if the lock file was replaced.
        let st = rfs::fstat(&self.root_fd).map_err(io::Error::from)?;
        let key = (st.st_dev as u64, st.st_ino as u64);
        if let Some(what) = HELD.lock().get(&key) {
            return Err(LockError::Held(format!(" by {what:?} (this process)")));
        }
        match rfs::flock(&fd, rfs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let who = match self.read_lease() {
                    Ok(Some(h)) => format!(" by {}", h.describe()),
                    _ => String::new(),
                };
                return Err(LockError::Held(who));
            }
            Err(e) => return Err(LockError::Io(open_err(&self.root, LOCK_NAME, e.into()))),
        }
        // The flock alone is not enough: the lock file may have been
        // deleted or replaced under a live holder. The lease says who
        // holds the store.
        if let Some(h) = self.read_lease()? {
            if !h.same_process(holder) {
                super::judge_lease(&self.location(), &h, holder, force)?;
            }
        }
        let root_fd = self.root_fd.try_clone().map_err(LockError::Io)?;
        HELD.lock().insert(key, holder.what.clone());
        Ok(Box::new(LocalLock {
            key,
            _flock: fd,
            root: self.root.clone(),
            root_fd,
            holder: parking_lot::Mutex::new(holder.clone()),
            lost: std::sync::atomic::AtomicBool::new(false),
            claimed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn lock_holder(&self) -> io::Result<Option<Holder>> {
        self.read_lease()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A held lock of a local store: the flock on `lock` and the lease.
struct LocalLock {
    key: (u64, u64),
    _flock: OwnedFd,
    root: PathBuf,
    root_fd: OwnedFd,
    holder: parking_lot::Mutex<Holder>,
    lost: std::sync::atomic::AtomicBool,
    /// The lease was written (by the first `renew`).
    claimed: std::sync::atomic::AtomicBool,
}

impl WriterLock for LocalLock {
    fn renew(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        let mut me = self.holder.lock();
        if !self.claimed.load(Ordering::Relaxed) {
            // the first renewal writes the lease over what `lock` judged
            // could be taken over
            me.taken = super::unix_now();
            me.renewed = me.taken;
            let lease = serde_json::to_vec_pretty(&*me).map_err(io::Error::other)?;
            atomic_in(self.root_fd.as_fd(), LEASE_NAME, &lease, 0o644)
                .map_err(|e| open_err(&self.root, LEASE_NAME, e))?;
            self.claimed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        match read_lease_at(&self.root, self.root_fd.as_fd()) {
            Ok(Some(h)) if !h.same_process(&me) => {
                self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(io::Error::other(format!(
                    "the lease of {} was taken over by {}",
                    self.root.display(),
                    h.describe()
                )));
            }
            // ours, or deleted (written again), or unreadable (replaced)
            _ => {}
        }
        me.renewed = super::unix_now();
        let lease = serde_json::to_vec_pretty(&*me).map_err(io::Error::other)?;
        atomic_in(self.root_fd.as_fd(), LEASE_NAME, &lease, 0o644)
            .map_err(|e| open_err(&self.root, LEASE_NAME, e))
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Stores (device, inode of the root) locked by this process, and what for.
static HELD: std::sync::LazyLock<
    parking_lot::Mutex<std::collections::HashMap<(u64, u64), String>>,
> = std::sync::LazyLock::new(Default::default);

impl Drop for LocalLock {
    fn drop(&mut self) {
        HELD.lock().remove(&self.key);
        let me = self.holder.lock();
        if let Ok(Some(h)) = read_lease_at(&self.root, self.root_fd.as_fd()) {
            if h.same_process(&me) {
                let _ = rfs::unlinkat(&self.root_fd, LEASE_NAME, AtFlags::empty());
                let _ = rfs::fsync(&self.root_fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
        fs::hard_link(d.path().join("chunks/ab/abcd02"), &other).unwrap();
        s.delete(Kind::Chunk, "abcd02").unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"shared");
        assert_eq!(fs::read_dir(d.path().join(RECYCLE_DIR)).unwrap().count(), 0);
        assert!(s.put(Kind::Meta, "../evil", b"", true).is_err());
        assert!(s.put(Kind::Meta, ".hidden", b"", true).is_err());
        assert_eq!(s.usage(Kind::Meta).unwrap(), (1, 1));
        // a missing fan-out directory is made on the first put into it
        fs::remove_dir(d.path().join("chunks/ff")).unwrap();
        s.put(Kind::Chunk, "ff0001", b"f", false).unwrap();
        assert_eq!(s.get(Kind::Chunk, "ff0001", 10).unwrap(), b"f");
    }

    /// Every kind of planted entry is refused by name and nothing outside
    /// the store is read or written.
    #[test]
    fn planted_entries_are_refused_and_never_followed() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        fs::create_dir(&root).unwrap();
        LocalDirStore::init(&root).unwrap();
        let canary = d.path().join("canary");
        fs::write(&canary, b"canary").unwrap();
        let s = LocalDirStore::open(&root).unwrap();
        // a symlinked chunk, meta object and header are refused on read
        symlink(&canary, root.join("chunks/ab/ab01")).unwrap();
        symlink(&canary, root.join("meta/journal-9")).unwrap();
        symlink(&canary, root.join("sealfs.store")).unwrap();
        for (k, n) in [
            (Kind::Chunk, "ab01"),
            (Kind::Meta, "journal-9"),
            (Kind::Header, "sealfs.store"),
        ] {
            let e = s.get(k, n, 1 << 20).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        // they are listed (something of that name exists), and deleting
        // unlinks the link only
        assert_eq!(s.list(Kind::Chunk).unwrap(), vec!["ab01"]);
        assert_eq!(s.list(Kind::Meta).unwrap(), vec!["journal-9"]);
        s.delete(Kind::Chunk, "ab01").unwrap();
        // a FIFO does not hang, and is named
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("meta/journal-8").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = s.get(Kind::Meta, "journal-8", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(e.to_string().contains("meta/journal-8"), "{e}");
        // an oversized (sparse) object is refused before it is read
        let big = File::create(root.join("meta/checkpoint-1")).unwrap();
        big.set_len(1 << 40).unwrap();
        let e = s.get(Kind::Meta, "checkpoint-1", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // a directory in place of an object
        fs::create_dir(root.join("meta/journal-7")).unwrap();
        let e = s.get(Kind::Meta, "journal-7", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        // durable writes replace a planted temp link instead of following it
        symlink(&canary, root.join("meta/.tmp-journal-5")).unwrap();
        s.put(Kind::Meta, "journal-5", b"rec", true).unwrap();
        symlink(&canary, root.join(".tmp-sealfs.store")).unwrap();
        s.put(Kind::Header, "sealfs.store", b"hdr", true).unwrap();
        assert_eq!(s.get(Kind::Header, "sealfs.store", 100).unwrap(), b"hdr");
        // a fresh object over a planted link
        symlink(&canary, root.join("chunks/cd/cd02")).unwrap();
        s.put(Kind::Chunk, "cd02", b"data", false).unwrap();
        assert_eq!(s.get(Kind::Chunk, "cd02", 100).unwrap(), b"data");
        // a recycled file that is a link is not written through
        drop(s);
        symlink(&canary, root.join("recycle/r0")).unwrap();
        let s = LocalDirStore::open(&root).unwrap();
        s.put(Kind::Chunk, "ef03", b"chunk", false).unwrap();
        assert_eq!(s.get(Kind::Chunk, "ef03", 100).unwrap(), b"chunk");
        // a fan-out directory that is a link
        fs::remove_dir(root.join("chunks/12")).unwrap();
        symlink(d.path(), root.join("chunks/12")).unwrap();
        assert!(s.put(Kind::Chunk, "12ab", b"x", false).is_err());
        let e = s.get(Kind::Chunk, "12ab", 100).unwrap_err();
        assert!(e.to_string().contains("chunks/12"), "{e}");
        // the lock file as a link
        symlink(&canary, root.join("lock")).unwrap();
        let e = s.lock(&Holder::this_process("test"), false).err().unwrap();
        assert!(e.to_string().contains("lock"), "{e}");
        assert_eq!(fs::read(&canary).unwrap(), b"canary");
        assert!(!d.path().join("12ab").exists());
    }
}
