//! `sealfs snapshot`, `clone`, `gc` and `fsck`.
//!
//! With a mounted volume the commands talk to its daemon through the
//! virtual `.snapshots` directory: `mkdir`/`rmdir` create and delete
//! snapshots, the `user.sealfs.snapshot` xattr of each describes it, and
//! setting `user.sealfs.gc` on `.snapshots` runs gc in the daemon (which
//! alone knows the chunks written since the last commit).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;

use super::{fmt_time, human, key_label, open_keystore, Global};
use crate::volume::{
    self, clone, fsck, GcReport, OpenOptions2, SnapshotInfo, Volume, SNAPDIR_NAME, XATTR_GC,
    XATTR_SNAPSHOT,
};

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot (read-only, point in time, O(metadata)).
    /// TARGET is the mountpoint of a mounted volume or a store directory.
    ///
    /// Example: sealfs snapshot create /mnt/photos before-cleanup
    Create { target: PathBuf, name: String },
    /// List snapshots: name, id, creation time, bytes referenced and bytes
    /// only the snapshot holds (freed by deleting it)
    ///
    /// Example: sealfs snapshot list /srv/photos.store
    List {
        target: PathBuf,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot and free the chunks only it held
    ///
    /// Example: sealfs snapshot delete /srv/photos.store before-cleanup
    Delete { target: PathBuf, name: String },
}

/// A target given by the user: the store and, if it is mounted
/// read-write, the mountpoint to reach the daemon through.
struct Target {
    store: PathBuf,
    mount: Option<PathBuf>,
}

fn resolve(p: &Path) -> Result<Target> {
    let abs = std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts = super::status::parse_mountinfo(&info);
    // compare canonical paths: the user may spell the store differently
    // from the path it was mounted with
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let same = |a: &Path, b: &Path| a == b || canon(a) == canon(b);
    if let Some(m) = mounts.iter().find(|m| m.mountpoint == abs) {
        return Ok(Target {
            store: m.source.clone(),
            mount: Some(abs),
        });
    }
    if !abs.join(volume::HEADER_FILE).exists() {
        bail!(
            "{} is neither a sealfs mountpoint nor a store (no {})",
            abs.display(),
            volume::HEADER_FILE
        );
    }
    let mount = mounts
        .iter()
        .find(|m| same(&m.source, &abs))
        .map(|m| m.mountpoint.clone());
    Ok(Target { store: abs, mount })
}

/// `.snapshots` of a mount, or an error if the mount has none (a mount of
/// a snapshot).
fn snapdir(mp: &Path) -> Result<PathBuf> {
    let d = mp.join(OsStr::from_bytes(SNAPDIR_NAME));
    if !d.is_dir() {
        bail!(
            "{} is a read-only mount of a snapshot; unmount it to change the store's snapshots",
            mp.display()
        );
    }
    Ok(d)
}

fn open_rw(g: &Global, store: &Path) -> Result<std::sync::Arc<Volume>> {
    let ks = open_keystore(g, false)?;
    Ok(Volume::open(store, &ks, &OpenOptions2::default())?)
}

fn getxattr(p: &Path, name: &[u8]) -> std::io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::getxattr(p, OsStr::from_bytes(name), &mut buf)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

