//! The keystore against an attacker who can write its directory (and may
//! know the passphrase): crypto-shredding leaves no copy of destroyed
//! material, the keystore clock only moves forward, an older copy of the
//! keystore is refused (also by a running daemon, which then fails
//! closed), the audit log detects cuts, torn lines and foreign data, and
//! key files and passphrase files must be private.
//!
//! Every test runs the real binary with its own SEALFS_STATE_DIR.

mod common;
use common::*;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

const DAY: u64 = 86_400;
const EACCES: i32 = 13;

fn at(env: &Env, t: u64, args: &[&str]) -> Output {
    env.cmd()
        .env("SEALFS_KMS_NOW", t.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn describe(env: &Env, key: &str) -> Value {
    let out = env.sealfs(&["key", "describe", key, "--json"]);
    serde_json::from_str(&ok(&out, "describe")).unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(all_files(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

fn assert_no_copy(dir: &Path, material: &[u8], what: &str) {
    let hex_lower = hex::encode(material);
    let hex_upper = hex_lower.to_uppercase();
    for f in all_files(dir) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !contains(&data, material),
            "{what}: raw material in {}",
            f.display()
        );
        for h in [&hex_lower, &hex_upper] {
            assert!(
                !contains(&data, h.as_bytes()),
                "{what}: hex material in {}",
                f.display()
            );
        }
    }
}

fn assert_destroyed(env: &Env, id: &str, what: &str) {
    let d = describe(env, id);
    assert_eq!(d["state"], "Deleted", "{what}: {d}");
    for v in d["versions"].as_array().unwrap() {
        assert_eq!(v["material"], "deleted", "{what}: {d}");
    }
    let out = env.sealfs(&["key", "cancel-deletion", id]);
    assert!(
        !out.status.success(),
        "{what}: cancel-deletion of a destroyed key worked"
    );
}

#[test]
fn crypto_shredding_leaves_no_copy_and_restore_backup_cannot_undo_it() {
    let env = Env::new();
    let outside = tempfile::tempdir().unwrap();
    let material: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
    let mat = outside.path().join("byok.bin");
    std::fs::write(&mat, &material).unwrap();
    let out = env.sealfs(&["key", "create", "--alias", "byok", "--origin", "external"]);
    let id = ok(&out, "create external").trim().to_string();
    ok(
        &env.sealfs(&["key", "import", "alias/byok", "--material", s(&mat)]),
        "import",
    );
    let t0 = now_secs();
    ok(
        &env.sealfs(&["key", "schedule-deletion", &id, "--pending-days", "7"]),
        "schedule-deletion",
    );
    // a copy of the keystore that still holds the material (what an
    // attacker could keep)
    let planted = std::fs::read(env.keystore()).unwrap();
    // the waiting period is over: the next access destroys the material
    ok(
        &at(&env, t0 + 8 * DAY, &["key", "list"]),
        "list after the waiting period",
    );
    assert_destroyed(&env, &id, "after destruction");
    assert_no_copy(env.dir.path(), &material, "after destruction");
    // An attacker with the secret opens every keystore-like file of the
    // directory elsewhere (another machine: no local state, the system
    // clock): none of them still has the key's material.
    let elsewhere = tempfile::tempdir().unwrap();
    for (n, f) in all_files(env.dir.path()).into_iter().enumerate() {
        let data = std::fs::read(&f).unwrap();
        if !data.starts_with(b"SEALFSKS") {
            continue;
        }
        let ks = elsewhere.path().join("keystore");
        std::fs::write(&ks, &data).unwrap();
        let out = std::process::Command::new(sealfs_bin())
            .env("SEALFS_KEYSTORE", &ks)
            .env("SEALFS_KEY_FILE", env.key_file())
            .env(
                "SEALFS_STATE_DIR",
                elsewhere.path().join(format!("state-{n}")),
            )
            .env_remove("SEALFS_KMS_NOW")
            .args(["key", "describe", &id, "--json"])
            .output()
            .unwrap();
        let d: Value =
            serde_json::from_str(&ok(&out, &format!("describe in {}", f.display()))).unwrap();
        assert_eq!(
            d["state"],
            "Deleted",
            "{} still holds the key: {d}",
            f.display()
        );
        for v in d["versions"].as_array().unwrap() {
            assert_eq!(v["material"], "deleted", "{}: {d}", f.display());
        }
        for e in std::fs::read_dir(elsewhere.path()).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    // restore-backup (an attacker with the passphrase) cannot bring it back
    ok(&env.sealfs(&["key", "restore-backup"]), "restore-backup");
    assert_destroyed(&env, &id, "after restore-backup");
    ok(
        &env.sealfs(&["key", "restore-backup"]),
        "restore-backup again",
    );
    assert_destroyed(&env, &id, "after restore-backup twice");
    // ... not even from a planted pre-destruction copy
    std::fs::write(env.path("keystore.bak"), &planted).unwrap();
    let out = ok(
        &env.sealfs(&["key", "restore-backup"]),
        "restore planted copy",
    );
    assert!(out.contains("restored"), "{out}");
    assert_destroyed(&env, &id, "after restoring a planted copy");
    let log = std::fs::read_to_string(env.path("keystore.audit")).unwrap();
    assert!(
        log.contains("stay destroyed"),
        "no audit record of the dropped material"
    );
    assert_no_copy(env.dir.path(), &material, "after restoring a planted copy");
    // ... nor by copying it over the keystore and accepting it
    std::fs::write(env.keystore(), &planted).unwrap();
    let out = env.sealfs(&["key", "list"]);
    assert_failed(
        &out,
        &["older copy", "accept-keystore"],
        "planted copy as keystore",
    );
    ok(
        &env.sealfs(&["key", "accept-keystore"]),
        "accept the planted copy",
    );
    assert_destroyed(&env, &id, "after accepting a planted copy");
    assert_no_copy(env.dir.path(), &material, "after accepting a planted copy");
    let out = env.sealfs(&["key", "audit", "--verify"]);
    ok(&out, "audit --verify");
}

#[test]
fn keystore_clock_only_moves_forward() {
    let env = Env::new();
    let t0 = now_secs();
    ok(
        &at(&env, t0 + 10 * DAY, &["key", "create", "--alias", "late"]),
        "create at +10d",
    );
    let before = std::fs::read(env.keystore()).unwrap();
    for args in [
        &["key", "list"][..],
        &[
            "key",
            "schedule-deletion",
            "alias/late",
            "--pending-days",
            "7",
        ],
        &["key", "disable", "alias/late"],
    ] {
        let out = at(&env, t0 + DAY, args);
        assert_failed(
            &out,
            &[
                "SEALFS_KMS_NOW",
                "earlier",
                "only moves forward",
                "deletion waiting period",
            ],
            &format!("{args:?} with the clock moved back"),
        );
    }
    assert!(
        std::fs::read(env.keystore()).unwrap() == before,
        "keystore changed"
    );
    // without the override, the system clock (behind the keystore's) is
    // lifted to the keystore clock: audit times never go backwards
    ok(
        &env.sealfs(&["key", "disable", "alias/late"]),
        "disable, system clock",
    );
    let log = std::fs::read_to_string(env.path("keystore.audit")).unwrap();
    let times: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["time"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "audit times go back: {times:?}"
    );
    assert!(*times.last().unwrap() >= t0 + 10 * DAY);
    // an override that is not a time is refused, not ignored
    let out = env
        .cmd()
        .env("SEALFS_KMS_NOW", "tomorrow")
        .args(["key", "list"])
        .output()
        .unwrap();
    assert_failed(
        &out,
        &["SEALFS_KMS_NOW=tomorrow", "not a number"],
        "bad override",
    );
    // the same or a later override is fine
    ok(
        &at(&env, t0 + 10 * DAY, &["key", "list"]),
        "list at the keystore clock",
    );
    ok(&at(&env, t0 + 11 * DAY, &["key", "list"]), "list later");
}

/// The committed keystore of format version 2 (tests/fixtures/format3,
/// made with SEALFS_KMS_NOW=1764547200) still opens, verifies and is
/// upgraded to the current version (4).
#[test]
fn keystore_format_2_fixture_opens() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3");
    let d = tempfile::tempdir().unwrap();
    for f in [
        "keystore",
        "keystore.bak",
        "keystore.audit",
        "keystore.audit-head",
    ] {
        std::fs::copy(fx.join(f), d.path().join(f)).unwrap();
    }
    let key = d.path().join("keystore.key");
    write_private(&key, std::fs::read(fx.join("keystore.key")).unwrap());
    let ks = d.path().join("keystore");
    assert_eq!(
        &std::fs::read(&ks).unwrap()[8..10],
        &[2, 0],
        "fixture is version 2"
    );
    let run = |args: &[&str]| {
        std::process::Command::new(sealfs_bin())
            .env("SEALFS_KEYSTORE", &ks)
            .env("SEALFS_KEY_FILE", &key)
            .env("SEALFS_STATE_DIR", d.path().join("state"))
            .env_remove("SEALFS_KMS_NOW")
            .args(args)
            .output()
            .unwrap()
    };
    let out = ok(&run(&["key", "list", "--json"]), "list the fixture");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v.as_array().unwrap().len() >= 2, "{v}");
    assert_eq!(
        &std::fs::read(&ks).unwrap()[8..10],
        &[4, 0],
        "upgraded to version 4"
    );
    ok(
        &run(&["key", "audit", "--verify"]),
        "fixture audit verifies",
    );
    // its clock is at least the time it was made with
    let out = std::process::Command::new(sealfs_bin())
        .env("SEALFS_KEYSTORE", &ks)
        .env("SEALFS_KEY_FILE", &key)
        .env("SEALFS_STATE_DIR", d.path().join("state"))
        .env("SEALFS_KMS_NOW", "1764540000")
        .args(["key", "list"])
        .output()
        .unwrap();
    assert_failed(
        &out,
        &["only moves forward"],
        "fixture, clock before its creation",
    );
}

#[test]
fn older_keystore_copy_is_refused_until_accepted() {
    let env = Env::new();
    let old = std::fs::read(env.keystore()).unwrap();
    ok(&env.sealfs(&["key", "disable", "alias/test"]), "disable");
    // KEYSTORE.bak copied over the keystore to undo the disable
    std::fs::copy(env.path("keystore.bak"), env.keystore()).unwrap();
    assert!(std::fs::read(env.keystore()).unwrap() == old);
    for args in [&["key", "list"][..], &["key", "enable", "alias/test"]] {
        let out = env.sealfs(args);
        assert_failed(
            &out,
            &[
                "older copy",
                "has already seen revision",
                "restore-backup",
                "accept-keystore",
            ],
            &format!("{args:?} on an older copy"),
        );
    }
    let store = env.path("store");
    let out = env.sealfs(&["create", s(&store), "--kms-key", "alias/test"]);
    assert_failed(&out, &["older copy"], "create under an older copy");
    // the documented, audited way to accept it
    let out = ok(&env.sealfs(&["key", "accept-keystore"]), "accept-keystore");
    assert!(out.contains("had seen revision"), "{out}");
    assert_eq!(describe(&env, "alias/test")["state"], "Enabled");
    let log = std::fs::read_to_string(env.path("keystore.audit")).unwrap();
    assert!(log.contains("\"AcceptKeystore\""), "not audited");
    ok(&env.sealfs(&["key", "audit", "--verify"]), "audit --verify");
    // restore-backup is the legitimate way back and is not a rollback
    ok(
        &env.sealfs(&["key", "disable", "alias/test"]),
        "disable again",
    );
    ok(&env.sealfs(&["key", "restore-backup"]), "restore-backup");
    assert_eq!(describe(&env, "alias/test")["state"], "Enabled");
    ok(
        &env.sealfs(&["key", "disable", "alias/test"]),
        "a change after the restore",
    );
    // a damaged local state refuses, and accept-keystore repairs it
    let state = env.path("state/keystores");
    // (the record, not its lock file)
    let f = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a keystore record");
    std::fs::write(&f, b"garbage").unwrap();
    assert_failed(
        &env.sealfs(&["key", "list"]),
        &["damaged", "accept-keystore"],
        "damaged state",
    );
    ok(
        &env.sealfs(&["key", "accept-keystore"]),
        "accept after damaged state",
    );
    ok(&env.sealfs(&["key", "list"]), "list after accept");
}

fn is_eacces<T>(r: &std::io::Result<T>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(EACCES))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let since = Instant::now();
    loop {
        if f() {
            return since.elapsed();
        }
        if since.elapsed() > Duration::from_secs(30) {
            panic!("{what}: not the case after {:?}", since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn running_daemon_fails_closed_when_the_keystore_cannot_be_reloaded() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.path("f.bin"), &data).unwrap();
    std::fs::write(m.path("small.txt"), b"small\n").unwrap();
    let readable = || {
        std::fs::read(m.path("f.bin")).is_ok_and(|g| g == data)
            && std::fs::read(m.path("small.txt")).is_ok_and(|g| g == b"small\n")
    };
    let revoked = || {
        is_eacces(&std::fs::read(m.path("f.bin"))) && is_eacces(&std::fs::read(m.path("small.txt")))
    };
    let good = std::fs::read(env.keystore()).unwrap();
    let bound = Duration::from_secs(5);

    // garbage in place of the keystore
    std::fs::write(env.keystore(), b"this is not a keystore").unwrap();
    let t = wait_for("revoked after garbage", revoked);
    assert!(t < bound, "took {t:?}");
    assert!(
        m.log_text().contains("cannot be re-read"),
        "{}",
        m.log_text()
    );
    std::fs::write(env.keystore(), &good).unwrap();
    let t = wait_for("back after the good keystore", readable);
    assert!(t < bound, "took {t:?}");

    // a keystore that fails authentication (one flipped bit)
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 3] ^= 1;
    std::fs::write(env.keystore(), &flipped).unwrap();
    wait_for("revoked after a flipped bit", revoked);
    std::fs::write(env.keystore(), &good).unwrap();
    wait_for("back after the flipped bit", readable);

    // unreadable (gone)
    std::fs::remove_file(env.keystore()).unwrap();
    wait_for("revoked while the keystore is missing", revoked);
    std::fs::write(env.keystore(), &good).unwrap();
    wait_for("back after the keystore returned", readable);

    // an older generation: a newer one exists, the old copy comes back
    ok(
        &env.sealfs(&["key", "create", "--alias", "newer"]),
        "a change",
    );
    let newer = std::fs::read(env.keystore()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(env.keystore(), &good).unwrap();
    let t = wait_for("revoked after an older copy", revoked);
    assert!(t < bound, "took {t:?}");
    assert!(m.log_text().contains("older copy"), "{}", m.log_text());
    std::fs::write(env.keystore(), &newer).unwrap();
    wait_for("back after the newer keystore", readable);
    // writing works again without a remount
    std::fs::write(m.path("after.txt"), b"after").unwrap();
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("after.txt")).unwrap(), b"after");
    assert_eq!(std::fs::read(m.path("f.bin")).unwrap(), data);
    m.unmount();
}

fn verify(env: &Env) -> Output {
    env.sealfs(&["key", "audit", "--verify"])
}

#[test]
fn audit_cut_with_deleted_head_torn_line_and_garbage() {
    let env = Env::new();
    let log = env.path("keystore.audit");
    let head = env.path("keystore.audit-head");
    ok(&env.sealfs(&["key", "disable", "alias/test"]), "disable");
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable");
    // read-only entries the keystore body never records
    ok(&env.sealfs(&["key", "list"]), "list");
    ok(&env.sealfs(&["key", "describe", "alias/test"]), "describe");
    ok(&verify(&env), "verify");
    let orig = std::fs::read_to_string(&log).unwrap();
    let orig_head = std::fs::read(&head).unwrap();
    let lines: Vec<&str> = orig.lines().collect();
    let n = lines.len();

    // cut: the newest entries removed, the head file deleted
    for keep in [n - 1, n - 2, n - 3] {
        let cut: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&log, &cut).unwrap();
        std::fs::remove_file(&head).unwrap();
        let out = verify(&env);
        assert_failed(
            &out,
            &["NOT intact"],
            &format!("cut to {keep} entries, head deleted"),
        );
        // the next operation does not hide it
        ok(&env.sealfs(&["key", "list"]), "list after the cut");
        assert_failed(&verify(&env), &["NOT intact"], "cut, then an append");
        std::fs::write(&log, &orig).unwrap();
        std::fs::write(&head, &orig_head).unwrap();
        ok(&verify(&env), "restored log");
    }

    // torn last line: an append interrupted by a crash
    let torn_part = &lines[n - 1][..lines[n - 1].len() / 2];
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(
        torn_part
            .replace(&format!("\"seq\":{n}"), &format!("\"seq\":{}", n + 1))
            .as_bytes(),
    )
    .unwrap();
    drop(f);
    let out = ok(&verify(&env), "verify with a torn last line");
    assert!(out.contains("torn"), "not reported: {out}");
    ok(
        &env.sealfs(&["key", "list"]),
        "an operation after the crash",
    );
    ok(
        &env.sealfs(&["key", "describe", "alias/test"]),
        "and another",
    );
    let out = ok(&verify(&env), "verify after recovery");
    assert!(out.contains("recovered by entry"), "{out}");
    let entries: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(entries.iter().any(|e| e["op"] == "RecoverAuditLog"));
    assert_eq!(entries.last().unwrap()["op"], "DescribeKey");

    // garbage appended
    let saved = std::fs::read(&log).unwrap();
    let saved_head = std::fs::read(&head).unwrap();
    for junk in [&b"garbage\n"[..], b"{\"seq\":999}\n", b"\x00\x01\x02"] {
        let mut g = saved.clone();
        g.extend_from_slice(junk);
        std::fs::write(&log, &g).unwrap();
        assert_failed(
            &verify(&env),
            &["NOT intact", "not a valid audit entry"],
            "garbage",
        );
        ok(&env.sealfs(&["key", "list"]), "list after garbage");
        assert_failed(
            &verify(&env),
            &["NOT intact", "not an audit entry"],
            "garbage, then an append",
        );
        std::fs::write(&log, &saved).unwrap();
        std::fs::write(&head, &saved_head).unwrap();
    }
    ok(&verify(&env), "verify at the end");
}

