//! The object store: everything a volume keeps persistently goes through
//! the [`ObjectStore`] trait, so the volume layer never touches `std::fs`
//! and does not know where its objects live. Backends:
//!
//! - [`local::LocalDirStore`]: a directory on a local file system, opened
//!   beneath a directory handle without following any symlink (the store is
//!   hostile input);
//! - `s3`: an S3-compatible bucket (`s3://BUCKET/PREFIX`).
//!
//! A store holds:
//!
//! - one header object ([`Kind::Header`]),
//! - immutable, randomly named objects of a few kinds ([`Kind`]),
//! - a write-ahead log of numbered records ([`ObjectStore::log_append`]),
//! - the single-writer lock or lease ([`ObjectStore::lock`]).
//!
//! Nothing a backend reads is trusted: the volume layer authenticates every
//! byte. A backend's own duty is to refuse anything that is not a plain
//! object of a plausible size, and never to read or write outside the store.

use std::any::Any;
use std::io;

pub mod local;

pub use local::{sync_dir, write_atomic, LocalDirStore};

/// What kind of object a name refers to; backends place kinds apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The store header (`sealfs.store`); its name is always
    /// [`HEADER_NAME`].
    Header,
    /// Encrypted file-content chunks (`chunks/ab/<id>` locally).
    Chunk,
    /// Sealed metadata-tree nodes (`nodes/ab/<id>` locally).
    Node,
    /// Other metadata objects (`meta/<name>` locally): root records, and
    /// the journal records, checkpoints and snapshot manifests of store
    /// format 3.
    Meta,
}

impl Kind {
    /// A short word for messages.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::Chunk => "chunk",
            Kind::Node => "metadata node",
            Kind::Meta => "metadata object",
        }
    }
}

/// The one name a [`Kind::Header`] object has.
pub const HEADER_NAME: &str = "sealfs.store";

/// Largest object a store may hold, of any kind; anything larger is refused
/// before it is read.
pub const MAX_OBJECT: usize = 64 << 20;

/// Largest write-ahead-log record.
pub const MAX_LOG_RECORD: usize = 64 << 20;

/// The records of a log, per segment: `(seq, record)` in append order.
pub type LogSegments = Vec<Vec<(u64, Vec<u8>)>>;

/// Space of the store's backing (for statfs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Bytes available to an unprivileged writer.
    pub avail_bytes: u64,
    /// Free object slots (inodes of a local file system; u64::MAX/2 when
    /// unlimited).
    pub free_objects: u64,
}

/// Who holds (or wants) a store's writer lock: written into the store so
/// that a second writer can be told who has it, and so that a lock left by
/// a process that died can be recognised as stale.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// `/etc/machine-id` (or a generated id kept in the state directory).
    pub host_id: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    pub hostname: String,
    pub pid: u32,
    /// Start time of the process (clock ticks since boot, from
    /// `/proc/PID/stat`), so that a reused pid is not mistaken for the
    /// holder.
    pub start_time: u64,
    /// What holds it: "mount /mnt/x", "gc", "fsck --repair", ...
    pub what: String,
    /// Unix seconds when the lock was taken and last renewed.
    pub taken: u64,
    pub renewed: u64,
}

