//! The `sealfs` command line: every error has a clear message and a
//! non-zero exit and leaves the store untouched; background mounts return
//! only once live and `sealfs umount` only once the store is released.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASS: &str = "correct horse battery staple";

/// A `sealfs` command that unlocks `ks` with a passphrase file (no key
/// file from the environment).
fn pass_cmd(dir: &Path, ks: &Path, pass_file: &Path) -> Command {
    let mut c = Command::new(sealfs_bin());
    c.env("SEALFS_KEYSTORE", ks)
        .env_remove("SEALFS_KEY_FILE")
        .env_remove("SEALFS_PASSPHRASE_FILE")
        .env("SEALFS_STATE_DIR", dir.join("state"))
        .arg("--passphrase-file")
        .arg(pass_file)
        .stdin(Stdio::null());
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

/// `sealfs mount [-f] [-o opts] store mp` built from `base`, expected to
/// fail without mounting anything.
fn failed_mount(mut base: Command, store: &Path, mp: &Path, fg: bool, opts: &[&str]) -> Output {
    base.arg("mount");
    if fg {
        base.arg("-f");
    }
    for o in opts {
        base.arg("-o").arg(o);
    }
    base.arg(store).arg(mp);
    let out = run_expect_exit(base, mp);
    if is_mounted(mp) {
        let _ = Command::new("umount").arg("-l").arg(mp).status();
        panic!("the mount succeeded: {}", stderr(&out));
    }
    out
}

/// Lazily unmounts a background mount if a test panics.
fn empty_dir(env: &Env, name: &str) -> PathBuf {
    let p = env.path(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn wrong_passphrase() {
    let env = Env::new();
    let dir = env.path("pp");
    std::fs::create_dir_all(&dir).unwrap();
    let ks = dir.join("keystore");
    let good = dir.join("good.pass");
    let bad = dir.join("bad.pass");
    write_private(&good, format!("{PASS}\n"));
    write_private(&bad, "not the passphrase\n");

    let out = run({
        let mut c = pass_cmd(&dir, &ks, &good);
        c.arg("init");
        c
    });
    assert!(out.status.success(), "init: {}", stderr(&out));
    let out = run({
        let mut c = pass_cmd(&dir, &ks, &good);
        c.args(["key", "create", "--alias", "pp"]);
        c
    });
    assert!(out.status.success(), "key create: {}", stderr(&out));
    let store = dir.join("store");
    let out = run({
        let mut c = pass_cmd(&dir, &ks, &good);
        c.arg("create").arg(&store).args(["--kms-key", "alias/pp"]);
        c
    });
    assert!(out.status.success(), "create: {}", stderr(&out));

    let ks_before = std::fs::read(&ks).unwrap();
    let store_before = snapshot_store(&store);

    let out = run({
        let mut c = pass_cmd(&dir, &ks, &bad);
        c.args(["key", "list"]);
        c
    });
    assert_failed(&out, &["wrong passphrase"], "key list");
    let out = run({
        let mut c = pass_cmd(&dir, &ks, &bad);
        c.arg("info").arg(&store);
        c
    });
    assert_failed(&out, &["wrong passphrase"], "info");

    if require_fuse() {
        let mp = empty_dir(&env, "mnt");
        let out = failed_mount(pass_cmd(&dir, &ks, &bad), &store, &mp, true, &[]);
        assert_failed(&out, &["wrong passphrase"], "mount -f");
        let out = failed_mount(pass_cmd(&dir, &ks, &bad), &store, &mp, false, &[]);
        assert_failed(&out, &["wrong passphrase"], "background mount");
    }

    assert!(std::fs::read(&ks).unwrap() == ks_before, "keystore changed");
    assert!(snapshot_store(&store) == store_before, "store changed");

    // The right passphrase still works.
    let out = run({
        let mut c = pass_cmd(&dir, &ks, &good);
        c.args(["key", "list"]);
        c
    });
    assert!(out.status.success(), "key list: {}", stderr(&out));
    assert!(stdout(&out).contains("alias/pp"));
}

#[test]
fn missing_key_file_names_the_path() {
    let env = Env::new();
    let store = env.create_store("store");
    let before = snapshot_store(&store);
    let missing = env.path("nowhere/missing.key");
    let missing_s = missing.to_str().unwrap();

    let mut c = env.cmd();
    c.env("SEALFS_KEY_FILE", &missing).args(["key", "list"]);
    assert_failed(&run(c), &[missing_s], "key list");

    let mut c = env.cmd();
    c.env("SEALFS_KEY_FILE", &missing).arg("info").arg(&store);
    assert_failed(&run(c), &[missing_s], "info");

    let mut c = env.cmd();
    c.arg("--key-file").arg(&missing).arg("info").arg(&store);
    assert_failed(&run(c), &[missing_s], "info --key-file");

    if require_fuse() {
        let mp = empty_dir(&env, "mnt");
        for fg in [true, false] {
            let mut c = env.cmd();
            c.env("SEALFS_KEY_FILE", &missing);
            let out = failed_mount(c, &store, &mp, fg, &[]);
            assert_failed(&out, &[missing_s], &format!("mount (fg={fg})"));
        }
        let opt = format!("key_file={missing_s}");
        let out = failed_mount(env.cmd(), &store, &mp, true, &[&opt]);
        assert_failed(&out, &[missing_s], "mount -o key_file=");
    }
    assert!(snapshot_store(&store) == before, "store changed");
}

#[test]
fn unknown_key_alias_leaves_no_store() {
    let env = Env::new();
    let store = env.path("store");
    let out = env.sealfs(&["create", store.to_str().unwrap(), "--kms-key", "alias/nope"]);
    assert_failed(&out, &["alias/nope"], "create");
    assert!(!store.exists(), "a store directory was left behind");

    // An existing empty directory stays empty.
    let store = empty_dir(&env, "store-empty");
    let out = env.sealfs(&["create", store.to_str().unwrap(), "--kms-key", "alias/nope"]);
    assert_failed(&out, &["alias/nope"], "create in empty dir");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
}

#[test]
fn corrupt_header_refuses_mount_and_info() {
    let env = Env::new();
    let store = env.create_store("store");
    let hp = store.join("sealfs.store");
    let mut h = std::fs::read(&hp).unwrap();
    let n = h.len();
    h[n - 5] ^= 0x10; // in the MAC
    std::fs::write(&hp, &h).unwrap();
    let before = snapshot_store(&store);

    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert_failed(&out, &["header"], "info");
    if require_fuse() {
        let mp = empty_dir(&env, "mnt");
        for fg in [true, false] {
            let out = failed_mount(env.cmd(), &store, &mp, fg, &[]);
            assert_failed(&out, &["header"], &format!("mount (fg={fg})"));
        }
    }
    assert!(snapshot_store(&store) == before, "store changed");

    // Garbage instead of a header.
    std::fs::write(&hp, b"this is not a header").unwrap();
    let before = snapshot_store(&store);
    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert_failed(&out, &["header"], "info on garbage");
    if require_fuse() {
        let mp = empty_dir(&env, "mnt");
        let out = failed_mount(env.cmd(), &store, &mp, true, &[]);
        assert_failed(&out, &["header"], "mount on garbage");
    }
    assert!(snapshot_store(&store) == before, "store changed");
}

#[test]
fn store_in_use_refuses_second_mount() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"x").unwrap();
    let f = std::fs::File::open(m.path("f")).unwrap();
    f.sync_all().unwrap();
    let before = snapshot_store(&store);
    let mp2 = empty_dir(&env, "mnt2");
    for fg in [true, false] {
        let out = failed_mount(env.cmd(), &store, &mp2, fg, &[]);
        assert_failed(&out, &["in use"], &format!("second mount (fg={fg})"));
    }
    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    assert!(
        stdout(&out).contains("In use:         yes"),
        "{}",
        stdout(&out)
    );
    assert!(snapshot_store(&store) == before, "store changed");
    drop(f);
    m.unmount();
}

#[test]
fn malformed_mount_options() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let before = snapshot_store(&store);
    let mp = empty_dir(&env, "mnt");
    for (opt, needle) in [
        ("bogus", "bogus"),
        ("threads=0", "threads=0"),
        ("keystore", "keystore"),
        ("ro,threads=abc", "threads=abc"),
    ] {
        for fg in [true, false] {
            let out = failed_mount(env.cmd(), &store, &mp, fg, &[opt]);
            assert_failed(
                &out,
                &["mount option", needle],
                &format!("-o {opt} (fg={fg})"),
            );
            assert!(!is_mounted(&mp));
        }
    }
    assert!(snapshot_store(&store) == before, "store changed");
}