#[test]
fn key_and_passphrase_files_must_be_private_and_key_files_32_bytes() {
    let env = Env::new();
    let kf = env.key_file();
    let mode = std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "init --generate-key-file made mode {mode:o}");
    for m in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(m)).unwrap();
        let out = env.sealfs(&["key", "list"]);
        assert_failed(
            &out,
            &["group or others", &format!("chmod 600 {}", kf.display())],
            &format!("key file mode {m:o}"),
        );
    }
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    ok(&env.sealfs(&["key", "list"]), "private key file");
    let good = std::fs::read(&kf).unwrap();
    for bad in [
        &good[..31],
        &[&good[..], b"\n"].concat()[..],
        hex::encode(&good).as_bytes(),
    ] {
        let other = env.path("other.key");
        write_private(&other, bad);
        let out = env
            .cmd()
            .env("SEALFS_KEY_FILE", &other)
            .args(["key", "list"])
            .output()
            .unwrap();
        assert_failed(
            &out,
            &["exactly 32 raw bytes", &format!("found {}", bad.len())],
            &format!("{}-byte key file", bad.len()),
        );
    }
    // passphrase files
    let dir = env.path("pp");
    std::fs::create_dir_all(&dir).unwrap();
    let pass = dir.join("pass");
    write_private(&pass, "a long enough passphrase\n");
    let c = |pass: &Path| {
        env.cmd()
            .env_remove("SEALFS_KEY_FILE")
            .env("SEALFS_KEYSTORE", dir.join("keystore"))
            .env("SEALFS_PASSPHRASE_FILE", pass)
            .arg("init")
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = c(&pass);
    assert_failed(
        &out,
        &[&format!("chmod 600 {}", pass.display())],
        "passphrase file 0644",
    );
    assert!(
        !stderr(&out).contains("long enough"),
        "passphrase in the error"
    );
    assert!(!dir.join("keystore").exists());
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    ok(&c(&pass), "init with a private passphrase file");
}

/// A mount daemon locks its memory in RAM (keys never go to swap) when it
/// may, and says so in its log when it may not.
#[test]
fn mount_daemon_locks_its_memory() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"x").unwrap();
    let pid = m.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // the daemon gets CAP_IPC_LOCK as root
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if root {
        assert!(locked_kib > 0, "VmLck is {locked_kib} kB: {status}");
    } else {
        assert!(
            locked_kib > 0 || m.log_text().contains("cannot lock the daemon's memory"),
            "neither locked nor said why: {}",
            m.log_text()
        );
    }
    m.unmount();
}