/// Why the writer lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds it and is (or may be) alive.
    #[error("{0}")]
    Held(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A held writer lock. Dropping it releases the lock.
pub trait WriterLock: Send + Sync {
    /// Renew the lease (backends whose lock expires); called every few
    /// seconds while it is held. An error means the lock was lost (taken
    /// over, expired, or the lease was removed): the holder must stop
    /// writing.
    fn renew(&self) -> io::Result<()>;
    /// Whether the lock is known to be lost.
    fn lost(&self) -> bool;
}

/// A store of objects, a log, and a lock.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// The store's location, for messages (a path, or `s3://bucket/prefix`).
    fn location(&self) -> String;

    /// Store an object. With `durable`, it is on stable storage and its
    /// name is visible atomically (all or nothing, replacing an older
    /// object of that name) when this returns; otherwise it becomes
    /// durable at the next [`ObjectStore::sync`]. Non-durable puts are only
    /// made for fresh names no committed state refers to yet.
    fn put(&self, kind: Kind, name: &str, data: &[u8], durable: bool) -> io::Result<()>;

    /// Read a whole object of at most `max_len` bytes. A missing object is
    /// `ErrorKind::NotFound`; anything that is not a plain object of at
    /// most `max_len` bytes is `ErrorKind::InvalidData` with a message
    /// naming the object, and is never read.
    fn get(&self, kind: Kind, name: &str, max_len: usize) -> io::Result<Vec<u8>>;

    /// Delete an object; deleting a missing object is not an error.
    fn delete(&self, kind: Kind, name: &str) -> io::Result<()>;

    /// Names of all objects of a kind, sorted. Entries that cannot be
    /// objects (bad names, not plain files) are left out.
    fn list(&self, kind: Kind) -> io::Result<Vec<String>>;

    /// Make every earlier non-durable put durable.
    fn sync(&self) -> io::Result<()>;

    /// Bytes and object count used by a kind (for `sealfs info`).
    fn usage(&self, kind: Kind) -> io::Result<(u64, u64)>;

    /// Space of the backing storage.
    fn space(&self) -> io::Result<Space>;

    /// Append record `seq` to the write-ahead log; it is durable when this
    /// returns. Records are appended in increasing `seq` order. The first
    /// append after the store was opened may start a new segment.
    fn log_append(&self, seq: u64, record: &[u8]) -> io::Result<()>;

    /// The log's records with `seq >= from`, per segment in segment order,
    /// each segment in the order its records were appended. Reading a
    /// segment stops at the first frame that is torn or malformed (after a
    /// crash the last one may be); what came before it is returned. The
    /// caller authenticates every record and checks that sequence numbers
    /// follow each other. At most `max_total` bytes are returned
    /// (`InvalidData` beyond that).
    fn log_read(&self, from: u64, max_total: usize) -> io::Result<LogSegments>;

    /// Records `<= upto` are no longer needed (a newer root covers them):
    /// the backend may delete whole segments that hold only such records.
    fn log_trim(&self, upto: u64) -> io::Result<()>;

    /// Take the single-writer lock (with `force`, take it over from a
    /// holder on another host that cannot be shown to be dead; a dead
    /// holder on this host is always taken over).
    fn lock(&self, holder: &Holder, force: bool) -> Result<Box<dyn WriterLock>, LockError>;

    /// Who holds the writer lock now, if anyone seems to (for messages and
    /// `sealfs info`).
    fn lock_holder(&self) -> io::Result<Option<Holder>>;

    /// For backend-specific fast paths (hard links between two local
    /// stores on one file system, in `sealfs clone`).
    fn as_any(&self) -> &dyn Any;
}

/// Copy object `name` of `kind` from `src` into `dst` (non-durable), by a
/// hard link when both are local stores on one file system; returns
/// whether it was linked (shared) rather than copied.
pub fn copy_object(
    src: &dyn ObjectStore,
    dst: &dyn ObjectStore,
    kind: Kind,
    name: &str,
) -> io::Result<bool> {
    if let (Some(a), Some(b)) = (
        src.as_any().downcast_ref::<LocalDirStore>(),
        dst.as_any().downcast_ref::<LocalDirStore>(),
    ) {
        if b.link_from(a, kind, name)? {
            return Ok(true);
        }
    }
    let data = src.get(kind, name, MAX_OBJECT)?;
    dst.put(kind, name, &data, false)?;
    Ok(false)
}

/// Check an object name: `[A-Za-z0-9._-]`, 1 to 128 bytes, not starting
/// with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with('.')
}

/// The error for a name that cannot be an object's.
pub fn bad_name(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("invalid object name {name:?}"),
    )
}