#[test]
fn bad_mountpoints() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let before = snapshot_store(&store);
    let full = empty_dir(&env, "full");
    std::fs::write(full.join("something"), b"x").unwrap();
    let missing = env.path("no/such/mnt");
    for fg in [true, false] {
        let out = failed_mount(env.cmd(), &store, &full, fg, &[]);
        assert_failed(
            &out,
            &["not empty", full.to_str().unwrap()],
            &format!("non-empty (fg={fg})"),
        );
        let out = failed_mount(env.cmd(), &store, &missing, fg, &[]);
        assert_failed(
            &out,
            &["does not exist", missing.to_str().unwrap()],
            &format!("missing (fg={fg})"),
        );
        assert!(!missing.exists(), "the mountpoint was created");
    }
    assert_eq!(
        std::fs::read_dir(&full).unwrap().count(),
        1,
        "mountpoint contents changed"
    );
    assert!(snapshot_store(&store) == before, "store changed");
}

/// (fstype, source) of the mount at `mp` from /proc/self/mountinfo.
fn mountinfo_of(mp: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mp.to_str().unwrap();
    let mut found = None;
    for l in info.lines() {
        let (pre, post) = l.split_once(" - ")?;
        if pre.split(' ').nth(4) == Some(mp) {
            let mut p = post.split(' ');
            found = Some((p.next()?.to_string(), p.next()?.to_string()));
        }
    }
    found
}

