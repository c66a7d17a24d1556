//! The `sealfs` command line: subcommands, secrets, mounting and
//! daemonizing. Errors are reported with context here, at the edge.

pub mod helper;
pub mod key;
mod key_data;
mod keystore_cmd;
pub mod logging;
pub mod options;
mod remount;
mod snapshot;
pub mod status;

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

use crate::kms::{self, Keystore, KeystoreSecret};
use crate::volume::{self, CreateOptions, OpenOptions2, Volume};
use key::KeyCmd;
use options::MountOpts;
use status::unescape_mountinfo;

/// sealfs — an encrypted filesystem with real key management.
///
/// File content is sealed under a master key you choose from the local
/// keystore; metadata under the sealfs service key. Quick start:
///
///   sealfs init --key-file ~/.config/sealfs/keystore.key --generate-key-file
///   sealfs key create --alias photos
///   sealfs create /srv/photos.store --kms-key alias/photos
///   sealfs mount /srv/photos.store /mnt/photos
///   sealfs umount /mnt/photos
#[derive(Parser, Debug)]
#[command(name = "sealfs", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options every command accepts.
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// Keystore file [default: $SEALFS_KEYSTORE or ~/.config/sealfs/keystore]
    #[arg(long, global = true, env = "SEALFS_KEYSTORE", value_name = "PATH")]
    pub keystore: Option<PathBuf>,
    /// Unlock the keystore with this 32-byte key file (unattended use)
    #[arg(
        long,
        global = true,
        env = "SEALFS_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "passphrase_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Read the keystore passphrase from the first line of this file
    #[arg(
        long,
        global = true,
        env = "SEALFS_PASSPHRASE_FILE",
        value_name = "PATH"
    )]
    pub passphrase_file: Option<PathBuf>,
    /// Log more (repeat for debug output)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Take over a store's writer lease held by another machine. Only
    /// when that machine is down or no longer uses the store: if it is
    /// still writing, the two fork the volume's history and one loses
    /// its writes. (A lease of a dead process on this machine is taken
    /// over without it.)
    #[arg(long, global = true)]
    pub force_unlock: bool,
    /// Accept a store whose history differs from what this machine saw
    /// last (an older or another copy, as after restoring a backup on
    /// purpose) and record it as it is now. Logged.
    #[arg(long, global = true)]
    pub accept_rollback: bool,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create the keystore (with its service key and default content key)
    ///
    /// Example: sealfs init --key-file /etc/sealfs/keystore.key --generate-key-file
    Init {
        /// With --key-file: write a new random key file there first (mode 0600)
        #[arg(long)]
        generate_key_file: bool,
    },
    /// Manage master keys in the keystore
    #[command(subcommand)]
    Key(KeyCmd),
    /// Manage custom key stores: PKCS#11 tokens (HSMs) that hold master keys
    #[command(subcommand)]
    KeyStore(keystore_cmd::KeyStoreCmd),
    /// Create a new encrypted volume (store directory)
    ///
    /// Example: sealfs create /srv/photos.store --kms-key alias/photos
    Create {
        /// Store directory to create (must be missing or empty)
        store: PathBuf,
        /// Master key (id or alias) that protects file content
        /// [default: the service-managed alias/sealfs/default]
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
        /// Chunk size in bytes (power of two, 4096..16777216)
        #[arg(long, default_value_t = volume::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// Mount a volume; returns once the mount is live (-f stays in front)
    ///
    /// Options (-o, comma-separated): ro, rw, allow_other, allow_root,
    /// remount (with ro/rw: switch a live mount), relatime, strictatime,
    /// noatime, nosuid, nodev, noexec, nonempty, keystore=PATH,
    /// key_file=PATH, passphrase_file=PATH,
    /// threads=N (request threads, default: CPU count, at least 4),
    /// cache_size=MiB (decrypted-chunk cache, default 256),
    /// dirty_size=MiB (written data held before encrypting, default 512;
    /// it is always committed within commit_interval and on fsync),
    /// commit_interval=SECONDS (default 5), debug, log=FILE (a background
    /// mount logs there, by default to $SEALFS_STATE_DIR/log/VOLUME_ID.log,
    /// state dir /var/lib/sealfs for root, ~/.local/state/sealfs otherwise).
    /// mount(8) options such as defaults, nofail, _netdev, noauto, user and
    /// x-systemd.* are accepted and ignored; default_permissions is always on.
    ///
    /// Example: sealfs mount -o allow_other /srv/photos.store /mnt/photos
    #[command(verbatim_doc_comment)]
    Mount {
        /// Store directory
        store: PathBuf,
        /// Empty directory to mount on
        mountpoint: PathBuf,
        /// Stay in the foreground (log to stderr)
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated (repeatable)
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Mount this snapshot, read-only (same as -o snapshot=NAME)
        #[arg(long, value_name = "NAME")]
        snapshot: Option<String>,
        /// Internal: run as the background daemon started by `sealfs mount`
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Check options, store and mountpoint, then stop without mounting
        /// (what `mount -f` asks of a helper)
        #[arg(long, hide = true)]
        fake: bool,
    },
    /// Unmount a sealfs mount and wait until everything is written
    ///
    /// Example: sealfs umount /mnt/photos
    #[command(alias = "unmount")]
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if busy or if the daemon is gone (umount -l)
        #[arg(short, long)]
        lazy: bool,
    },
    /// Re-wrap a volume's content key under the newest version of its
    /// master key, or under another key: O(1), no content is re-encrypted
    /// (the data key stays the same; use `rekey` for a new one). The
    /// volume must not be mounted (mount re-wraps to the newest version
    /// by itself).
    ///
    /// Example: sealfs rewrap /srv/photos.store --kms-key alias/photos-2027
    Rewrap {
        store: PathBuf,
        /// Master key to wrap under [default: the current one, newest version]
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
    },
    /// Full re-key: a fresh content key (under --kms-key, or the current
    /// master key), every chunk and inline file re-encrypted, with a
    /// progress bar. Resumable: if interrupted, run it again; nothing is
    /// lost at any point. Afterwards the previous key is no longer needed.
    /// The volume must not be mounted.
    ///
    /// Example: sealfs rekey /srv/photos.store --kms-key alias/photos-2027
    Rekey {
        store: PathBuf,
        /// Master key for the new content key [default: the current one]
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
    },
    /// List live sealfs mounts: store, mountpoint, volume, key, mode,
    /// uptime and bytes read/written (stale mounts whose daemon died too)
    ///
    /// Example: sealfs status
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Snapshots: create, list, delete (by mountpoint when mounted, by
    /// store path when not)
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Clone a snapshot (STORE@SNAPSHOT), or a store that is not mounted,
    /// into a new, independent store. Without --reencrypt the clone shares
    /// the chunk objects (hard links on the same file system, else copies)
    /// and the data key of its origin; --kms-key only re-wraps that key.
    /// --reencrypt gives it a fresh data key and re-seals every chunk.
    ///
    /// Example: sealfs clone /srv/photos.store@before-cleanup /srv/copy.store --kms-key alias/other
    Clone {
        /// STORE@SNAPSHOT, or STORE for its live state (not mounted)
        source: String,
        /// New store directory (missing or empty)
        dest: PathBuf,
        /// Master key for the clone's content key [default: the origin's]
        #[arg(long, value_name = "KEY")]
        kms_key: Option<String>,
        /// Fresh content key; decrypt and re-seal every chunk (copies)
        #[arg(long)]
        reencrypt: bool,
    },
    /// Remove objects that neither the live volume nor any snapshot
    /// references (left by crashes). Safe while mounted: it then runs in
    /// the mount's daemon. TARGET is a store or a mountpoint.
    ///
    /// Example: sealfs gc /srv/photos.store
    Gc { target: PathBuf },
    /// Verify every object and record of a store (live volume and every
    /// snapshot); list missing, damaged and orphaned objects with the
    /// files they affect. Exits non-zero when anything is wrong. The store
    /// must not be mounted.
    ///
    /// Example: sealfs fsck /srv/photos.store
    Fsck {
        store: PathBuf,
        /// Remove orphaned objects (never anything a state references)
        #[arg(long)]
        repair: bool,
    },
    /// Show a volume's id, keys, chunk size and usage
    ///
    /// Example: sealfs info /srv/photos.store
    Info {
        store: PathBuf,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

/// An error and its causes on one line, leaving out a cause whose text
/// the message before it already contains (many errors quote their
/// source).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

/// Exit status of a mount helper whose mount failed (mount(8)'s "mount
/// failure"); invocation errors exit with 1.
const HELPER_MOUNT_FAILURE: i32 = 32;

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (args, helper_mode) = match helper::translate(&args) {
        Ok(Some(a)) => (a, true),
        Ok(None) => (args, false),
        Err(e) => {
            eprintln!("sealfs: error: {e}");
            return 1;
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match (e.use_stderr(), helper_mode) {
                (false, _) => 0,
                (true, true) => 1,
                (true, false) => 2,
            };
        }
    };
    let debug_opt = matches!(&cli.cmd, Cmd::Mount { options, .. }
        if options.iter().any(|o| o.split(',').any(|x| x.trim() == "debug")));
    let level = match cli.global.verbose.max(if debug_opt { 2 } else { 0 }) {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    logging::init(level);
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sealfs: error: {}", error_text(&e));
            if helper_mode {
                HELPER_MOUNT_FAILURE
            } else {
                1
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    let what = match &cli.cmd {
        Cmd::Mount { mountpoint, .. } => format!(
            "mount {}",
            std::path::absolute(mountpoint)
                .unwrap_or_else(|_| mountpoint.clone())
                .display()
        ),
        Cmd::Fsck { repair: true, .. } => "fsck --repair".into(),
        Cmd::Snapshot(_) => "snapshot".into(),
        other => format!("{other:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("sealfs")
            .to_lowercase(),
    };
    crate::store::set_lock_context(&what, g.force_unlock);
    volume::ACCEPT_ROLLBACK.store(g.accept_rollback, std::sync::atomic::Ordering::Relaxed);
    // A store URL (s3://...) is refused before anything touches the disk.
    let locations: Vec<&Path> = match &cli.cmd {
        Cmd::Create { store, .. }
        | Cmd::Rewrap { store, .. }
        | Cmd::Rekey { store, .. }
        | Cmd::Info { store, .. }
        | Cmd::Fsck { store, .. } => vec![store.as_path()],
        Cmd::Mount { store, options, .. } if !remount::requested(options) => vec![store.as_path()],
        Cmd::Gc { target } => vec![target.as_path()],
        Cmd::Clone { source, dest, .. } => vec![Path::new(source.as_str()), dest.as_path()],
        _ => vec![],
    };
    for l in locations {
        crate::store::check_location(l)?;
    }
    // Commands that change a store refuse while it is mounted, whatever
    // its lock file says (it may have been deleted or replaced).
    match &cli.cmd {
        Cmd::Rewrap { store, .. } => refuse_if_mounted(store, "re-wrapping its key")?,
        Cmd::Rekey { store, .. } => refuse_if_mounted(store, "re-keying it")?,
        Cmd::Fsck { store, .. } => refuse_if_mounted(store, "checking it (`sealfs gc` is safe while mounted)")?,
        Cmd::Clone { source, .. } if !source.contains('@') => refuse_if_mounted(
            Path::new(source),
            "cloning its live state (take a snapshot and clone that: `sealfs snapshot create MOUNTPOINT NAME`, then `sealfs clone STORE@NAME ...`)",
        )?,
        _ => {}
    }
    match cli.cmd {
        Cmd::Init { generate_key_file } => cmd_init(&g, generate_key_file),
        Cmd::Key(k) => key::cmd_key(&g, k),
        Cmd::KeyStore(c) => keystore_cmd::cmd_key_store(&g, c),
        Cmd::Create {
            store,
            kms_key,
            chunk_size,
        } => cmd_create(&g, &store, kms_key, chunk_size),
        Cmd::Mount {
            store,
            mountpoint,
            foreground,
            mut options,
            snapshot,
            daemon_child,
            fake,
        } => {
            if remount::requested(&options) {
                // `mount -o remount,ro|rw`: store and other options are
                // only what mount(8) passes along.
                let _ = store;
                if fake {
                    return Ok(());
                }
                return remount::run(&mountpoint, &options);
            }
            if let Some(s) = snapshot {
                options.push(format!("snapshot={s}"));
            }
            if fake {
                return check_mount(&g, &store, &mountpoint, &options).map(|_| ());
            }
            cmd_mount(&g, &store, &mountpoint, foreground, &options, daemon_child)
        }
        Cmd::Umount { mountpoint, lazy } => cmd_umount(&mountpoint, lazy),
        Cmd::Info { store, json } => cmd_info(&g, &store, json),
        Cmd::Status { json } => cmd_status(json),
        Cmd::Rewrap { store, kms_key } => cmd_rewrap(&g, &store, kms_key.as_deref()),
        Cmd::Rekey { store, kms_key } => cmd_rekey(&g, &store, kms_key.as_deref()),
        Cmd::Snapshot(c) => snapshot::cmd_snapshot(&g, c),
        Cmd::Clone {
            source,
            dest,
            kms_key,
            reencrypt,
        } => snapshot::cmd_clone(&g, &source, &dest, kms_key, reencrypt),
        Cmd::Gc { target } => snapshot::cmd_gc(&g, &target),
        Cmd::Fsck { store, repair } => snapshot::cmd_fsck(&g, &store, repair),
    }
}

pub(crate) fn keystore_path(g: &Global) -> PathBuf {
    g.keystore
        .clone()
        .unwrap_or_else(kms::default_keystore_path)
}

/// Get the keystore secret: key file, passphrase file, or a prompt.
pub(crate) fn secret(g: &Global, ks_path: &Path, creating: bool) -> Result<KeystoreSecret> {
    if let Some(kf) = &g.key_file {
        return Ok(KeystoreSecret::from_key_file(kf)?);
    }
    if let Some(pf) = &g.passphrase_file {
        let s = KeystoreSecret::from_passphrase_file(pf)?;
        if let KeystoreSecret::Passphrase(p) = &s {
            if creating && p.chars().count() < 8 {
                bail!(
                    "passphrase in {} is too short: use at least 8 characters",
                    pf.display()
                );
            }
        }
        return Ok(s);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "keystore {} needs a passphrase or key file, and there is no terminal to ask on: pass --key-file or --passphrase-file",
            ks_path.display()
        );
    }
    let p = Zeroizing::new(
        rpassword::prompt_password(format!("Passphrase for keystore {}: ", ks_path.display()))
            .context("cannot read the passphrase from the terminal")?,
    );
    if creating {
        if p.len() < 8 {
            bail!("passphrase too short: use at least 8 characters");
        }
        let again = Zeroizing::new(
            rpassword::prompt_password("Repeat the passphrase: ")
                .context("cannot read the passphrase from the terminal")?,
        );
        if !crate::crypto::ct_eq(p.as_bytes(), again.as_bytes()) {
            bail!("the passphrases do not match; nothing was created");
        }
    }
    Ok(KeystoreSecret::Passphrase(Zeroizing::new(p.to_string())))
}

pub(crate) fn open_keystore(g: &Global, for_update: bool) -> Result<Keystore> {
    let p = keystore_path(g);
    if !p.exists() {
        return Err(kms::KmsError::NotFound(p).into());
    }
    let s = secret(g, &p, false)?;
    Ok(Keystore::open(&p, &s, for_update)?)
}

pub(crate) fn open_or_create_keystore(g: &Global) -> Result<Keystore> {
    let p = keystore_path(g);
    let creating = !p.exists();
    let s = secret(g, &p, creating)?;
    let (ks, created) = Keystore::open_or_create(&p, &s)?;
    if created {
        eprintln!("sealfs: created keystore {}", p.display());
    }
    Ok(ks)
}

fn cmd_init(g: &Global, generate: bool) -> Result<()> {
    let p = keystore_path(g);
    if generate {
        let kf = g.key_file.as_ref().ok_or_else(|| {
            anyhow!("--generate-key-file needs --key-file PATH to say where to write it")
        })?;
        if !kf.exists() {
            if let Some(d) = kf.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
            }
            kms::generate_key_file(kf)?;
            eprintln!(
                "sealfs: wrote new key file {} (keep it safe: it unlocks the keystore)",
                kf.display()
            );
        }
    }
    if p.exists() {
        // Verify that the secret opens it, so `init` is idempotent.
        open_keystore(g, false)?;
        println!(
            "keystore {} already exists and unlocks with the given secret",
            p.display()
        );
        return Ok(());
    }
    let s = secret(g, &p, true)?;
    Keystore::create(&p, &s)?;
    println!("created keystore {}", p.display());
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub(crate) fn fmt_time(secs: u64) -> String {
    kms::fmt_date(secs)
}

fn cmd_create(g: &Global, store: &Path, kms_key: Option<String>, chunk_size: u32) -> Result<()> {
    let ks = open_or_create_keystore(g)?;
    let defaulted = kms_key.is_none();
    let key = kms_key.unwrap_or_else(|| kms::DEFAULT_CONTENT_KEY_ALIAS.to_string());
    let opts = CreateOptions {
        chunk_size,
        kms_key: key.clone(),
        ..Default::default()
    };
    let mk = ks.resolve(&key)?.clone();
    let vid = Volume::create(store, &ks, &opts)?;
    if defaulted {
        eprintln!(
            "sealfs: no --kms-key given: file content is protected by the service-managed default key {} ({}); create your own with `sealfs key create --alias NAME`",
            kms::DEFAULT_CONTENT_KEY_ALIAS, mk.id
        );
    }
    println!("created volume {vid} at {}", store.display());
    println!(
        "content key: {} v{} ({})",
        mk.id,
        mk.current_version(),
        mk.aliases.join(",")
    );
    Ok(())
}

fn key_label(ks: &Keystore, id: &str) -> String {
    match ks.resolve(id) {
        Ok(k) if !k.aliases.is_empty() => {
            format!("{} ({}, {:?})", id, k.aliases.join(","), k.state)
        }
        Ok(k) => format!("{} ({:?})", id, k.state),
        Err(_) => format!("{id} (not in this keystore)"),
    }
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn cmd_info(g: &Global, store: &Path, json: bool) -> Result<()> {
    let ks = open_keystore(g, false)?;
    let i = Volume::info(store, &ks)?;
    let in_use = store_in_use(store);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "volume_id": i.store_id,
                "store": store,
                "format_version": i.format_version,
                "created": fmt_time(i.created),
                "chunk_size": i.chunk_size,
                "inline_max": i.inline_max,
                "metadata_key": {"id": i.metadata_key.0, "version": i.metadata_key.1},
                "content_key": {"id": i.content_key.0, "version": i.content_key.1},
                "content_key_generation": i.content_gen,
                "content_unavailable": i.content_unavailable,
                "chunk_objects": i.chunk_objects,
                "chunk_bytes": i.chunk_bytes,
                "metadata_objects": i.meta_objects,
                "metadata_bytes": i.meta_bytes,
                "snapshots": i.snapshots,
                "shares_data_of": i.shares_data_of,
                "in_use": in_use,
            }))?
        );
        return Ok(());
    }
    println!("Store:          {}", store.display());
    println!("Volume id:      {}", i.store_id);
    println!("Format:         version {}", i.format_version);
    println!("Created:        {}", fmt_time(i.created));
    println!(
        "Chunk size:     {} ({} B inline limit)",
        human(i.chunk_size as u64),
        i.inline_max
    );
    println!(
        "Metadata key:   {} v{}",
        key_label(&ks, &i.metadata_key.0),
        i.metadata_key.1
    );
    println!(
        "Content key:    {} v{} (generation {})",
        key_label(&ks, &i.content_key.0),
        i.content_key.1,
        i.content_gen
    );
    if let Some(why) = &i.content_unavailable {
        println!("Content:        UNAVAILABLE: {why}");
    }
    println!(
        "Chunks:         {} objects, {}",
        i.chunk_objects,
        human(i.chunk_bytes)
    );
    println!(
        "Metadata:       {} objects, {}",
        i.meta_objects,
        human(i.meta_bytes)
    );
    println!("Snapshots:      {}", i.snapshots);
    if let Some(origin) = &i.shares_data_of {
        println!("Data id:        {origin} (a clone of that volume, made without --reencrypt)");
    }
    println!(
        "In use:         {}",
        if in_use {
            "yes (mounted or being changed)"
        } else {
            "no"
        }
    );
    Ok(())
}

