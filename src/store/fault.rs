//! A fault-injecting [`ObjectStore`] wrapper, for tests (test support: it
//! is compiled into the library so that integration tests and tools can
//! use it, but nothing in sealfs itself ever constructs one).
//!
//! [`FaultStore`] passes every call through to the store it wraps, counts
//! them, and fails the ones a test armed through its shared
//! [`FaultControl`] handle:
//!
//! - [`FaultControl::fail`]: the `n`th `put` / `get` / `delete` / `sync` /
//!   `list` from now (optionally only of one [`Kind`]) returns the given
//!   errno (`ENOSPC`, `EIO`, ...) without reaching the inner store;
//! - [`FaultControl::tear`]: the `n`th `put` from now is torn: for a
//!   non-durable put, only a prefix of the data is stored under the name
//!   (what a crash in the middle of writing a fresh object can leave), then
//!   the errno is returned; a durable put is all-or-nothing by contract, so
//!   a torn durable put stores nothing and the old object (if any) stays;
//! - [`FaultControl::crash`]: from now on every call fails, as if the
//!   machine had died: nothing more reaches the store (closing a volume
//!   then cannot commit, so a remount shows the last commit made before).
//!
//! The lock, the lease, `usage`, `space`, `location` and the log are
//! passed through unchanged and not counted.
//!
//! [`ObjectStore::as_any`] returns the `FaultStore` itself, not the inner
//! store: a downcast to `LocalDirStore` fails, so backend fast paths
//! (hard-linking chunks in `sealfs clone`) are not taken and every byte
//! goes through the fault layer.

use std::any::Any;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Holder, Kind, LockError, LogSegments, ObjectStore, Space, WriterLock};

/// The store operations faults can be armed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Get,
    Delete,
    Sync,
    List,
}

/// How many calls of each operation went through (faulted or not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub puts: u64,
    /// Puts with `durable` set.
    pub durable_puts: u64,
    pub gets: u64,
    pub deletes: u64,
    pub syncs: u64,
    pub lists: u64,
    /// Puts per kind: header, chunk, node, meta.
    pub puts_by_kind: [u64; 4],
}

impl Counts {
    /// Calls of `op`.
    pub fn of(&self, op: Op) -> u64 {
        match op {
            Op::Put => self.puts,
            Op::Get => self.gets,
            Op::Delete => self.deletes,
            Op::Sync => self.syncs,
            Op::List => self.lists,
        }
    }

    /// Puts of objects of `kind`.
    pub fn puts_of(&self, kind: Kind) -> u64 {
        self.puts_by_kind[kind_index(kind)]
    }
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Header => 0,
        Kind::Chunk => 1,
        Kind::Node => 2,
        Kind::Meta => 3,
    }
}

/// A fault that fired: which call failed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub op: Op,
    pub kind: Option<Kind>,
    pub name: Option<String>,
    pub errno: i32,
    /// A torn put: how many bytes of the data were stored (0 for a
    /// durable put, which stores nothing).
    pub torn: Option<usize>,
    pub durable: bool,
}

#[derive(Debug, Clone)]
struct Armed {
    op: Op,
    kind: Option<Kind>,
    /// Matching calls still to let through before this one fires.
    skip: u64,
    errno: i32,
    /// Tear (puts only): keep this fraction (per mille) of the data.
    tear: Option<u32>,
    /// A failing sync loses the data of every non-durable put since the
    /// last sync that succeeded.
    lose: bool,
    /// Fires on every matching call until disarmed (a full store).
    always: bool,
}

#[derive(Debug, Default)]
struct Ctl {
    counts: Counts,
    armed: Vec<Armed>,
    fired: Vec<Fired>,
    crashed: Option<i32>,
    /// Non-durable puts since the last successful sync.
    unsynced: Vec<(Kind, String)>,
}

/// The shared handle tests arm faults with (see the module docs).
#[derive(Debug, Default)]
pub struct FaultControl {
    ctl: Mutex<Ctl>,
}