#[test]
fn background_mount_and_umount() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());

    let out = env.sealfs(&["mount", store.to_str().unwrap(), mp.to_str().unwrap()]);
    assert!(out.status.success(), "background mount: {}", stderr(&out));
    // Live right away.
    assert!(
        is_mounted(&mp),
        "sealfs mount returned before the mount was live"
    );
    std::fs::write(mp.join("hello.txt"), b"hello from the background").unwrap();
    assert_eq!(
        std::fs::read(mp.join("hello.txt")).unwrap(),
        b"hello from the background"
    );
    let (fstype, source) = mountinfo_of(&mp).expect("in mountinfo");
    assert_eq!(fstype, "fuse.sealfs");
    assert_eq!(source, store.to_str().unwrap());
    if let Ok(o) = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE", "--mountpoint"])
        .arg(&mp)
        .output()
    {
        let s = stdout(&o);
        assert!(o.status.success(), "findmnt: {}", stderr(&o));
        assert!(
            s.contains("fuse.sealfs") && s.contains(store.to_str().unwrap()),
            "findmnt: {s}"
        );
    }
    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("In use:         yes"),
        "{}",
        stdout(&out)
    );

    let out = env.sealfs(&["umount", mp.to_str().unwrap()]);
    assert!(out.status.success(), "umount: {}", stderr(&out));
    // The daemon has released the store when umount returns.
    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    assert!(
        stdout(&out).contains("In use:         no"),
        "store still in use right after `sealfs umount`: {}",
        stdout(&out)
    );
    assert!(!is_mounted(&mp));
    assert_eq!(
        std::fs::read_dir(&mp).unwrap().count(),
        0,
        "the file was written beside the mount, not into it"
    );
    // umount of something that is not mounted is an error.
    let out = env.sealfs(&["umount", mp.to_str().unwrap()]);
    assert_failed(&out, &["not mounted"], "second umount");

    // The data was committed.
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(
        std::fs::read(m.path("hello.txt")).unwrap(),
        b"hello from the background"
    );
    m.unmount();
}

#[test]
fn background_mount_with_wrong_key_file_reports_why() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let before = snapshot_store(&store);
    let wrong = env.path("wrong.key");
    write_private(&wrong, [0x5au8; 32]);
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    let mut c = env.cmd();
    c.env("SEALFS_KEY_FILE", &wrong);
    let out = failed_mount(c, &store, &mp, false, &[]);
    assert_failed(&out, &["wrong passphrase or key file"], "background mount");
    // A malformed key file is reported as such.
    write_private(&wrong, b"short");
    let mut c = env.cmd();
    c.env("SEALFS_KEY_FILE", &wrong);
    let out = failed_mount(c, &store, &mp, false, &[]);
    assert_failed(
        &out,
        &[wrong.to_str().unwrap(), "32 raw bytes"],
        "background mount, malformed key file",
    );
    assert!(snapshot_store(&store) == before, "store changed");
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_str(&stdout(out)).unwrap()
}