/// Whether another process holds the store lock (opened without
/// following links; anything but a plain lock file reads as not held).
fn store_in_use(store: &Path) -> bool {
    crate::store::LocalDirStore::open(store).is_ok_and(|s| s.lock_file_held())
}

/// Refuse to change `store` while it is mounted (the mount table).
pub(crate) fn refuse_if_mounted(store: &Path, doing: &str) -> Result<()> {
    let abs = std::path::absolute(store).unwrap_or_else(|_| store.to_path_buf());
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(m) = status::parse_mountinfo(&info)
        .into_iter()
        .find(|m| m.source == abs || canon(&m.source) == canon(&abs))
    {
        bail!(
            "store {} is in use: it is mounted at {}; unmount it (`sealfs umount {}`) before {doing}",
            abs.display(),
            m.mountpoint.display(),
            m.mountpoint.display()
        );
    }
    Ok(())
}

fn check_mountpoint(mp: &Path, nonempty: bool) -> Result<()> {
    let md = std::fs::metadata(mp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("mountpoint {} does not exist; create it with `mkdir -p {}`", mp.display(), mp.display())
        } else if e.raw_os_error() == Some(libc::ENOTCONN) {
            anyhow!("mountpoint {} is a stale mount (its daemon died); clear it with `sealfs umount {}`", mp.display(), mp.display())
        } else {
            anyhow!("mountpoint {}: {e}", mp.display())
        }
    })?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mp.display());
    }
    if !nonempty {
        let mut rd = std::fs::read_dir(mp)
            .with_context(|| format!("cannot read mountpoint {}", mp.display()))?;
        if rd.next().is_some() {
            bail!(
                "mountpoint {} is not empty; mount on an empty directory (or pass -o nonempty to hide its contents)",
                mp.display()
            );
        }
    }
    Ok(())
}

