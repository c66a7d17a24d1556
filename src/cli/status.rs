//! Runtime status of live mounts, for `sealfs status`.
//!
//! Each mount daemon keeps a small JSON file in `STATE_DIR/run/VOLUME_ID.json`
//! (mode 0600) with what it serves and its I/O counters, refreshed every two
//! seconds and removed when the daemon exits. `sealfs status` joins these
//! files with the kernel's mount table, so a mount whose daemon died still
//! shows up (as stale).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::volume::{self, Volume};

/// What one mount daemon reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountStatus {
    pub pid: u32,
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub volume_id: String,
    pub key_id: String,
    pub key_version: u32,
    /// Key id with its aliases and state, as known when mounting.
    pub key: String,
    pub read_only: bool,
    /// Mount time, seconds since the epoch.
    pub started: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Where status files live.
pub fn run_dir() -> PathBuf {
    // without a state directory there are no status files; the empty path
    // makes every lookup fail
    volume::default_state_dir()
        .map(|d| d.join("run"))
        .unwrap_or_default()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_status(path: &Path, st: &MountStatus) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Keeps a mount's status file current until dropped.
pub struct Publisher {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Write the status file now and refresh it every two seconds. A
    /// status file that cannot be written only costs `sealfs status` its
    /// details, so failures are logged, not fatal.
    pub fn start(vol: &Arc<Volume>, mut st: MountStatus) -> Publisher {
        let dir = run_dir();
        let path = dir.join(format!("{}.json", st.volume_id));
        {
            use std::os::unix::fs::DirBuilderExt;
            if let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
            {
                log::warn!("cannot create {}: {e}", dir.display());
            }
        }
        if let Err(e) = write_status(&path, &st) {
            log::warn!("cannot write mount status {}: {e}", path.display());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, path2, weak) = (stop.clone(), path.clone(), Arc::downgrade(vol));
        let thread = std::thread::Builder::new()
            .name("sealfs-status".into())
            .spawn(move || {
                let mut last = (st.bytes_read, st.bytes_written);
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let Some(v) = weak.upgrade() else { break };
                    let c = v.io_counters();
                    drop(v);
                    if c != last {
                        last = c;
                        (st.bytes_read, st.bytes_written) = c;
                        let _ = write_status(&path2, &st);
                    }
                }
            })
            .ok();
        Publisher { path, stop, thread }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Status files of this user's mount daemons (unreadable ones skipped).
pub fn read_all() -> Vec<MountStatus> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// One sealfs entry of the kernel's mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub source: PathBuf,
    pub fstype: String,
    pub read_only: bool,
}

/// Parse `/proc/self/mountinfo` text: every entry of type fuse.sealfs.
pub fn parse_mountinfo(info: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        let p: Vec<&str> = post.split(' ').collect();
        if f.len() < 6 || p.len() < 2 || p[0] != "fuse.sealfs" {
            continue;
        }
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape_mountinfo(f[4])),
            source: PathBuf::from(unescape_mountinfo(p[1])),
            fstype: p[0].to_string(),
            read_only: f[5].split(',').any(|o| o == "ro"),
        });
    }
    out
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `sealfs status` reports for one mount.
#[derive(Debug, Clone)]
pub struct Row {
    pub entry: MountEntry,
    /// "live", "stale" or "live (no details)".
    pub state: &'static str,
    pub status: Option<MountStatus>,
}

/// Whether the daemon process exists and is not a zombie waiting to be
/// reaped.
fn daemon_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Whether a mount's daemon is gone (the kernel answers ENOTCONN). Asks
/// with statfs, which always reaches the daemon: a plain stat can be
/// answered from the kernel's attribute cache for a while.
pub fn mount_is_stale(mp: &Path) -> bool {
    matches!(rustix::fs::statfs(mp), Err(e) if e == rustix::io::Errno::NOTCONN)
}

/// Join the mount table with the status files.
pub fn collect() -> Vec<Row> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let files = read_all();
    parse_mountinfo(&info)
        .into_iter()
        .map(|entry| {
            let status = files
                .iter()
                .find(|s| {
                    s.mountpoint.as_os_str().as_bytes() == entry.mountpoint.as_os_str().as_bytes()
                })
                .cloned();
            let stale = mount_is_stale(&entry.mountpoint);
            let state = match (&status, stale) {
                (_, true) => "stale",
                (Some(s), false) if !daemon_alive(s.pid) => "stale",
                (Some(_), false) => "live",
                (None, false) => "live (no details)",
            };
            Row {
                entry,
                state,
                status,
            }
        })
        .collect()
}

/// "2d 03h", "1h 02m", "4m 05s", "7s".
pub fn fmt_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Seconds since `started` (0 if the clock went backwards).
pub fn uptime(started: u64) -> u64 {
    now().saturating_sub(started)
}

/// Seconds since the epoch, for [`MountStatus::started`].
pub fn now_secs() -> u64 {
    now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_picks_sealfs_entries() {
        let info = "\
36 25 0:32 / /mnt/a\\040b rw,relatime shared:1 - fuse.sealfs /srv/a\\040store rw,user_id=0
37 25 0:33 / /mnt/c ro,nosuid - fuse.sealfs /srv/c rw,user_id=0
38 25 0:34 / /mnt/d rw - fuse.gocryptfs /srv/d rw
39 25 8:1 / / rw - ext4 /dev/sda1 rw";
        let m = parse_mountinfo(info);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].source, PathBuf::from("/srv/a store"));
        assert!(!m[0].read_only);
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/c"));
        assert!(m[1].read_only);
    }

    #[test]
    fn uptime_format() {
        assert_eq!(fmt_uptime(7), "7s");
        assert_eq!(fmt_uptime(245), "4m 05s");
        assert_eq!(fmt_uptime(3720), "1h 02m");
        assert_eq!(fmt_uptime(2 * 86400 + 3 * 3600 + 5), "2d 03h");
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