#[test]
fn info_and_keys() {
    let env = Env::new();
    let store = env.path("store");
    let out = env.sealfs(&["create", store.to_str().unwrap(), "--kms-key", "alias/test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let vid = stdout(&out)
        .split_whitespace()
        .skip_while(|w| *w != "volume")
        .nth(1)
        .expect("create prints the volume id")
        .to_string();
    assert_eq!(vid.len(), 32, "volume id {vid}");

    let test_key = json(&env.sealfs(&["key", "describe", "alias/test", "--json"]));
    let test_id = test_key["id"].as_str().unwrap().to_string();
    let service = json(&env.sealfs(&["key", "describe", "alias/sealfs/service", "--json"]));
    let service_id = service["id"].as_str().unwrap().to_string();
    let keys = json(&env.sealfs(&["key", "list", "--json"]));
    let keys = keys.as_array().unwrap();

    // info (text)
    let out = env.sealfs(&["info", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    assert!(s.contains(&format!("Volume id:      {vid}")), "{s}");
    assert!(s.contains("Chunk size:     128.0 KiB"), "{s}");
    let content = s
        .lines()
        .find(|l| l.starts_with("Content key:"))
        .expect("content key line");
    assert!(
        content.contains(&test_id) && content.contains(" v1"),
        "{content}"
    );
    let meta = s
        .lines()
        .find(|l| l.starts_with("Metadata key:"))
        .expect("metadata key line");
    assert!(
        meta.contains(&service_id) && meta.contains(" v1"),
        "{meta} lacks {service_id} v1"
    );
    assert!(s.contains("In use:         no"), "{s}");

    // info --json
    let j = json(&env.sealfs(&["info", store.to_str().unwrap(), "--json"]));
    assert_eq!(j["volume_id"], vid.as_str());
    assert_eq!(j["chunk_size"], 131072);
    assert_eq!(j["content_key"]["id"], test_id.as_str());
    assert_eq!(j["content_key"]["version"], 1);
    assert_eq!(j["metadata_key"]["id"], service_id.as_str());
    assert_eq!(j["metadata_key"]["version"], 1);

    // key list
    let out = env.sealfs(&["key", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    let line = s
        .lines()
        .find(|l| l.contains(&test_id))
        .unwrap_or_else(|| panic!("key list lacks {test_id}: {s}"));
    assert!(
        line.contains("alias/test") && line.contains("Enabled"),
        "{line}"
    );
    let k = keys.iter().find(|k| k["id"] == test_id.as_str()).unwrap();
    assert_eq!(k["state"], "Enabled");
    assert!(k["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "alias/test"));
    assert_eq!(k["versions"].as_array().unwrap().len(), 1);
    assert_eq!(k["current_version"], 1);

    // key describe
    let out = env.sealfs(&["key", "describe", "alias/test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    for want in [
        format!("Key id:       {test_id}"),
        "Aliases:      alias/test".to_string(),
        "State:        Enabled".to_string(),
        "Versions:     1 (current v1)".to_string(),
        "  v1".to_string(),
    ] {
        assert!(s.contains(&want), "describe lacks {want:?}: {s}");
    }
    // by id as well
    let out = env.sealfs(&["key", "describe", &test_id]);
    assert!(out.status.success() && stdout(&out).contains("alias/test"));
    // unknown key
    let out = env.sealfs(&["key", "describe", "alias/nope"]);
    assert_failed(&out, &["alias/nope"], "describe unknown");

    // duplicate alias
    let ks_before = std::fs::read(env.keystore()).unwrap();
    let out = env.sealfs(&["key", "create", "--alias", "test"]);
    assert_failed(&out, &["test", "already in use"], "duplicate alias");
    assert!(
        std::fs::read(env.keystore()).unwrap() == ks_before,
        "keystore changed"
    );
}

#[test]
fn create_without_kms_key_uses_default() {
    let env = Env::new();
    let store = env.path("store");
    let out = env.sealfs(&["create", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("alias/sealfs/default"), "{all}");
    let def = json(&env.sealfs(&["key", "describe", "alias/sealfs/default", "--json"]));
    let j = json(&env.sealfs(&["info", store.to_str().unwrap(), "--json"]));
    assert_eq!(j["content_key"]["id"], def["id"]);
}

#[test]
fn help() {
    let out = Command::new(sealfs_bin()).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    for w in [
        "mount",
        "umount",
        "create",
        "info",
        "key",
        "init",
        "--keystore",
        "--key-file",
        "--passphrase-file",
    ] {
        assert!(s.contains(w), "--help lacks {w}: {s}");
    }
    let out = Command::new(sealfs_bin())
        .args(["mount", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stdout(&out);
    for w in [
        "--foreground",
        "-o",
        "ro",
        "allow_other",
        "threads=N",
        "keystore=PATH",
        "key_file=PATH",
        "commit_interval",
    ] {
        assert!(s.contains(w), "mount --help lacks {w}: {s}");
    }
    // An unknown subcommand is a usage error.
    let out = Command::new(sealfs_bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn disabled_content_key_refuses_mount_until_enabled() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    m.unmount();
    let before = snapshot_store(&store);

    let out = env.sealfs(&["key", "disable", "alias/test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mp = env.path("mnt");
    let out = env.sealfs(&["mount", "-f", store.to_str().unwrap(), mp.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Disabled") && err.contains("sealfs key enable"),
        "{err}"
    );
    assert!(!is_mounted(&mp));
    assert_eq!(
        before,
        snapshot_store(&store),
        "a refused mount changes nothing"
    );

    // service-managed keys cannot be disabled
    let out = env.sealfs(&["key", "disable", "alias/sealfs/service"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("managed by sealfs"),
        "{}",
        stderr(&out)
    );

    let out = env.sealfs(&["key", "enable", "alias/test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    m.unmount();
}
