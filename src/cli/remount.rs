//! `sealfs mount -o remount[,ro|,rw] STORE MOUNTPOINT`, which mount(8)
//! runs (through the helper) for `mount -o remount,ro MOUNTPOINT`.
//!
//! The kernel does not tell a FUSE daemon about a remount; it flips the
//! superblock's read-only flag itself (after writing back its cached data
//! to the daemon) and from then on refuses every change with EROFS. So a
//! remount here is: remount(2) of the kernel mount, keeping its other
//! per-mount flags, and, when going read-only, an fsync of the mount's
//! root, which makes the daemon commit everything it holds.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::status;

/// Whether the mount options ask for a remount.
pub fn requested(raw_opts: &[String]) -> bool {
    raw_opts
        .iter()
        .flat_map(|r| r.split(','))
        .any(|o| o.trim() == "remount")
}

/// Read-only wanted? The last `ro` / `rw` wins; None if neither is given.
/// Every other option is ignored on remount (the mount keeps the values it
/// was mounted with).
fn wanted_ro(raw_opts: &[String]) -> Option<bool> {
    let mut ro = None;
    for o in raw_opts.iter().flat_map(|r| r.split(',')).map(str::trim) {
        match o {
            "ro" => ro = Some(true),
            "rw" => ro = Some(false),
            _ => {}
        }
    }
    ro
}

/// The per-mount options field of the sealfs mount on `mp`, if there is one.
fn mount_options(mp: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        if f.len() < 6 || !post.starts_with("fuse.sealfs ") {
            continue;
        }
        if Path::new(&status::unescape_mountinfo(f[4])) == mp {
            // the last entry for a path is the one on top
            found = Some(f[5].to_string());
        }
    }
    found
}

/// Carry out a remount of the sealfs mount on `mountpoint`.
pub fn run(mountpoint: &Path, raw_opts: &[String]) -> Result<()> {
    use rustix::mount::MountFlags as F;
    let mp = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("cannot remount {}", mountpoint.display()))?;
    let Some(cur) = mount_options(&mp) else {
        bail!(
            "cannot remount {}: no sealfs volume is mounted there",
            mp.display()
        );
    };
    let was_ro = cur.split(',').any(|o| o == "ro");
    let ro = wanted_ro(raw_opts).unwrap_or(was_ro);
    if !ro {
        // A daemon that opened the volume read-only cannot start writing.
        let started_ro = status::read_all()
            .into_iter()
            .any(|s| s.mountpoint == mp && s.read_only);
        if started_ro {
            bail!(
                "cannot remount {} read-write: it was mounted read-only, and the daemon \
                 opened the volume that way; unmount it and mount it again without `ro`",
                mp.display()
            );
        }
    }
    let mut flags = F::empty();
    for (name, f) in [
        ("nosuid", F::NOSUID),
        ("nodev", F::NODEV),
        ("noexec", F::NOEXEC),
        ("noatime", F::NOATIME),
        ("nodiratime", F::NODIRATIME),
        ("relatime", F::RELATIME),
    ] {
        if cur.split(',').any(|o| o == name) {
            flags |= f;
        }
    }
    if ro {
        flags |= F::RDONLY;
    }
    rustix::mount::mount_remount(&mp, flags, c"").map_err(|e| {
        let hint = match e {
            rustix::io::Errno::BUSY => " (a file is open for writing)",
            rustix::io::Errno::PERM => " (remounting needs root)",
            _ => "",
        };
        anyhow!(
            "cannot remount {} {}: {e}{hint}",
            mp.display(),
            if ro { "read-only" } else { "read-write" }
        )
    })?;
    // The kernel does not tell the daemon about a remount: an fsync of the
    // root makes it look at the mount table (from read-only on, reads no
    // longer update atime, so nothing changes or is committed) and, when
    // going read-only, commit what the kernel wrote back before turning
    // read-only (and everything else it holds).
    let root = std::fs::File::open(&mp)
        .with_context(|| format!("cannot open {} to commit", mp.display()))?;
    root.sync_all().map_err(|e| {
        anyhow!(
            "{} is {} now, but committing its data failed: {e}",
            mp.display(),
            if ro { "read-only" } else { "read-write" }
        )
    })?;
    log::info!(
        "remounted {} {}",
        mp.display(),
        if ro { "read-only" } else { "read-write" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remount_options() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(requested(&o(&["remount,ro"])));
        assert!(requested(&o(&["rw", "remount"])));
        assert!(!requested(&o(&["ro,noatime"])));
        assert_eq!(wanted_ro(&o(&["remount,ro"])), Some(true));
        assert_eq!(wanted_ro(&o(&["ro,remount,rw"])), Some(false));
        assert_eq!(wanted_ro(&o(&["remount,user_id=0,bogus"])), None);
    }
}