pub fn cmd_snapshot(g: &Global, c: SnapshotCmd) -> Result<()> {
    match c {
        SnapshotCmd::Create { target, name } => {
            volume::snapshot::check_snapshot_name(&name)?;
            let t = resolve(&target)?;
            let start = Instant::now();
            let info = match &t.mount {
                Some(mp) => {
                    // Push data still in the kernel's writeback cache to
                    // the daemon first (best effort), then ask it.
                    if let Ok(f) = std::fs::File::open(mp) {
                        let _ = rustix::fs::syncfs(&f);
                    }
                    let d = snapdir(mp)?.join(&name);
                    std::fs::create_dir(&d).map_err(|e| match e.raw_os_error() {
                        Some(libc::EEXIST) => anyhow!(volume::SnapshotError::Exists(name.clone())),
                        Some(libc::EROFS) => anyhow!(
                            "{} is mounted read-only; snapshots need a read-write mount",
                            mp.display()
                        ),
                        _ => anyhow!("cannot create snapshot {name:?} in {}: {e}", mp.display()),
                    })?;
                    SnapshotInfo::from_line(&name, &getxattr(&d, XATTR_SNAPSHOT)?)
                }
                None => {
                    let vol = open_rw(g, &t.store)?;
                    let r = vol.snapshot_create(&name);
                    vol.close()
                        .map_err(|e| anyhow!("final commit failed: {e}"))?;
                    Some(r?)
                }
            };
            let took = start.elapsed();
            match info {
                Some(i) => println!(
                    "snapshot {name:?} of {} created: id {}, commit {}, {:.1} ms",
                    t.store.display(),
                    i.id,
                    i.seq,
                    took.as_secs_f64() * 1000.0
                ),
                None => println!("snapshot {name:?} of {} created", t.store.display()),
            }
            Ok(())
        }
        SnapshotCmd::Delete { target, name } => {
            let t = resolve(&target)?;
            match &t.mount {
                Some(mp) => {
                    std::fs::remove_dir(snapdir(mp)?.join(&name)).map_err(|e| {
                        match e.raw_os_error() {
                            Some(libc::ENOENT) => {
                                anyhow!(volume::SnapshotError::Unknown(name.clone()))
                            }
                            _ => anyhow!("cannot delete snapshot {name:?}: {e}"),
                        }
                    })?;
                    println!("snapshot {name:?} of {} deleted", t.store.display());
                }
                None => {
                    let vol = open_rw(g, &t.store)?;
                    let r = vol.snapshot_delete(&name);
                    vol.close()
                        .map_err(|e| anyhow!("final commit failed: {e}"))?;
                    let (n, bytes) = r?;
                    println!(
                        "snapshot {name:?} of {} deleted; freed {n} chunk objects ({})",
                        t.store.display(),
                        human(bytes)
                    );
                }
            }
            Ok(())
        }
        SnapshotCmd::List { target, json } => {
            let t = resolve(&target)?;
            let list = match &t.mount {
                Some(mp) => {
                    let d = snapdir(mp)?;
                    // fsync of the root: a commit, so that what was freed
                    // since counts as held by snapshots only (best effort)
                    if let Ok(f) = std::fs::File::open(mp) {
                        let _ = f.sync_all();
                    }
                    let mut v = Vec::new();
                    for e in std::fs::read_dir(&d)? {
                        let e = e?;
                        let name = e.file_name().to_string_lossy().into_owned();
                        let line = getxattr(&e.path(), XATTR_SNAPSHOT)?;
                        v.extend(SnapshotInfo::from_line(&name, &line));
                    }
                    v.sort_by_key(|s| (s.created, s.seq));
                    v
                }
                None => {
                    let ks = open_keystore(g, false)?;
                    let vol = Volume::open(
                        &t.store,
                        &ks,
                        &OpenOptions2 {
                            read_only: true,
                            ..Default::default()
                        },
                    )?;
                    vol.snapshot_list()
                }
            };
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name, "id": s.id, "created": s.created,
                            "commit": s.seq, "referenced_bytes": s.referenced,
                            "exclusive_bytes": s.exclusive,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("{}: no snapshots", t.store.display());
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:<20} {:>12} {:>12}",
                "NAME", "ID", "CREATED", "REFERENCED", "ONLY IT HOLDS"
            );
            for s in list {
                println!(
                    "{:<24} {:<16} {:<20} {:>12} {:>12}",
                    s.name,
                    s.id,
                    fmt_time(s.created),
                    human(s.referenced),
                    human(s.exclusive)
                );
            }
            Ok(())
        }
    }
}

fn bar(template: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(0);
    b.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    b
}