/// How long a mount waits for the daemon of an unmounted mount of the same
/// store to release it, and how long of that it waits without a word.
const LOCKED_STORE_WAIT: Duration = Duration::from_secs(30);
const LOCKED_STORE_QUIET: Duration = Duration::from_secs(5);

/// Everything a mount needs, checked before anything is mounted: options,
/// store and mountpoint. Returns the effective global options (mount
/// options override them), absolute paths and the parsed options.
fn check_mount(
    g: &Global,
    store: &Path,
    mountpoint: &Path,
    raw_opts: &[String],
) -> Result<(Global, PathBuf, PathBuf, MountOpts)> {
    let mut o = MountOpts::default();
    for r in raw_opts {
        options::parse_into(&mut o, r).map_err(|e| anyhow!(e))?;
    }
    if o.snapshot.is_some() {
        // a snapshot is read-only, whatever else the options say
        o.read_only = true;
    }
    let mut g = g.clone();
    if o.keystore.is_some() {
        g.keystore = o.keystore.clone();
    }
    if o.key_file.is_some() {
        g.key_file = o.key_file.clone();
        g.passphrase_file = None;
    }
    if o.passphrase_file.is_some() {
        g.passphrase_file = o.passphrase_file.clone();
        g.key_file = None;
    }
    let store = std::path::absolute(store)
        .with_context(|| format!("bad store path {}", store.display()))?;
    let mountpoint = std::path::absolute(mountpoint)
        .with_context(|| format!("bad mountpoint {}", mountpoint.display()))?;
    if !store.join(volume::HEADER_FILE).exists() {
        bail!(
            "{} is not a sealfs store (no {}); create one with `sealfs create`",
            store.display(),
            volume::HEADER_FILE
        );
    }
    if status::mount_is_stale(&mountpoint) {
        bail!(
            "mountpoint {} is a stale mount (its daemon died); clear it with `sealfs umount {}`",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    if let Some((src, fstype)) = mount_source(&mountpoint) {
        bail!(
            "{} is already a mount point ({fstype} from {}); unmount it first (`sealfs umount {}`)",
            mountpoint.display(),
            src.display(),
            mountpoint.display()
        );
    }
    check_mountpoint(&mountpoint, o.nonempty)?;
    if o.log.as_deref() == Some(Path::new(options::LOG_SYSLOG)) && !logging::syslog_available() {
        bail!(
            "mount option 'log=syslog': there is no syslog socket (/dev/log); \
             start systemd-journald or rsyslog, or use log=FILE"
        );
    }
    if store_in_use(&store) && !store_mounted(&store) {
        // An unmounted store whose lock is still held: most likely the
        // daemon of a mount just unmounted with umount(8) (which does not
        // wait for it) is still writing its final commit. Give it time,
        // quietly at first: that usually takes well under a second.
        log::debug!(
            "store {} is still locked; waiting for the previous daemon to finish",
            store.display()
        );
        let start = Instant::now();
        let mut warned = false;
        while store_in_use(&store) && start.elapsed() < LOCKED_STORE_WAIT {
            if !warned && start.elapsed() >= LOCKED_STORE_QUIET {
                warned = true;
                log::warn!(
                    "store {} is still locked after {} s; waiting up to {} s for the previous daemon to finish its final commit",
                    store.display(),
                    LOCKED_STORE_QUIET.as_secs(),
                    LOCKED_STORE_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if store_in_use(&store) {
        bail!(
            "store {} is in use (mounted, or being changed by another sealfs command); \
             see `sealfs status`, and unmount it first",
            store.display()
        );
    }
    if (o.allow_other || o.allow_root)
        && !rustix::process::geteuid().is_root()
        && !fuse_conf_allows_other(&std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default())
    {
        bail!(
            "mount option '{}' for a non-root user needs `user_allow_other` in /etc/fuse.conf \
             (ask an administrator to add that line), or mount without it",
            if o.allow_other {
                "allow_other"
            } else {
                "allow_root"
            }
        );
    }
    Ok((g, store, mountpoint, o))
}

/// Whether the mount table shows a sealfs mount of `store`.
fn store_mounted(store: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    status::parse_mountinfo(&info)
        .iter()
        .any(|m| m.source == store)
}

/// Whether /etc/fuse.conf text enables `user_allow_other`.
fn fuse_conf_allows_other(conf: &str) -> bool {
    conf.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .any(|l| l == "user_allow_other")
}

fn cmd_mount(
    g: &Global,
    store: &Path,
    mountpoint: &Path,
    foreground: bool,
    raw_opts: &[String],
    daemon_child: bool,
) -> Result<()> {
    let (g, store, mountpoint, o) = check_mount(g, store, mountpoint, raw_opts)?;
    if daemon_child {
        return run_daemon_child(&g, &store, &mountpoint, &o);
    }
    if foreground {
        let ks = open_keystore(&g, false)?;
        let vol = open_volume(&store, &ks, &o)?;
        let key = key_label(&ks, &vol.content_key_id().0);
        return serve(vol, &store, &mountpoint, &o, key, ks, || {});
    }
    spawn_daemon(&g, &store, &mountpoint, raw_opts)
}

fn open_volume(store: &Path, ks: &Keystore, o: &MountOpts) -> Result<Arc<Volume>> {
    let vo = OpenOptions2 {
        read_only: o.read_only,
        snapshot: o.snapshot.clone(),
        cache_bytes: o.cache_mib << 20,
        dirty_bytes: o.dirty_mib << 20,
        ..Default::default()
    };
    let vol = Volume::open(store, ks, &vo)?;
    Ok(vol)
}

/// Mount and serve until unmounted. `ready` runs once the mount is live.
fn serve(
    vol: Arc<Volume>,
    store: &Path,
    mountpoint: &Path,
    o: &MountOpts,
    key: String,
    ks: Keystore,
    ready: impl FnOnce(),
) -> Result<()> {
    use fuser::MountOption as M;
    let mut mo = vec![
        M::FSName(store.display().to_string()),
        M::Subtype("sealfs".into()),
        M::DefaultPermissions,
    ];
    if o.read_only {
        mo.push(M::RO);
    }
    if o.noatime {
        mo.push(M::NoAtime);
    }
    if o.nosuid {
        mo.push(M::NoSuid);
    }
    if o.nodev {
        mo.push(M::NoDev);
    }
    if o.noexec {
        mo.push(M::NoExec);
    }
    let mut cfg = fuser::Config::default();
    cfg.mount_options = mo;
    cfg.n_threads = Some(o.threads);
    cfg.acl = if o.allow_other {
        fuser::SessionACL::All
    } else if o.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    vol.start_background_commits(Duration::from_secs(o.commit_secs));
    let atime = if o.noatime {
        crate::volume::AtimeMode::NoAtime
    } else if o.strictatime {
        crate::volume::AtimeMode::Strict
    } else {
        crate::volume::AtimeMode::Relatime
    };
    let fs = crate::fuse::SealFs::new(vol.clone(), o.threads, atime).with_mountpoint(mountpoint);
    let notifier_slot = fs.notifier_slot();
    let (session, own_mount) = mount_session(fs, store, mountpoint, o, &cfg)?;
    let mut session = session;
    let _ = notifier_slot.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    let watcher = KeyWatcher::start(vol.clone(), ks, mountpoint, session.notifier())?;
    // SIGTERM / SIGINT / SIGHUP: unmount cleanly; the session then ends and
    // everything is committed below.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let sig_handle = signals.handle();
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("sealfs-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: unmounting {}", mp.display());
                if own_mount {
                    if rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::empty()).is_err() {
                        let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
                    }
                } else if unmounter.unmount().is_err() {
                    let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
                }
            }
        })
        .context("cannot start the signal thread")?;
    log::info!("mounted {} on {}", store.display(), mountpoint.display());
    let (key_id, key_version) = vol.content_key_id();
    let publisher = status::Publisher::start(
        &vol,
        status::MountStatus {
            pid: std::process::id(),
            store: store.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            volume_id: vol.id(),
            key_id,
            key_version,
            key,
            read_only: o.read_only,
            started: status::now_secs(),
            bytes_read: 0,
            bytes_written: 0,
        },
    );
    ready();
    let r = session.run();
    drop(watcher);
    sig_handle.close();
    let closed = vol.close();
    drop(publisher);
    r.with_context(|| {
        format!(
            "FUSE session for {} ended with an error",
            mountpoint.display()
        )
    })?;
    closed.map_err(|e| anyhow!("final commit of {} failed: {e}", store.display()))?;
    Ok(())
}

/// Watches the keystore for the mounted volume's content key: within
/// about two seconds of the key becoming unusable (disabled, scheduled for
/// deletion, material deleted, destroyed) file content is revoked; when
/// it is usable again, content comes back. Each check re-reads the keystore
/// with the key derived at mount (no passphrase is kept); re-reading is
/// also the "keystore access" that carries out due deletions. A keystore
/// that cannot be re-read (missing, damaged, failing authentication,
/// re-sealed, older than one seen) revokes content too: it fails closed.
struct KeyWatcher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often a mounted volume re-checks its key.
const KEY_CHECK_INTERVAL: Duration = Duration::from_secs(2);

impl KeyWatcher {
    fn start(
        vol: Arc<Volume>,
        ks: Keystore,
        mountpoint: &Path,
        notifier: fuser::Notifier,
    ) -> Result<KeyWatcher> {
        use std::sync::atomic::{AtomicBool, Ordering};
        // The daemon keeps the keystore key and every master key for its
        // whole life: keep them (and cached plaintext) out of swap.
        match crate::crypto::lock_process_memory() {
            Ok(()) => log::debug!("memory locked in RAM (mlockall): keys are never swapped out"),
            Err(e) => log::warn!(
                "cannot lock the daemon's memory in RAM ({e}): keys and cached file content may be written to swap (use encrypted swap, or none)"
            ),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let mp = mountpoint.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("sealfs-keywatch".into())
            .spawn(move || {
                let mut ks = ks;
                let mut warned = false;
                loop {
                    let start = Instant::now();
                    while start.elapsed() < KEY_CHECK_INTERVAL {
                        if stop2.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    match ks.reload() {
                        Ok(n) => {
                            if warned {
                                log::warn!(
                                    "the keystore {} reads again; checking the content key",
                                    n.path().display()
                                );
                            }
                            ks = n;
                            warned = false;
                        }
                        Err(e) => {
                            // Fail closed: a keystore that cannot be read,
                            // authenticated or is older than the one seen
                            // could hide a disabled or deleted key.
                            let why = format!(
                                "the keystore cannot be re-read to check the content key ({e}); file content is revoked until a good keystore is back (after a passphrase change, remount)"
                            );
                            if !warned {
                                log::error!("{why}");
                                warned = true;
                            }
                            match vol.content_unavailable() {
                                None => {
                                    if let Ok(d) = std::fs::File::open(&mp) {
                                        let _ = rustix::fs::syncfs(&d);
                                    }
                                    vol.revoke_content(&why);
                                    for ino in vol.file_inodes() {
                                        let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
                                    }
                                }
                                Some(old) if old != why => vol.revoke_content(&why),
                                Some(_) => {}
                            }
                            continue;
                        }
                    }
                    let (wrapped, ctx) = vol.wrapped_content_keys();
                    let usable = wrapped.iter().try_for_each(|(_, w)| ks.usable_for(w));
                    match (usable, vol.content_unavailable()) {
                        (Ok(()), Some(_)) => {
                            let keys: Result<Vec<_>, _> = wrapped
                                .iter()
                                .map(|(g, w)| ks.unwrap(w, &ctx).map(|k| (*g, k)))
                                .collect();
                            match keys {
                                Ok(keys) => {
                                    if let Err(e) = vol.restore_content(&keys) {
                                        log::error!("cannot restore file content: {e}");
                                    } else {
                                        // Drop pages the kernel cached while
                                        // content was revoked (writes it took
                                        // into its cache and failed to write
                                        // back), so the mount shows the store.
                                        for ino in vol.file_inodes() {
                                            let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
                                        }
                                    }
                                }
                                Err(e) => log::error!("cannot unwrap the content key again: {e}"),
                            }
                        }
                        (Err(e), None) => {
                            // Push the kernel's dirty pages to us while the
                            // key is still here, then revoke, then drop the
                            // kernel's cached plaintext.
                            if let Ok(d) = std::fs::File::open(&mp) {
                                let _ = rustix::fs::syncfs(&d);
                            }
                            vol.revoke_content(&e.to_string());
                            for ino in vol.file_inodes() {
                                let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
                            }
                        }
                        (Err(e), Some(old)) if old != e.to_string() => {
                            vol.revoke_content(&e.to_string())
                        }
                        _ => {}
                    }
                }
            })
            .context("cannot start the key watcher thread")?;
        Ok(KeyWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KeyWatcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Mount the volume. As root, sealfs calls mount(2) itself with file-system
/// type `fuse.sealfs` and the store as source (so findmnt and `sealfs umount`
/// can tell it apart); other users go through fusermount3.
fn mount_session(
    fs: crate::fuse::SealFs,
    store: &Path,
    mountpoint: &Path,
    o: &MountOpts,
    cfg: &fuser::Config,
) -> Result<(fuser::Session<crate::fuse::SealFs>, bool)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: &dyn std::fmt::Display| {
        let hint = if e.to_string().contains("user_allow_other") {
            " (allow_other for non-root users needs `user_allow_other` in /etc/fuse.conf)"
        } else {
            ""
        };
        anyhow!(
            "cannot mount {} on {}: {e}{hint}",
            store.display(),
            mountpoint.display()
        )
    };
    if !rustix::process::geteuid().is_root() {
        // fuser (like libfuse) opens /dev/fuse itself before handing the
        // mount to fusermount3; udev makes it 0666 on a standard system.
        if rustix::fs::access(
            "/dev/fuse",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .is_err()
        {
            bail!(
                "cannot mount {} on {}: /dev/fuse is not readable and writable for you; \
                 FUSE needs it mode 0666 (the fuse3 package's udev rule does that): \
                 ask an administrator to run `chmod 0666 /dev/fuse`",
                store.display(),
                mountpoint.display()
            );
        }
        let s = fuser::Session::new(fs, mountpoint, cfg).map_err(|e| fail(&e))?;
        return Ok((s, false));
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| anyhow!("cannot open /dev/fuse: {e}; load the module with `modprobe fuse`"))?;
    let mode = std::fs::metadata(mountpoint)?.permissions().mode();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        mode & libc::S_IFMT,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    );
    if o.allow_other || o.allow_root {
        data.push_str(",allow_other");
    }
    let mut flags = rustix::mount::MountFlags::empty();
    for (on, f) in [
        (o.read_only, rustix::mount::MountFlags::RDONLY),
        (o.nosuid, rustix::mount::MountFlags::NOSUID),
        (o.nodev, rustix::mount::MountFlags::NODEV),
        (o.noexec, rustix::mount::MountFlags::NOEXEC),
        (o.noatime, rustix::mount::MountFlags::NOATIME),
    ] {
        if on {
            flags |= f;
        }
    }
    let data_c = std::ffi::CString::new(data).map_err(|_| anyhow!("bad mount options"))?;
    let source = std::ffi::CString::new(store.as_os_str().as_bytes())
        .map_err(|_| anyhow!("store path contains a NUL byte"))?;
    rustix::mount::mount(
        source.as_c_str(),
        mountpoint,
        "fuse.sealfs",
        flags,
        data_c.as_c_str(),
    )
    .map_err(|e| fail(&e))?;
    match fuser::Session::from_fd(fs, dev.into(), cfg.acl, cfg.clone()) {
        Ok(s) => Ok((s, true)),
        Err(e) => {
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            Err(fail(&e))
        }
    }
}

/// Parent side of `sealfs mount` without -f: start the daemon, hand it the
/// passphrase over a pipe, and wait until it reports the mount live (or why
/// it failed).
fn spawn_daemon(g: &Global, store: &Path, mountpoint: &Path, raw_opts: &[String]) -> Result<()> {
    let ks_path = keystore_path(g);
    // Collect a typed passphrase here, where the terminal is.
    let pass = if g.key_file.is_none() && g.passphrase_file.is_none() {
        match secret(g, &ks_path, false)? {
            KeystoreSecret::Passphrase(p) => Some(p),
            KeystoreSecret::KeyFile(_) => None,
        }
    } else {
        None
    };
    let exe = std::env::current_exe().context("cannot find the sealfs executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--keystore").arg(&ks_path);
    if let Some(k) = &g.key_file {
        cmd.arg("--key-file").arg(std::path::absolute(k)?);
    } else if let Some(p) = &g.passphrase_file {
        cmd.arg("--passphrase-file").arg(std::path::absolute(p)?);
    }
    for _ in 0..g.verbose {
        cmd.arg("-v");
    }
    if g.force_unlock {
        cmd.arg("--force-unlock");
    }
    if g.accept_rollback {
        cmd.arg("--accept-rollback");
    }
    cmd.arg("mount").arg("--daemon-child");
    for o in raw_opts {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(store).arg(mountpoint);
    cmd.env_remove("SEALFS_KEY_FILE")
        .env_remove("SEALFS_PASSPHRASE_FILE");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start the sealfs daemon")?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        if let Some(p) = &pass {
            stdin
                .write_all(b"P")
                .and_then(|_| stdin.write_all(p.as_bytes()))
                .ok();
        }
    }
    // Drain the daemon's stderr on a thread so that a chatty start-up
    // (-vv) cannot fill the pipe and block it before it reports READY.
    let stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut err = String::new();
        let mut stderr = stderr;
        stderr.read_to_string(&mut err).ok();
        err
    });
    let stdout = child.stdout.take().expect("piped");
    let mut out = BufReader::new(stdout);
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        match line.trim() {
            "READY" => return Ok(()),
            l => {
                if let Some(w) = l.strip_prefix("WARN ") {
                    eprintln!("sealfs: warning: {w}");
                }
            }
        }
    }
    let _ = child.wait();
    let err = err_reader.join().unwrap_or_default();
    let msg = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("sealfs: error: "))
        .collect::<Vec<_>>()
        .join("\n");
    if msg.is_empty() {
        bail!("the sealfs daemon exited before the mount was ready");
    }
    bail!("{msg}")
}

/// Daemon side: read the passphrase (if any) from stdin, open the volume,
/// mount, report READY on stdout, then detach from the terminal.
fn run_daemon_child(g: &Global, store: &Path, mountpoint: &Path, o: &MountOpts) -> Result<()> {
    // Room up front: a reallocation would free an un-zeroized copy.
    let mut input = Zeroizing::new(Vec::with_capacity(64 * 1024));
    std::io::stdin()
        .take(64 * 1024 - 1)
        .read_to_end(&mut input)
        .ok();
    let ks_path = keystore_path(g);
    let sec = if input.first() == Some(&b'P') {
        // borrow, so that no copy outlives the zeroizing buffer on error
        let p = std::str::from_utf8(&input[1..]).map_err(|_| anyhow!("passphrase is not UTF-8"))?;
        KeystoreSecret::Passphrase(Zeroizing::new(p.to_string()))
    } else {
        secret(g, &ks_path, false)?
    };
    if !ks_path.exists() {
        return Err(kms::KmsError::NotFound(ks_path).into());
    }
    let ks = Keystore::open(&ks_path, &sec, false)?;
    drop(sec);
    let vol = open_volume(store, &ks, o)?;
    let key = key_label(&ks, &vol.content_key_id().0);
    let unavailable = vol.content_unavailable();
    let _ = rustix::process::setsid();
    // Background daemons log to `log=FILE`, to syslog with `log=syslog`,
    // else to syslog when there is one, else to a file per volume in the
    // state directory.
    let to_syslog = match o.log.as_deref() {
        Some(p) => p == Path::new(options::LOG_SYSLOG),
        None => logging::syslog_available(),
    };
    let explicit_file = o.log.clone().filter(|_| !to_syslog);
    let log_path = explicit_file.clone().or_else(|| {
        use std::os::unix::fs::DirBuilderExt;
        if to_syslog {
            return None;
        }
        // logs name files: keep them private to the mounting user
        let d = volume::default_state_dir().ok()?.join("log");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .ok()?;
        Some(d.join(format!("{}.log", vol.id())))
    });
    let log_file = match &log_path {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
            {
                Ok(f) => Some(f),
                Err(e) if explicit_file.is_some() => {
                    bail!("mount option 'log={}': cannot open it: {e}", p.display())
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    serve(vol, store, mountpoint, o, key, ks, move || {
        // Report success, then route stdout/stderr to the log (or nowhere).
        if let Some(why) = &unavailable {
            println!("WARN mounted with metadata only: {why}");
        }
        println!("READY");
        let _ = std::io::stdout().flush();
        let target = log_file.or_else(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .ok()
        });
        if let Some(f) = target {
            let _ = rustix::stdio::dup2_stdout(&f);
            let _ = rustix::stdio::dup2_stderr(&f);
        }
        if to_syslog {
            if let Err(e) = logging::to_syslog() {
                // stderr is the log file or /dev/null by now
                eprintln!("sealfs: {e}");
            }
        }
    })
}

/// Find the store of a sealfs mount from /proc/self/mountinfo.
fn mount_source(mp: &Path) -> Option<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mp.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let (pre, post) = line.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        let p: Vec<&str> = post.split(' ').collect();
        if f.len() < 5 || p.len() < 2 {
            continue;
        }
        let target = unescape_mountinfo(f[4]);
        if target.as_bytes() == want {
            found = Some((PathBuf::from(unescape_mountinfo(p[1])), p[0].to_string()));
        }
    }
    found
}

fn cmd_rewrap(g: &Global, store: &Path, kms_key: Option<&str>) -> Result<()> {
    let ks = open_keystore(g, false)?;
    let start = Instant::now();
    let (old, new, written) = Volume::rewrap(store, &ks, kms_key)?;
    let took = start.elapsed();
    if old == new && written == 0 {
        println!(
            "{}: content key already wrapped under {} v{}; nothing to do",
            store.display(),
            key_label(&ks, &new.0),
            new.1
        );
    } else {
        println!(
            "{}: content key re-wrapped from {} v{} to {} v{}",
            store.display(),
            old.0,
            old.1,
            key_label(&ks, &new.0),
            new.1
        );
        if old.0 != new.0 {
            println!(
                "note: only the wrapping changed; the volume's data key is the same, so copies of the store from before still open with the old key. Use `sealfs rekey` for a new data key."
            );
        }
    }
    println!(
        "rewrote the header only: {written} bytes in {:.1} ms",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn cmd_rekey(g: &Global, store: &Path, kms_key: Option<&str>) -> Result<()> {
    let ks = open_keystore(g, false)?;
    let start = Instant::now();
    let resumed = Volume::rekey_begin(store, &ks, kms_key)?;
    if resumed {
        eprintln!(
            "sealfs: resuming an interrupted re-key of {}",
            store.display()
        );
    }
    let vol = open_volume(store, &ks, &MountOpts::default())?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "re-encrypting {bar:40} {pos}/{len} chunks ({percent}%) eta {eta}",
        )
        .expect("valid template"),
    );
    let mut total = 0;
    let r = vol.rekey_content(&mut |done, all| {
        total = all;
        bar.set_length(all);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let closed = vol.close();
    r.map_err(|e| {
        anyhow!(
            "re-key of {} stopped: {e}; nothing is lost: fix the cause (see the messages above) and run `sealfs rekey {}` again to resume",
            store.display(),
            store.display()
        )
    })?;
    closed.map_err(|e| {
        anyhow!(
            "final commit of {} failed: {e}; run `sealfs rekey` again to resume",
            store.display()
        )
    })?;
    drop(vol);
    Volume::rekey_finish(store, &ks)?;
    let info = Volume::info(store, &ks)?;
    println!(
        "{}: re-keyed: {total} chunks and every inline file re-encrypted under a new content key (generation {}) wrapped by {} v{}, in {:.1} s; the previous key is no longer needed",
        store.display(),
        info.content_gen,
        key_label(&ks, &info.content_key.0),
        info.content_key.1,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_status(json: bool) -> Result<()> {
    let rows = status::collect();
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                let s = r.status.as_ref();
                serde_json::json!({
                    "mountpoint": r.entry.mountpoint,
                    "store": r.entry.source,
                    "state": r.state,
                    "read_only": r.entry.read_only,
                    "pid": s.map(|s| s.pid),
                    "volume_id": s.map(|s| &s.volume_id),
                    "key_id": s.map(|s| &s.key_id),
                    "key_version": s.map(|s| s.key_version),
                    "key": s.map(|s| &s.key),
                    "started": s.map(|s| fmt_time(s.started)),
                    "uptime_seconds": s.map(|s| status::uptime(s.started)),
                    "bytes_read": s.map(|s| s.bytes_read),
                    "bytes_written": s.map(|s| s.bytes_written),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no sealfs mounts");
        return Ok(());
    }
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("Mountpoint:     {}", r.entry.mountpoint.display());
        println!("Store:          {}", r.entry.source.display());
        let mode = if r.entry.read_only {
            "read-only"
        } else {
            "read-write"
        };
        match (r.state, &r.status) {
            ("stale", _) => println!(
                "State:          stale: the daemon is gone; clear it with `sealfs umount {}`",
                r.entry.mountpoint.display()
            ),
            (state, _) => println!("State:          {state}, {mode}"),
        }
        match &r.status {
            Some(s) => {
                println!("Volume id:      {}", s.volume_id);
                println!("Content key:    {} v{}", s.key, s.key_version);
                println!("Daemon pid:     {}", s.pid);
                println!(
                    "Uptime:         {} (since {})",
                    status::fmt_uptime(status::uptime(s.started)),
                    fmt_time(s.started)
                );
                println!(
                    "I/O:            {} read, {} written",
                    human(s.bytes_read),
                    human(s.bytes_written)
                );
            }
            None => println!(
                "Details:        unavailable (mounted by another user, or with another SEALFS_STATE_DIR)"
            ),
        }
    }
    Ok(())
}

fn cmd_umount(mp: &Path, lazy: bool) -> Result<()> {
    let mp = std::path::absolute(mp)?;
    let src = mount_source(&mp);
    let Some((store, fstype)) = src else {
        bail!("{} is not mounted", mp.display());
    };
    if fstype != "fuse.sealfs" && !(fstype == "fuse" && store.join(volume::HEADER_FILE).exists()) {
        bail!(
            "{} is a {fstype} mount, not sealfs; use umount(8)",
            mp.display()
        );
    }
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    match rustix::mount::unmount(&mp, flags) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::PERM => {
            let mut c = Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            let st = c
                .arg(&mp)
                .status()
                .context("cannot run fusermount3 (install the fuse3 package)")?;
            if !st.success() {
                bail!("fusermount3 -u {} failed", mp.display());
            }
        }
        Err(e) if e == rustix::io::Errno::BUSY => {
            bail!("{} is busy (a process uses files in it); close them, or use `sealfs umount --lazy`", mp.display())
        }
        Err(e) if e == rustix::io::Errno::NOTCONN => {
            rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| anyhow!("cannot clear the stale mount {}: {e}", mp.display()))?;
        }
        Err(e) => bail!("cannot unmount {}: {e}", mp.display()),
    }
    // Wait for the daemon to finish its final commit and release the store.
    if store.join(volume::LOCK_FILE).exists() {
        let start = Instant::now();
        while store_in_use(&store) {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{} is unmounted, but its daemon is still writing to {} after 120 s",
                    mp.display(),
                    store.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(fmt_time(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn error_chain_without_repeats() {
        let inner = anyhow!("unsupported store format version 3");
        let e = inner.context("store /s: unsupported store format version 3");
        assert_eq!(
            error_text(&e),
            "store /s: unsupported store format version 3"
        );
        let e = anyhow!("disk full").context("cannot write /x");
        assert_eq!(error_text(&e), "cannot write /x: disk full");
    }

    #[test]
    fn fuse_conf_parsing() {
        assert!(fuse_conf_allows_other("# x\nuser_allow_other\n"));
        assert!(fuse_conf_allows_other("  user_allow_other  # yes\n"));
        assert!(!fuse_conf_allows_other(
            "#user_allow_other\nmount_max = 1000\n"
        ));
        assert!(!fuse_conf_allows_other(""));
    }

    #[test]
    fn cli_parses() {
        Cli::command_check();
    }

    impl Cli {
        fn command_check() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