impl FaultControl {
    /// Fail the `n`th call (1 = the next one) of `op` from now, counting
    /// only calls on objects of `kind` when given, with `errno`.
    /// Fail every call of `op` (on objects of `kind` when given) with
    /// `errno` from now until [`FaultControl::disarm`]: a full or failing
    /// store.
    pub fn fail_always(&self, op: Op, kind: Option<Kind>, errno: i32) {
        self.ctl.lock().armed.push(Armed {
            op,
            kind,
            skip: 0,
            errno,
            tear: None,
            lose: false,
            always: true,
        });
    }

    pub fn fail(&self, op: Op, kind: Option<Kind>, n: u64, errno: i32) {
        assert!(n >= 1, "n counts from 1");
        self.ctl.lock().armed.push(Armed {
            op,
            kind,
            skip: n - 1,
            errno,
            tear: None,
            lose: false,
            always: false,
        });
    }

    /// Fail the `n`th sync from now with `errno` and lose what it should
    /// have made durable, the way a file system that reports a writeback
    /// error forgets the data it could not write (Linux marks those pages
    /// clean: after eviction or a crash they are gone): every object put
    /// non-durably since the last sync that succeeded is removed.
    pub fn fail_sync_losing(&self, n: u64, errno: i32) {
        assert!(n >= 1, "n counts from 1");
        self.ctl.lock().armed.push(Armed {
            op: Op::Sync,
            kind: None,
            skip: n - 1,
            errno,
            tear: None,
            lose: true,
            always: false,
        });
    }

    /// Tear the `n`th put (1 = the next one) from now, of `kind` when
    /// given: a non-durable put stores `keep_permille`/1000 of the data
    /// (rounded down) under the name, a durable one stores nothing; then
    /// it fails with `errno`.
    pub fn tear(&self, kind: Option<Kind>, n: u64, keep_permille: u32, errno: i32) {
        assert!(n >= 1, "n counts from 1");
        self.ctl.lock().armed.push(Armed {
            op: Op::Put,
            kind,
            skip: n - 1,
            errno,
            tear: Some(keep_permille.min(1000)),
            lose: false,
            always: false,
        });
    }

    /// From now on every counted call fails with `errno` (a dead machine).
    pub fn crash(&self, errno: i32) {
        self.ctl.lock().crashed = Some(errno);
    }

    /// Remove every armed fault (not a crash).
    pub fn disarm(&self) {
        self.ctl.lock().armed.clear();
    }

    /// Whether any fault is still armed (not yet fired).
    pub fn armed(&self) -> bool {
        !self.ctl.lock().armed.is_empty()
    }

    /// The faults that fired since the last call, oldest first.
    pub fn take_fired(&self) -> Vec<Fired> {
        std::mem::take(&mut self.ctl.lock().fired)
    }

    /// Calls so far.
    pub fn counts(&self) -> Counts {
        self.ctl.lock().counts
    }

    /// Count a call and decide whether it fails: `Some((errno, tear, lose))`.
    fn check(
        &self,
        op: Op,
        kind: Option<Kind>,
        name: Option<&str>,
        durable: bool,
    ) -> Option<(i32, Option<u32>, bool)> {
        let mut c = self.ctl.lock();
        match op {
            Op::Put => {
                c.counts.puts += 1;
                if durable {
                    c.counts.durable_puts += 1;
                }
                if let Some(k) = kind {
                    c.counts.puts_by_kind[kind_index(k)] += 1;
                }
            }
            Op::Get => c.counts.gets += 1,
            Op::Delete => c.counts.deletes += 1,
            Op::Sync => c.counts.syncs += 1,
            Op::List => c.counts.lists += 1,
        }
        if let Some(errno) = c.crashed {
            return Some((errno, None, false));
        }
        let mut hit = None;
        for (i, a) in c.armed.iter_mut().enumerate() {
            if a.op != op || (a.kind.is_some() && a.kind != kind) {
                continue;
            }
            if a.skip > 0 {
                a.skip -= 1;
                continue;
            }
            if hit.is_none() {
                hit = Some(i);
            }
        }
        let Some(hit) = hit else {
            if op == Op::Put && !durable {
                if let (Some(k), Some(n)) = (kind, name) {
                    c.unsynced.push((k, n.to_string()));
                }
            }
            return None;
        };
        let a = if c.armed[hit].always {
            c.armed[hit].clone()
        } else {
            c.armed.remove(hit)
        };
        c.fired.push(Fired {
            op,
            kind,
            name: name.map(str::to_string),
            errno: a.errno,
            torn: None,
            durable,
        });
        Some((a.errno, a.tear, a.lose))
    }

