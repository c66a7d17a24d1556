//! The FUSE adapter: translates kernel requests into [`Volume`] calls and
//! their results into replies. It holds no policy of its own.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::volume::{AtimeMode, Attr, FileKind, FsError, SetAttr, SetTime, Timespec, Volume};

/// How long the kernel may cache attributes and entries. sealfs is the only
/// writer of its volume, so long timeouts are safe.
const TTL: Duration = Duration::from_secs(60);

/// The fuser filesystem for one mounted volume.
pub struct SealFs {
    vol: Arc<Volume>,
    writeback_cache: bool,
    /// The session's notifier, once the session exists (see
    /// [`SealFs::notifier_slot`]).
    notifier: Arc<OnceLock<Notifier>>,
    /// More than one worker thread: a request handler may wait for the
    /// kernel to send (and another worker to serve) other requests.
    threads: usize,
    /// Open file handles that can write, per inode: only those inodes can
    /// have dirty pages in the kernel's writeback cache (close writes them
    /// back).
    writers: Mutex<HashMap<u64, u32>>,
    /// When reads update atime.
    atime: AtimeMode,
    /// Whether the kernel mount is read-only now (`mount -o remount,ro`;
    /// the kernel does not tell the daemon), see [`SealFs::mount_ro`].
    kernel_ro: KernelRo,
}

/// The kernel mount's read-only flag as last read from the mount table.
struct KernelRo {
    mountpoint: Option<PathBuf>,
    ro: AtomicBool,
    checked: Mutex<Option<Instant>>,
}

/// How old the cached read-only flag may get before a read that would
/// update atime looks at the mount table again. A remount through sealfs
/// (mount(8), the helper, `sealfs mount -o remount`) refreshes it at once
/// with an fsync of the root.
const RO_RECHECK: Duration = Duration::from_millis(500);

impl SealFs {
    /// Wrap an open volume served by `threads` FUSE worker threads, with
    /// access times kept as `atime` says.
    pub fn new(vol: Arc<Volume>, threads: usize, atime: AtimeMode) -> Self {
        SealFs {
            writeback_cache: !vol.is_read_only(),
            vol,
            notifier: Arc::new(OnceLock::new()),
            threads,
            writers: Mutex::new(HashMap::new()),
            atime,
            kernel_ro: KernelRo {
                mountpoint: None,
                ro: AtomicBool::new(false),
                checked: Mutex::new(None),
            },
        }
    }

    /// The mount point this file system is mounted on, so that it can see
    /// when the kernel mount is remounted read-only.
    pub fn with_mountpoint(mut self, mountpoint: &Path) -> Self {
        self.kernel_ro.mountpoint =
            Some(std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf()));
        self
    }

    /// Read the mount table now: is the kernel mount read-only?
    fn refresh_mount_ro(&self) -> bool {
        let Some(mp) = &self.kernel_ro.mountpoint else {
            return false;
        };
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let ro = crate::cli::status::parse_mountinfo(&info)
            .into_iter()
            .rfind(|e| &e.mountpoint == mp)
            .is_some_and(|e| e.read_only);
        let was = self.kernel_ro.ro.swap(ro, Ordering::Relaxed);
        if was != ro {
            log::info!(
                "{} is {} now",
                mp.display(),
                if ro { "read-only" } else { "read-write" }
            );
        }
        *self
            .kernel_ro
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        ro
    }

    /// Whether the kernel mount is read-only (cached for [`RO_RECHECK`]).
    fn mount_ro(&self) -> bool {
        let fresh = self
            .kernel_ro
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < RO_RECHECK);
        if fresh {
            self.kernel_ro.ro.load(Ordering::Relaxed)
        } else {
            self.refresh_mount_ro()
        }
    }

    /// The atime mode in force: none while the kernel mount is read-only,
    /// so that reads change (and commit) nothing.
    fn atime_mode(&self) -> AtimeMode {
        if self.atime == AtimeMode::NoAtime || self.vol.is_read_only() || self.mount_ro() {
            AtimeMode::NoAtime
        } else {
            self.atime
        }
    }

    /// Where the mount code puts the session's notifier once the session
    /// is created (the file system is moved into the session first).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    fn note_writer(&self, ino: u64, flags: i32, delta: i32) {
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return;
        }
        let mut w = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(ino).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            w.remove(&ino);
        }
    }

    /// Make the kernel hand its dirty cached pages of `ino` to the daemon
    /// now. The kernel does not write back before FUSE_LSEEK, so without
    /// this SEEK_DATA/SEEK_HOLE would answer from data and a size that are
    /// behind what the caller wrote. Invalidating the inode's pages makes
    /// the kernel write dirty ones back first (its launder step), as
    /// FUSE_WRITE requests that other workers serve while this one waits:
    /// so only with more than one worker thread.
    fn write_back_cached(&self, ino: u64) {
        if !self.writeback_cache || self.threads < 2 {
            return;
        }
        let has_writer = self
            .writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&ino);
        if !has_writer {
            return;
        }
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                log::debug!("writing back cached pages of inode {ino} before lseek: {e}");
            }
        }
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.0)
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn from_system_time(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.crtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Convert a time that came from the kernel through fuser. fuser 0.18
/// decodes a pre-1970 (sec < 0, nsec) pair as `EPOCH - (|sec|, nsec)`
/// (see its `system_time_from_time` TODO), so undo exactly that.
fn from_request_time(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => from_system_time(t),
        Err(e) => {
            let d = e.duration();
            Timespec {
                sec: -(d.as_secs() as i64),
                nsec: d.subsec_nanos(),
            }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(from_request_time(s)),
    })
}

