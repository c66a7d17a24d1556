//! The object store: everything a volume keeps persistently goes through
//! the [`ObjectStore`] trait, so the volume layer never touches `std::fs`
//! and does not know where its objects live. Backends:
//!
//! - [`local::LocalDirStore`]: a directory on a local file system, opened
//!   beneath a directory handle without following any symlink (the store is
//!   hostile input);
//! - `s3`: an S3-compatible bucket (`s3://BUCKET/PREFIX`): not implemented
//!   yet; [`check_location`] refuses such URLs clearly.
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

pub mod fault;
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

impl Holder {
    /// This process, doing `what`.
    pub fn this_process(what: &str) -> Holder {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let pid = std::process::id();
        let now = unix_now();
        Holder {
            host_id: read("/etc/machine-id"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            hostname: read("/proc/sys/kernel/hostname"),
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            what: what.to_string(),
            taken: now,
            renewed: now,
        }
    }

    /// The same process (a lease this process wrote).
    pub fn same_process(&self, other: &Holder) -> bool {
        self.host_id == other.host_id
            && self.boot_id == other.boot_id
            && self.pid == other.pid
            && self.start_time == other.start_time
    }

    /// On this machine, since its last boot.
    pub fn this_boot(&self, other: &Holder) -> bool {
        self.host_id == other.host_id && self.boot_id == other.boot_id
    }

    /// For messages: `"mount /mnt/x" (pid 123 on host h, since ...)`. A
    /// lease read from a store is hostile input: its strings are shown
    /// escaped and cut short, never as raw terminal text.
    pub fn describe(&self) -> String {
        let ago = unix_now().saturating_sub(self.renewed);
        let clean = |s: &str| -> String {
            let s: String = s.chars().take(200).collect();
            s.chars()
                .flat_map(|c| {
                    if c.is_control() {
                        c.escape_default().collect::<Vec<_>>()
                    } else {
                        vec![c]
                    }
                })
                .collect()
        };
        format!(
            "\"{}\" (pid {} on host {}, lease renewed {ago} s ago)",
            clean(&self.what),
            self.pid,
            if self.hostname.is_empty() {
                "?".to_string()
            } else {
                clean(&self.hostname)
            }
        )
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Start time of a process (field 22 of `/proc/PID/stat`), None when it
/// does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may hold spaces and parentheses
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Decide about a lease found in a store that `me` wants to take: a live
/// holder on this machine refuses; a dead one (or one from before the last
/// boot) is taken over with a message; one from another machine needs
/// `force`.
pub fn judge_lease(
    location: &str,
    found: &Holder,
    me: &Holder,
    force: bool,
) -> Result<(), LockError> {
    if found.this_boot(me) {
        if process_start_time(found.pid) == Some(found.start_time) {
            return Err(LockError::Held(format!(
                " by {} (its lock file was deleted or replaced, but the lease in the store names a live process)",
                found.describe()
            )));
        }
        log::warn!(
            "{location}: taking over the lease of {}, which is no longer running",
            found.describe()
        );
        return Ok(());
    }
    if found.host_id == me.host_id && !me.host_id.is_empty() {
        log::warn!(
            "{location}: taking over the lease of {}, left before this machine last booted",
            found.describe()
        );
        return Ok(());
    }
    if force {
        log::warn!(
            "{location}: --force-unlock: taking over the lease of {} on another machine",
            found.describe()
        );
        return Ok(());
    }
    Err(LockError::Foreign(format!(
        "{location} is in use by {} on another machine (host id {:?}); if that machine is down or no longer uses the store, run again with --force-unlock. \
         If it is still writing, forcing forks the volume's history and loses what one of the two writes",
        found.describe(),
        found.host_id.chars().take(64).collect::<String>()
    )))
}

static LOCK_CONTEXT: std::sync::Mutex<Option<(String, bool)>> = std::sync::Mutex::new(None);

/// What this process says it is doing when it takes a store's writer lock
/// (`"mount /mnt/x"`, `"gc"`), and whether `--force-unlock` was given. Set
/// once by the command line; a process runs one command.
pub fn set_lock_context(what: &str, force_unlock: bool) {
    *LOCK_CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((what.to_string(), force_unlock));
}

/// See [`set_lock_context`]; `("sealfs", false)` when not set.
pub fn lock_context() -> (String, bool) {
    LOCK_CONTEXT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| ("sealfs".to_string(), false))
}

/// Why the writer lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else on this machine holds it: " by WHO" (or empty when
    /// unknown), for "STORE is in use{holder}".
    #[error("in use{0}")]
    Held(String),
    /// A holder on another machine, whose lease may be live: the whole
    /// message, saying what `--force-unlock` risks.
    #[error("{0}")]
    Foreign(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A held writer lock. Dropping it releases the lock.
///
/// Taking the lock ([`ObjectStore::lock`]) decides whether this process
/// may write; the lease naming it is written by the first
/// [`WriterLock::renew`], so that a command that then refuses (a damaged
/// store, a rollback) leaves the store as it was.
pub trait WriterLock: Send + Sync {
    /// Write (the first time) or renew the lease; called every few
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

    /// Names of all objects of a kind, sorted. Entries with names no
    /// object can have are left out; an entry with a valid name is listed
    /// even if it is not a plain object (reading it then fails), so that
    /// callers never take "cannot be read" for "does not exist".
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

    /// Remove what torn writes left behind (temp files); called by a
    /// writer after it took the lock.
    fn remove_temps(&self) -> io::Result<()> {
        Ok(())
    }

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

/// Where a store lives, from what a user typed: a local directory, or a
/// URL. Only local directories are implemented; a URL is recognised so
/// that `sealfs create s3://b/p` is refused clearly instead of creating a
/// local directory named `s3:`.
pub fn check_location(location: &std::path::Path) -> io::Result<()> {
    let Some(s) = location.to_str() else {
        return Ok(());
    };
    let Some((scheme, _)) = s.split_once("://") else {
        return Ok(());
    };
    let scheme_like = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !scheme_like {
        return Ok(());
    }
    let msg = if scheme.eq_ignore_ascii_case("s3") {
        format!(
            "{s}: S3 stores are not supported by this build yet (only local store directories); \
             for a local directory whose name starts with \"{scheme}:\", write ./{s}"
        )
    } else {
        format!(
            "{s}: unknown store URL scheme {scheme:?} (a store is a local directory); \
             for a local directory of that name, write ./{s}"
        )
    };
    Err(io::Error::new(io::ErrorKind::Unsupported, msg))
}

#[cfg(test)]
mod location_tests {
    use super::check_location;
    use std::path::Path;

    #[test]
    fn urls_are_refused_paths_are_not() {
        assert!(check_location(Path::new("/srv/a.store")).is_ok());
        assert!(check_location(Path::new("rel/a.store")).is_ok());
        assert!(check_location(Path::new("./s3://b/p")).is_ok());
        let e = check_location(Path::new("s3://bucket/prefix")).unwrap_err();
        assert!(e.to_string().contains("S3 stores are not supported"), "{e}");
        let e = check_location(Path::new("gs://bucket/prefix")).unwrap_err();
        assert!(e.to_string().contains("unknown store URL scheme"), "{e}");
    }
}
