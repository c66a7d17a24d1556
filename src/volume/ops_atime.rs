//! Access times: `relatime` (the default), `strictatime` and `noatime`.
//!
//! The kernel leaves atime of FUSE inodes to the daemon (it never updates
//! it itself), so reads the daemon serves update it here. Reads the kernel
//! answers from its page cache do not reach the daemon; the FUSE adapter
//! therefore opens a file without keeping its cache whenever a read would
//! be due to update atime (see [`Volume::atime_due`]).

use super::format::Timespec;
use super::snapshot::is_virtual;
use super::Volume;

/// When reads update a file's access time (the mount options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtimeMode {
    /// Update when atime is not newer than mtime or ctime, or is more than
    /// a day old (Linux's default).
    #[default]
    Relatime,
    /// Update on every read the daemon sees.
    Strict,
    /// Never update on reads.
    NoAtime,
}

const DAY_SECS: i64 = 24 * 60 * 60;

fn due(mode: AtimeMode, atime: Timespec, mtime: Timespec, ctime: Timespec, now: Timespec) -> bool {
    match mode {
        AtimeMode::NoAtime => false,
        AtimeMode::Strict => atime != now,
        AtimeMode::Relatime => {
            atime <= mtime || atime <= ctime || now.sec.saturating_sub(atime.sec) >= DAY_SECS
        }
    }
}

impl Volume {
    /// Whether a read of `ino` now would update its access time.
    pub fn atime_due(&self, ino: u64, mode: AtimeMode) -> bool {
        if mode == AtimeMode::NoAtime || is_virtual(ino) || self.is_read_only() {
            return false;
        }
        let st = self.state.lock();
        let Ok(i) = st.get(ino) else {
            return false;
        };
        due(mode, i.atime, i.mtime, i.ctime, Timespec::now())
    }

    /// A read of `ino` (file data or directory entries) was served: update
    /// its access time if `mode` says so. Nothing on a read-only mount.
    pub fn note_access(&self, ino: u64, mode: AtimeMode) {
        if mode == AtimeMode::NoAtime || is_virtual(ino) || self.is_read_only() {
            return;
        }
        let mut st = self.state.lock();
        let now = Timespec::now();
        let Ok(i) = st.get_mut(ino) else {
            return;
        };
        if due(mode, i.atime, i.mtime, i.ctime, now) {
            i.atime = now;
            st.dirty.insert(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sec: i64) -> Timespec {
        Timespec { sec, nsec: 0 }
    }

    #[test]
    fn relatime_rules() {
        let now = t(10 * DAY_SECS);
        let r = AtimeMode::Relatime;
        // atime older than mtime or ctime, or equal: due
        assert!(due(r, t(100), t(200), t(50), now));
        assert!(due(r, t(100), t(50), t(200), now));
        assert!(due(r, t(100), t(100), t(50), now));
        // newer than both and recent: not due
        assert!(!due(r, now, t(200), t(200), t(now.sec + 5)));
        // a day old: due
        assert!(due(r, t(300), t(200), t(200), t(300 + DAY_SECS)));
        assert!(!due(AtimeMode::NoAtime, t(1), t(2), t(2), now));
        assert!(due(AtimeMode::Strict, t(300), t(200), t(200), t(301)));
    }
}