fn kind_from_mode(mode: u32) -> Option<FileKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::File,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        _ => return None,
    })
}

/// Whether the process behind `req` has `gid` as its group or one of its
/// supplementary groups (read from /proc; unknown counts as not).
fn caller_in_group(req: &Request, gid: u32) -> bool {
    if req.gid() == gid {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", req.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for SealFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_AUTO_INVAL_DATA
            // File handles (name_to_handle_at/open_by_handle_at, NFS): node
            // ids are sealfs's inode numbers, never reused, and the same
            // after a remount; lookups of "." and ".." answer for any node.
            | InitFlags::FUSE_EXPORT_SUPPORT
            // POSIX ACLs: the kernel caches and enforces them; the volume
            // keeps them in line with the mode and inherits default ACLs,
            // so it gets the create mode unmasked, with the umask beside it.
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK;
        if self.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        for flag in want.iter() {
            // Ask for each capability the kernel offers; ignore the rest.
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.vol.close() {
            log::error!("final commit of {} failed: {e}", self.vol.root().display());
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.vol.lookup(parent.0, name.as_bytes()))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.vol.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            ctime: ctime.map(from_request_time),
        };
        match self.vol.setattr(ino.0, &s) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.vol.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_from_mode(mode) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        reply_entry(
            reply,
            self.vol.mknod_umask(
                parent.0,
                name.as_bytes(),
                kind,
                mode,
                umask,
                req.uid(),
                req.gid(),
                rdev,
            ),
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.vol
                .mkdir_umask(parent.0, name.as_bytes(), mode, umask, req.uid(), req.gid()),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol.unlink(parent.0, name.as_bytes()))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol.rmdir(parent.0, name.as_bytes()))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.vol.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                req.uid(),
                req.gid(),
            ),
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.vol.rename_as(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
                req.uid(),
                req.gid(),
            ),
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.vol.link(ino.0, newparent.0, newname.as_bytes()))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.vol.read_only_ino(ino.0) && (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        // While the content key is revoked, refuse opening for writing: with
        // the writeback cache the kernel would accept whole-page writes into
        // its cache and only fail them later, at writeback.
        if (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY && self.vol.content_unavailable().is_some()
        {
            return reply.error(Errno::from_i32(libc::EACCES));
        }
        // With FUSE_ATOMIC_O_TRUNC the kernel passes O_TRUNC here instead of
        // sending a separate setattr(size=0).
        if flags.0 & libc::O_TRUNC != 0 && (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY {
            let trunc = SetAttr {
                size: Some(0),
                ..Default::default()
            };
            if let Err(e) = self.vol.setattr(ino.0, &trunc) {
                return reply.error(errno(e));
            }
        }
        match self.vol.open_file(ino.0) {
            Ok(()) => {
                self.note_writer(ino.0, flags.0, 1);
                // Reads from the kernel's page cache do not reach the
                // daemon: when a read would be due to update atime, drop
                // the cache on this open so that the first read does.
                let reads = flags.0 & libc::O_ACCMODE != libc::O_WRONLY;
                let keep = if reads && self.vol.atime_due(ino.0, self.atime_mode()) {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                reply.opened(FileHandle(0), keep)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Counted like open files, so that a directory removed (rmdir,
        // rename over it) while open stays until its last close.
        match self.vol.open_file(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.vol.release_file(ino.0);
        reply.ok()
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.vol.read(ino.0, offset, size) {
            Ok(d) => {
                self.vol.note_access(ino.0, self.atime_mode());
                reply.data(&d)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.vol.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.note_writer(ino.0, flags.0, -1);
        self.vol.release_file(ino.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vol.fsync(ino.0))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.vol.readdir(ino.0) {
            Ok(entries) => {
                self.vol.note_access(ino.0, self.atime_mode());
                for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(
                        INodeNo(*child),
                        (i + 1) as u64,
                        file_type(*kind),
                        OsStr::from_bytes(name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // `sealfs mount -o remount` fsyncs the root after the remount:
        // notice the kernel mount's new read-only flag here.
        if ino.0 == crate::volume::ROOT_INO {
            self.refresh_mount_ro();
        }
        reply_empty(reply, self.vol.fsync(ino.0))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vol.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.vol.setxattr(ino.0, name.as_bytes(), value, flags);
        // Setting an access ACL clears set-group-ID when the caller is not
        // in the file's group (as the VFS's posix_acl_update_mode does;
        // fuser 0.18 has no FUSE_SETXATTR_ACL_KILL_SGID flag to say so).
        if r.is_ok() && name.as_bytes() == b"system.posix_acl_access" && req.uid() != 0 {
            if let Ok(a) = self.vol.getattr(ino.0) {
                if a.perm & 0o2000 != 0 && !caller_in_group(req, a.gid) {
                    let s = SetAttr {
                        mode: Some(u32::from(a.perm & !0o2000)),
                        ..Default::default()
                    };
                    if let Err(e) = self.vol.setattr(ino.0, &s) {
                        return reply.error(errno(e));
                    }
                }
            }
        }
        reply_empty(reply, r)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.vol.getxattr(ino.0, name.as_bytes()))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.vol.listxattr(ino.0))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol.removexattr(ino.0, name.as_bytes()))
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are done by the kernel (default_permissions).
        reply_empty(reply, self.vol.getattr(ino.0).map(|_| ()))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(kind) = kind_from_mode(mode) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        let r = self
            .vol
            .mknod_umask(
                parent.0,
                name.as_bytes(),
                kind,
                mode,
                umask,
                req.uid(),
                req.gid(),
                0,
            )
            .and_then(|a| self.vol.open_file(a.ino).map(|_| a));
        match r {
            Ok(a) => {
                self.note_writer(a.ino, flags, 1);
                reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vol.fallocate(ino.0, offset, length, mode))
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            return reply.error(Errno::from_i32(libc::ENXIO));
        }
        self.write_back_cached(ino.0);
        match self.vol.lseek(ino.0, offset as u64, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_conversion_roundtrip() {
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec { sec: -5, nsec: 250 },
        ] {
            assert_eq!(from_system_time(to_system_time(t)), t);
        }
    }

    #[test]
    fn pre_epoch_request_times() {
        // what fuser 0.18 hands us for (sec=-86400, nsec=500)
        let t = UNIX_EPOCH - Duration::new(86400, 500);
        assert_eq!(
            from_request_time(t),
            Timespec {
                sec: -86400,
                nsec: 500
            }
        );
        let t = UNIX_EPOCH + Duration::new(5, 7);
        assert_eq!(from_request_time(t), Timespec { sec: 5, nsec: 7 });
    }

    #[test]
    fn mode_kinds() {
        assert_eq!(kind_from_mode(libc::S_IFREG | 0o644), Some(FileKind::File));
        assert_eq!(kind_from_mode(libc::S_IFIFO | 0o644), Some(FileKind::Fifo));
        assert_eq!(kind_from_mode(libc::S_IFDIR | 0o755), None);
    }
}