pub fn cmd_clone(
    g: &Global,
    source: &str,
    dest: &Path,
    kms_key: Option<String>,
    reencrypt: bool,
) -> Result<()> {
    // STORE@SNAP: the last '@' (snapshot names cannot contain one), unless
    // the whole argument is a store (a store path may contain '@').
    let (store, snap) = match source.rsplit_once('@') {
        Some((s, n))
            if !n.is_empty()
                && !n.contains('/')
                && !Path::new(source).join(volume::HEADER_FILE).exists() =>
        {
            (s, Some(n.to_string()))
        }
        _ => (source, None),
    };
    let store = Path::new(store);
    let ks = open_keystore(g, false)?;
    let start = Instant::now();
    let b = bar("cloning {bar:40} {pos}/{len} chunks ({percent}%) eta {eta}");
    let o = clone::CloneOptions {
        snapshot: snap.clone(),
        kms_key,
        reencrypt,
    };
    let r = clone::clone_store(store, dest, &ks, &o, &mut |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    b.finish_and_clear();
    let r = r?;
    let what = match &snap {
        Some(s) => format!("snapshot {s:?} of {}", store.display()),
        None => store.display().to_string(),
    };
    println!(
        "cloned {what} into {} in {:.2} s: new volume {}, {} files, {} chunks ({})",
        dest.display(),
        start.elapsed().as_secs_f64(),
        r.volume_id,
        r.files,
        r.chunks,
        if reencrypt {
            format!("{} re-encrypted", r.reencrypted)
        } else {
            format!("{} hard-linked, {} copied", r.linked, r.copied)
        }
    );
    if r.shares_data_key {
        println!(
            "note: the clone shares its data (content) key with its origin; its content key is wrapped by {}. \
             Anyone who can unwrap either volume's key can read both. Use --reencrypt for an independent data key.",
            key_label(&ks, &r.content_key)
        );
    } else {
        println!(
            "the clone has its own, fresh content key, wrapped by {}",
            key_label(&ks, &r.content_key)
        );
    }
    Ok(())
}

pub fn cmd_gc(g: &Global, target: &Path) -> Result<()> {
    let t = resolve(target)?;
    let start = Instant::now();
    let r = match &t.mount {
        Some(mp) => {
            let d = snapdir(mp)?;
            rustix::fs::setxattr(
                &d,
                OsStr::from_bytes(XATTR_GC),
                b"run",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| {
                anyhow!(
                    "gc in the daemon of {} failed: {e} (see its log)",
                    mp.display()
                )
            })?;
            GcReport::from_line(&getxattr(&d, XATTR_GC)?)
                .ok_or_else(|| anyhow!("the daemon sent an unreadable gc report"))?
        }
        None => {
            let vol = open_rw(g, &t.store)?;
            let b = bar("gc {bar:40} {pos}/{len} objects ({percent}%)");
            let r = vol.gc(&mut |done, total| {
                b.set_length(total);
                b.set_position(done);
            });
            b.finish_and_clear();
            vol.close()
                .map_err(|e| anyhow!("final commit failed: {e}"))?;
            r?
        }
    };
    println!(
        "gc of {}: {} chunk objects in use; removed {} unreferenced chunk objects ({}) and {} stale metadata objects in {:.2} s",
        t.store.display(),
        r.referenced,
        r.chunks_removed,
        human(r.bytes_removed),
        r.meta_removed,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn cmd_fsck(g: &Global, store: &Path, repair: bool) -> Result<()> {
    let ks = open_keystore(g, false)?;
    let b = bar("verifying {bar:40} {pos}/{len} chunks ({percent}%) eta {eta}");
    let r = fsck::fsck(store, &ks, repair, &mut |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    b.finish_and_clear();
    let r = r.map_err(|e| match e {
        volume::OpenError::InUse { .. } => {
            anyhow!("{e}. fsck needs the store unmounted; `sealfs gc` is safe while mounted")
        }
        other => anyhow!(other),
    })?;
    for p in &r.problems {
        println!("{}: {}: {}", p.kind, p.object, p.detail);
        for path in &p.paths {
            println!("    affects {path}");
        }
    }
    println!(
        "{}: checked {} volume states, {} files, {} chunk objects; {} problems{}",
        store.display(),
        r.states,
        r.files,
        r.chunks_checked,
        r.problems.len(),
        if repair {
            format!(", {} orphans removed", r.repaired)
        } else {
            String::new()
        }
    );
    if !r.clean() {
        let only_orphans = r
            .problems
            .iter()
            .all(|p| p.kind == fsck::ProblemKind::Orphan);
        if only_orphans && !repair {
            bail!(
                "{} has unreferenced objects (harmless leftovers of a crash); remove them with `sealfs fsck --repair {}` or `sealfs gc`",
                store.display(),
                store.display()
            );
        }
        bail!(
            "{} is damaged: see the list above (files listed as affected cannot be read in full; restore them from a backup or a snapshot)",
            store.display()
        );
    }
    Ok(())
}