    fn note_torn(&self, kept: usize) {
        if let Some(f) = self.ctl.lock().fired.last_mut() {
            f.torn = Some(kept);
        }
    }
}

/// The error of an injected fault: a plain OS error (so that its errno
/// survives, as a real one's would), logged so that a test log shows it.
fn injected(errno: i32, what: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(errno);
    log::debug!("injected fault: {what}: {e}");
    e
}

/// An [`ObjectStore`] that injects the faults its [`FaultControl`] arms.
#[derive(Debug)]
pub struct FaultStore {
    inner: Box<dyn ObjectStore>,
    ctl: Arc<FaultControl>,
}

impl FaultStore {
    /// Wrap `inner`; nothing is armed yet.
    pub fn new(inner: Box<dyn ObjectStore>) -> FaultStore {
        FaultStore {
            inner,
            ctl: Arc::new(FaultControl::default()),
        }
    }

    /// The control handle (shared: keep a clone before handing the store
    /// to a volume).
    pub fn control(&self) -> Arc<FaultControl> {
        self.ctl.clone()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &dyn ObjectStore {
        &*self.inner
    }
}

impl ObjectStore for FaultStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, kind: Kind, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
        match self.ctl.check(Op::Put, Some(kind), Some(name), durable) {
            None => self.inner.put(kind, name, data, durable),
            Some((errno, None, _)) => Err(injected(errno, "put")),
            Some((errno, Some(permille), _)) => {
                // A durable put is atomic: a crash or error in the middle
                // leaves the old object (or none).
                if !durable && kind != Kind::Header {
                    let keep = data.len() * permille as usize / 1000;
                    self.inner.put(kind, name, &data[..keep], false)?;
                    self.ctl.note_torn(keep);
                } else {
                    self.ctl.note_torn(0);
                }
                Err(injected(errno, "torn put"))
            }
        }
    }

    fn get(&self, kind: Kind, name: &str, max_len: usize) -> io::Result<Vec<u8>> {
        match self.ctl.check(Op::Get, Some(kind), Some(name), false) {
            None => self.inner.get(kind, name, max_len),
            Some((errno, ..)) => Err(injected(errno, "get")),
        }
    }

    fn delete(&self, kind: Kind, name: &str) -> io::Result<()> {
        match self.ctl.check(Op::Delete, Some(kind), Some(name), false) {
            None => self.inner.delete(kind, name),
            Some((errno, ..)) => Err(injected(errno, "delete")),
        }
    }

    fn list(&self, kind: Kind) -> io::Result<Vec<String>> {
        match self.ctl.check(Op::List, Some(kind), None, false) {
            None => self.inner.list(kind),
            Some((errno, ..)) => Err(injected(errno, "list")),
        }
    }

    fn sync(&self) -> io::Result<()> {
        match self.ctl.check(Op::Sync, None, None, false) {
            None => {
                self.inner.sync()?;
                self.ctl.ctl.lock().unsynced.clear();
                Ok(())
            }
            Some((errno, _, lose)) => {
                if lose {
                    let lost = std::mem::take(&mut self.ctl.ctl.lock().unsynced);
                    for (k, n) in lost {
                        self.inner.delete(k, &n)?;
                    }
                }
                Err(injected(errno, "sync"))
            }
        }
    }

    fn usage(&self, kind: Kind) -> io::Result<(u64, u64)> {
        self.inner.usage(kind)
    }

    fn space(&self) -> io::Result<Space> {
        self.inner.space()
    }

    fn log_append(&self, seq: u64, record: &[u8]) -> io::Result<()> {
        self.inner.log_append(seq, record)
    }

    fn log_read(&self, from: u64, max_total: usize) -> io::Result<LogSegments> {
        self.inner.log_read(from, max_total)
    }

    fn log_trim(&self, upto: u64) -> io::Result<()> {
        self.inner.log_trim(upto)
    }

    fn remove_temps(&self) -> io::Result<()> {
        self.inner.remove_temps()
    }

    fn lock(&self, holder: &Holder, force: bool) -> Result<Box<dyn WriterLock>, LockError> {
        self.inner.lock(holder, force)
    }

    fn lock_holder(&self) -> io::Result<Option<Holder>> {
        self.inner.lock_holder()
    }

    /// The `FaultStore` itself (see the module docs: no backend fast
    /// paths bypass the faults).
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalDirStore;

    fn store() -> (tempfile::TempDir, FaultStore, Arc<FaultControl>) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        std::fs::create_dir(&root).unwrap();
        LocalDirStore::init(&root).unwrap();
        let fs = FaultStore::new(Box::new(LocalDirStore::open(&root).unwrap()));
        let c = fs.control();
        (d, fs, c)
    }

    #[test]
    fn nth_call_fails_once_with_the_errno_and_others_pass() {
        let (_d, s, c) = store();
        c.fail(Op::Put, Some(Kind::Meta), 2, libc::ENOSPC);
        s.put(Kind::Meta, "a", b"1", true).unwrap();
        // a chunk put does not count towards a Meta-only fault
        s.put(Kind::Chunk, &"ab".repeat(16), b"c", false).unwrap();
        let e = s.put(Kind::Meta, "b", b"2", true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(s.get(Kind::Meta, "b", 100).is_err(), "nothing was stored");
        s.put(Kind::Meta, "b", b"3", true).unwrap();
        assert_eq!(s.get(Kind::Meta, "b", 100).unwrap(), b"3");
        let f = c.take_fired();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].name.as_deref(), Some("b"));
        c.fail(Op::Get, None, 1, libc::EIO);
        assert_eq!(
            s.get(Kind::Meta, "a", 100).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(s.get(Kind::Meta, "a", 100).unwrap(), b"1");
        c.fail(Op::Sync, None, 1, libc::EIO);
        assert_eq!(s.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
        s.sync().unwrap();
        c.fail(Op::Delete, None, 1, libc::EIO);
        assert!(s.delete(Kind::Meta, "a").is_err());
        assert_eq!(s.get(Kind::Meta, "a", 100).unwrap(), b"1");
        let n = c.counts();
        assert_eq!(
            (n.puts, n.durable_puts, n.gets, n.syncs, n.deletes),
            (4, 3, 5, 2, 1)
        );
        assert_eq!(n.puts_of(Kind::Chunk), 1);
    }

    #[test]
    fn torn_puts() {
        let (_d, s, c) = store();
        let name = "cd".repeat(16);
        c.tear(None, 1, 500, libc::EIO);
        let e = s.put(Kind::Chunk, &name, &[7u8; 1000], false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(s.get(Kind::Chunk, &name, 10_000).unwrap(), vec![7u8; 500]);
        // durable: the old object stays
        s.put(Kind::Meta, "m", b"old", true).unwrap();
        c.tear(None, 1, 500, libc::ENOSPC);
        assert!(s.put(Kind::Meta, "m", b"new new new", true).is_err());
        assert_eq!(s.get(Kind::Meta, "m", 100).unwrap(), b"old");
        assert_eq!(c.take_fired()[1].torn, Some(0));
        c.crash(libc::EIO);
        assert!(s.get(Kind::Meta, "m", 100).is_err());
        assert!(s.put(Kind::Meta, "n", b"x", true).is_err());
        assert!(s.sync().is_err());
        assert!(s.as_any().downcast_ref::<LocalDirStore>().is_none());
    }
}
