//! Key management end to end: key lifecycle states and refused
//! transitions, rotation (manual and automatic), imported keys, scheduled
//! deletion and crypto-shredding, O(1) rewrap, live revocation of mounted
//! volumes, the audit log (an entry per operation, tamper detection, no
//! noise from mount daemons), bad input, and passphrase changes.
//!
//! Time-dependent behaviour (deletion waiting periods, rotation periods) is
//! driven with `SEALFS_KMS_NOW`, never by waiting.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const DAY: u64 = 86_400;
const EACCES: i32 = 13;
/// The promised upper bound for a mounted volume to notice a key change.
const REVOCATION_BOUND: Duration = Duration::from_secs(5);

// ----- helpers --------------------------------------------------------

/// Run sealfs with the keystore clock set to `at` (seconds since the epoch).
fn sealfs_at(env: &Env, at: u64, args: &[&str]) -> Output {
    env.cmd()
        .env("SEALFS_KMS_NOW", at.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn parse_json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// `key describe KEY --json`.
fn describe(env: &Env, key: &str) -> Value {
    let out = env.sealfs(&["key", "describe", key, "--json"]);
    parse_json(&ok(&out, &format!("describe {key}")), "describe")
}

fn state_of(env: &Env, key: &str) -> String {
    describe(env, key)["state"].as_str().unwrap().to_string()
}

/// `key create ARGS...`; returns the new key id.
fn create_key(env: &Env, args: &[&str]) -> String {
    let mut a = vec!["key", "create"];
    a.extend_from_slice(args);
    let out = env.sealfs(&a);
    let id = ok(&out, "key create").trim().to_string();
    assert_eq!(id.len(), 36, "key create printed {id:?}");
    id
}

fn keystore_bytes(env: &Env) -> Vec<u8> {
    std::fs::read(env.keystore()).unwrap()
}

/// `info STORE --json`.
fn info(env: &Env, store: &Path) -> Value {
    let out = env.sealfs(&["info", s(store), "--json"]);
    parse_json(&ok(&out, "info --json"), "info")
}

fn audit_path(env: &Env) -> PathBuf {
    env.path("keystore.audit")
}

/// Every entry of the audit log, parsed from the file.
fn audit_entries(env: &Env) -> Vec<Value> {
    std::fs::read_to_string(audit_path(env))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_json(l, "audit line"))
        .collect()
}

fn audit_len(env: &Env) -> usize {
    audit_entries(env).len()
}

/// The newest audit entry with this op, key id (None: any) and result.
fn find_entry<'a>(
    entries: &'a [Value],
    op: &str,
    key_id: Option<&str>,
    result: &str,
) -> Option<&'a Value> {
    entries.iter().rev().find(|e| {
        e["op"] == op
            && e["result"] == result
            && key_id.is_none_or(|k| e["key_id"].as_str() == Some(k))
    })
}

fn expect_entry<'a>(
    entries: &'a [Value],
    op: &str,
    key_id: Option<&str>,
    result: &str,
) -> &'a Value {
    find_entry(entries, op, key_id, result).unwrap_or_else(|| {
        panic!(
            "no audit entry {op} key {key_id:?} result {result}; the log:\n{}",
            entries
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// A refused command must not change the keystore file nor what
/// `key describe` says about `key` (the audit log may grow).
fn refused_unchanged(env: &Env, key: &str, args: &[&str], needles: &[&str]) {
    let desc = describe(env, key);
    let bytes = keystore_bytes(env);
    let out = env.sealfs(args);
    assert_failed(&out, needles, &args.join(" "));
    assert!(
        keystore_bytes(env) == bytes,
        "{}: the refused command changed the keystore file",
        args.join(" ")
    );
    assert_eq!(
        describe(env, key),
        desc,
        "{}: the refused command changed the key",
        args.join(" ")
    );
}

/// `sealfs mount -f STORE MP` expected to fail without mounting.
fn mount_refused(env: &Env, store: &Path, name: &str) -> Output {
    let mp = env.path(name);
    std::fs::create_dir_all(&mp).unwrap();
    let mut c = env.cmd();
    c.arg("mount").arg("-f").arg(store).arg(&mp);
    let out = run_expect_exit(c, &mp);
    assert!(
        !out.status.success(),
        "mount of {} succeeded: {}",
        store.display(),
        stderr(&out)
    );
    assert!(!is_mounted(&mp));
    out
}

fn is_eacces<T>(r: &std::io::Result<T>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(EACCES))
}

/// Poll `f` every 100 ms until it holds; panic after `timeout`. Returns
/// the time it took (measured from `since`).
fn wait_for(
    since: Instant,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> Duration {
    loop {
        if f() {
            return since.elapsed();
        }
        if since.elapsed() > timeout {
            panic!("{what}: not the case after {:?}", since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Files (relative path -> bytes) written through a mount.
type Files = BTreeMap<String, Vec<u8>>;

fn write_files(m: &Mount, files: &Files) {
    for (name, data) in files {
        let p = m.path(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
}

fn check_files(m: &Mount, files: &Files, what: &str) {
    for (name, data) in files {
        let got =
            std::fs::read(m.path(name)).unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
        assert!(
            got == *data,
            "{what}: {name} differs ({} bytes, expected {})",
            got.len(),
            data.len()
        );
    }
}

fn sample_files(seed: u64) -> Files {
    let mut rng = Rng::new(seed);
    let mut f = Files::new();
    f.insert("small.txt".into(), b"a small inline file\n".to_vec());
    f.insert("dir/medium.bin".into(), rng.bytes(300_000));
    f.insert("large.bin".into(), rng.bytes((1 << 20) + 12_345));
    f
}

/// The keystore file in `key describe --json` terms for all keys.
fn list_json(env: &Env, at: Option<u64>) -> Vec<Value> {
    let out = match at {
        Some(t) => sealfs_at(env, t, &["key", "list", "--json"]),
        None => env.sealfs(&["key", "list", "--json"]),
    };
    match parse_json(&ok(&out, "key list --json"), "key list") {
        Value::Array(v) => v,
        other => panic!("key list --json is not an array: {other}"),
    }
}

fn key_in_list<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("key {id} is not listed"))
}

// ----- 1. lifecycle -----------------------------------------------------

#[test]
fn state_transitions_allowed_and_refused() {
    let env = Env::new();
    let k = create_key(&env, &["--alias", "life", "--description", "lifecycle"]);
    let d = describe(&env, &k);
    assert_eq!(d["state"], "Enabled");
    assert_eq!(d["origin"], "Generated");
    assert_eq!(d["manager"], "Customer");
    assert_eq!(d["aliases"], serde_json::json!(["alias/life"]));
    assert_eq!(d["description"], "lifecycle");
    assert_eq!(d["current_version"], 1);
    assert_eq!(d["versions"][0]["material"], "present");
    assert_eq!(d["deletion_date"], Value::Null);

    // Enabled <-> Disabled.
    ok(&env.sealfs(&["key", "disable", "alias/life"]), "disable");
    assert_eq!(state_of(&env, &k), "Disabled");
    refused_unchanged(
        &env,
        &k,
        &["key", "cancel-deletion", &k],
        &["Disabled", "not scheduled for deletion"],
    );
    ok(&env.sealfs(&["key", "enable", "alias/life"]), "enable");
    assert_eq!(state_of(&env, &k), "Enabled");
    refused_unchanged(
        &env,
        &k,
        &["key", "cancel-deletion", &k],
        &["Enabled", "not scheduled for deletion"],
    );

    // The waiting period must be 7..=30 days.
    for days in ["6", "0", "31", "365"] {
        refused_unchanged(
            &env,
            &k,
            &["key", "schedule-deletion", &k, "--pending-days", days],
            &["out of range", "7 to 30"],
        );
    }

    // Enabled -> PendingDeletion (default 30 days) -> Disabled.
    let before = now_secs();
    let out = env.sealfs(&["key", "schedule-deletion", &k]);
    assert!(ok(&out, "schedule-deletion").contains("PendingDeletion"));
    let d = describe(&env, &k);
    assert_eq!(d["state"], "PendingDeletion");
    assert!(d["deletion_date"].is_string(), "{d}");
    // Not yet due 29 days later: still pending.
    let list = list_json(&env, Some(before + 29 * DAY));
    assert_eq!(key_in_list(&list, &k)["state"], "PendingDeletion");
    // Every use and every other transition is refused while pending.
    refused_unchanged(
        &env,
        &k,
        &["key", "enable", &k],
        &["PendingDeletion", "cancel-deletion"],
    );
    refused_unchanged(&env, &k, &["key", "disable", &k], &["PendingDeletion"]);
    refused_unchanged(&env, &k, &["key", "rotate", &k], &["PendingDeletion"]);
    refused_unchanged(
        &env,
        &k,
        &["key", "schedule-deletion", &k, "--pending-days", "7"],
        &["already scheduled for deletion"],
    );
    let out = env.sealfs(&["key", "cancel-deletion", &k]);
    assert!(ok(&out, "cancel-deletion").contains("Disabled"));
    let d = describe(&env, &k);
    assert_eq!(d["state"], "Disabled");
    assert_eq!(d["deletion_date"], Value::Null);

    // Disabled -> PendingDeletion -> Disabled -> Enabled.
    ok(
        &env.sealfs(&["key", "schedule-deletion", &k, "--pending-days", "7"]),
        "schedule from Disabled",
    );
    assert_eq!(state_of(&env, &k), "PendingDeletion");
    ok(&env.sealfs(&["key", "cancel-deletion", &k]), "cancel");
    assert_eq!(state_of(&env, &k), "Disabled");
    ok(&env.sealfs(&["key", "enable", &k]), "enable");
    assert_eq!(state_of(&env, &k), "Enabled");

    // External key: PendingImport; only deletion can be scheduled, and
    // cancelling goes back to PendingImport.
    let x = create_key(&env, &["--origin", "external", "--alias", "ext"]);
    let d = describe(&env, &x);
    assert_eq!(d["state"], "PendingImport");
    assert_eq!(d["origin"], "External");
    assert_eq!(d["versions"], serde_json::json!([]));
    refused_unchanged(
        &env,
        &x,
        &["key", "enable", &x],
        &["PendingImport", "import"],
    );
    refused_unchanged(
        &env,
        &x,
        &["key", "disable", &x],
        &["PendingImport", "import"],
    );
    ok(
        &env.sealfs(&["key", "schedule-deletion", &x, "--pending-days", "7"]),
        "schedule external",
    );
    assert_eq!(state_of(&env, &x), "PendingDeletion");
    let out = env.sealfs(&["key", "cancel-deletion", &x]);
    assert!(ok(&out, "cancel external").contains("PendingImport"));
    assert_eq!(state_of(&env, &x), "PendingImport");
    let mat = env.path("ext.bin");
    std::fs::write(&mat, Rng::new(7).bytes(32)).unwrap();
    ok(
        &env.sealfs(&["key", "import", &x, "--material", s(&mat)]),
        "import",
    );
    assert_eq!(state_of(&env, &x), "Enabled");
    ok(&env.sealfs(&["key", "disable", &x]), "disable external");
    assert_eq!(state_of(&env, &x), "Disabled");
    ok(&env.sealfs(&["key", "enable", &x]), "enable external");
    assert_eq!(state_of(&env, &x), "Enabled");

    // Service-managed keys refuse lifecycle changes.
    for svc in ["alias/sealfs/service", "alias/sealfs/default"] {
        refused_unchanged(&env, svc, &["key", "disable", svc], &["managed by sealfs"]);
        refused_unchanged(
            &env,
            svc,
            &["key", "schedule-deletion", svc, "--pending-days", "7"],
            &["managed by sealfs"],
        );
        assert_eq!(state_of(&env, svc), "Enabled");
    }

    // PendingDeletion -> Deleted once the waiting period has passed, at
    // the next keystore access.
    let t0 = now_secs();
    ok(
        &env.sealfs(&[
            "key",
            "schedule-deletion",
            "alias/life",
            "--pending-days",
            "7",
        ]),
        "schedule",
    );
    let list = list_json(&env, Some(t0 + 6 * DAY));
    assert_eq!(key_in_list(&list, &k)["state"], "PendingDeletion");
    let list = list_json(&env, Some(t0 + 8 * DAY));
    let d = key_in_list(&list, &k);
    assert_eq!(d["state"], "Deleted", "{d}");
    // The destruction is persistent (not just a view at that clock).
    let d = describe(&env, &k);
    assert_eq!(d["state"], "Deleted");
    assert_eq!(d["aliases"], serde_json::json!([]), "aliases remain: {d}");
    assert!(d["deleted"].is_string(), "{d}");
    assert!(
        d["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["material"] == "deleted"),
        "material remains: {d}"
    );
    let out = env.sealfs(&["key", "describe", "alias/life"]);
    assert_failed(&out, &["no key matches"], "describe by the removed alias");
    // The alias is free again.
    ok(
        &env.sealfs(&["key", "alias", "create", "life", &x]),
        "reuse the alias",
    );

    // Nothing brings a Deleted key back, and nothing else changes it.
    for args in [
        vec!["key", "enable", k.as_str()],
        vec!["key", "disable", k.as_str()],
        vec!["key", "cancel-deletion", k.as_str()],
        vec![
            "key",
            "schedule-deletion",
            k.as_str(),
            "--pending-days",
            "7",
        ],
        vec!["key", "rotate", k.as_str()],
    ] {
        refused_unchanged(&env, &k, &args, &["deleted", "crypto-shredded"]);
    }
    assert_eq!(state_of(&env, &k), "Deleted");
}

// ----- 2. rotation --------------------------------------------------------

#[test]
fn rotation_old_versions_still_unwrap() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let key_id = describe(&env, "alias/test")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let store = env.create_store("store");
    let other = env.create_store("other");
    let files = sample_files(2);
    let m = env.mount(&store, "mnt", &[]);
    write_files(&m, &files);
    m.unmount();
    let i = info(&env, &store);
    assert_eq!(i["content_key"]["id"], key_id.as_str());
    assert_eq!(i["content_key"]["version"], 1);

    let out = env.sealfs(&["key", "rotate", "alias/test"]);
    assert!(ok(&out, "rotate").contains("v2"), "{}", stdout(&out));
    let d = describe(&env, "alias/test");
    assert_eq!(d["current_version"], 2);
    assert_eq!(d["versions"].as_array().unwrap().len(), 2);
    assert_eq!(d["versions"][0]["material"], "present");

    // Version 1 still unwraps: info reads the store, nothing is rewritten.
    let hdr = std::fs::read(store.join("sealfs.store")).unwrap();
    let i = info(&env, &store);
    assert_eq!(i["content_key"]["version"], 1);
    assert_eq!(i["content_unavailable"], Value::Null);
    assert_eq!(std::fs::read(store.join("sealfs.store")).unwrap(), hdr);

    // Mounting re-wraps under v2; the data is intact.
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after rotation");
    m.unmount();
    let i = info(&env, &store);
    assert_eq!(i["content_key"]["id"], key_id.as_str());
    assert_eq!(i["content_key"]["version"], 2, "mount did not re-wrap: {i}");
    let entries = audit_entries(&env);
    let e = expect_entry(&entries, "ReEncrypt", Some(&key_id), "ok");
    assert_eq!(e["key_version"], 2);
    assert_eq!(e["volume"], i["volume_id"]);

    // `rewrap` does the same for a store that is not mounted.
    assert_eq!(info(&env, &other)["content_key"]["version"], 1);
    let out = env.sealfs(&["rewrap", s(&other)]);
    let text = ok(&out, "rewrap");
    assert!(text.contains("v1") && text.contains("v2"), "{text}");
    assert_eq!(info(&env, &other)["content_key"]["version"], 2);
    let out = env.sealfs(&["rewrap", s(&other)]);
    assert!(
        ok(&out, "second rewrap").contains("nothing to do"),
        "{}",
        stdout(&out)
    );

    // Automatic rotation: due 30 days after the newest version.
    let t0 = now_secs();
    ok(
        &env.sealfs(&["key", "rotation", "enable", "alias/test", "--period", "30"]),
        "rotation enable",
    );
    let d = describe(&env, "alias/test");
    assert_eq!(d["rotation_period_days"], 30);
    assert_eq!(d["current_version"], 2);
    let out = sealfs_at(
        &env,
        t0 + 29 * DAY,
        &["key", "describe", "alias/test", "--json"],
    );
    assert_eq!(parse_json(&ok(&out, "describe"), "d")["current_version"], 2);
    let n = audit_len(&env);
    let out = sealfs_at(
        &env,
        t0 + 31 * DAY,
        &["key", "describe", "alias/test", "--json"],
    );
    let d = parse_json(&ok(&out, "describe +31d"), "describe");
    assert_eq!(d["current_version"], 3, "no automatic rotation: {d}");
    assert_eq!(d["versions"].as_array().unwrap().len(), 3);
    let entries = audit_entries(&env);
    let e = expect_entry(&entries[n..], "RotateKey", Some(&key_id), "ok");
    assert_eq!(e["key_version"], 3);
    assert!(
        e["detail"].as_str().unwrap_or("").contains("automatic"),
        "{e}"
    );
    assert_eq!(e["time"].as_u64().unwrap(), t0 + 31 * DAY);
    // Persistent, and not repeated at the real clock.
    assert_eq!(describe(&env, "alias/test")["current_version"], 3);

    // Old versions (v2 here) still unwrap; mount moves the store to v3.
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after automatic rotation");
    m.unmount();
    assert_eq!(info(&env, &store)["content_key"]["version"], 3);
    // `other` is still at v2 and still readable.
    let i = info(&env, &other);
    assert_eq!(i["content_key"]["version"], 2);
    assert_eq!(i["content_unavailable"], Value::Null);

    // Rotation off: no new version however late.
    ok(
        &env.sealfs(&["key", "rotation", "disable", "alias/test"]),
        "rotation disable",
    );
    let d = describe(&env, "alias/test");
    assert_eq!(d["rotation_period_days"], Value::Null);
    let out = sealfs_at(
        &env,
        t0 + 400 * DAY,
        &["key", "describe", "alias/test", "--json"],
    );
    assert_eq!(parse_json(&ok(&out, "describe"), "d")["current_version"], 3);
    let entries = audit_entries(&env);
    expect_entry(&entries, "EnableKeyRotation", Some(&key_id), "ok");
    expect_entry(&entries, "DisableKeyRotation", Some(&key_id), "ok");
}

// ----- 3. imported keys -------------------------------------------------

#[test]
fn imported_keys() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let mut rng = Rng::new(3);
    let m1 = rng.bytes(32);
    let m2 = rng.bytes(32);
    // material 1 as hex text, also as raw bytes; material 2 raw
    let m1_hex = env.path("m1.hex");
    std::fs::write(&m1_hex, format!("{}\n", hex::encode(&m1))).unwrap();
    let m1_raw = env.path("m1.raw");
    std::fs::write(&m1_raw, &m1).unwrap();
    let m2_raw = env.path("m2.raw");
    std::fs::write(&m2_raw, &m2).unwrap();
    let short = env.path("short.raw");
    std::fs::write(&short, &m1[..31]).unwrap();
    let long = env.path("long.raw");
    std::fs::write(&long, [&m1[..], &m2[..1]].concat()).unwrap();

    let x = create_key(&env, &["--origin", "external", "--alias", "byok"]);
    let d = describe(&env, "alias/byok");
    assert_eq!(d["state"], "PendingImport");
    assert_eq!(d["current_version"], 0);

    // No store under a key without material.
    let store = env.path("store");
    let out = env.sealfs(&["create", s(&store), "--kms-key", "alias/byok"]);
    assert_failed(&out, &["PendingImport"], "create under PendingImport");
    assert!(!store.exists(), "a refused create left {}", store.display());

    for bad in [&short, &long] {
        refused_unchanged(
            &env,
            &x,
            &["key", "import", "alias/byok", "--material", s(bad)],
            &["32 raw bytes"],
        );
    }
    let out = env.sealfs(&["key", "import", "alias/byok", "--material", s(&m1_hex)]);
    assert!(ok(&out, "import").contains("Enabled"), "{}", stdout(&out));
    let d = describe(&env, "alias/byok");
    assert_eq!(d["state"], "Enabled");
    assert_eq!(d["current_version"], 1);

    let out = env.sealfs(&["create", s(&store), "--kms-key", "alias/byok"]);
    ok(&out, "create under the imported key");
    let files = sample_files(3);
    let m = env.mount(&store, "mnt", &[]);
    write_files(&m, &files);
    m.unmount();

    // Re-import: different material refused, identical accepted.
    refused_unchanged(
        &env,
        &x,
        &["key", "import", "alias/byok", "--material", s(&m2_raw)],
        &["differs"],
    );
    ok(
        &env.sealfs(&["key", "import", "alias/byok", "--material", s(&m1_raw)]),
        "identical re-import",
    );
    assert_eq!(state_of(&env, &x), "Enabled");

    // Delete the material: unusable until the same material comes back.
    ok(
        &env.sealfs(&["key", "delete-material", "alias/byok"]),
        "delete-material",
    );
    let d = describe(&env, "alias/byok");
    assert_eq!(d["state"], "PendingImport");
    assert_eq!(d["versions"][0]["material"], "deleted");
    let out = mount_refused(&env, &store, "mnt");
    assert_failed(
        &out,
        &[&x, "PendingImport", "import"],
        "mount without material",
    );
    let i = info(&env, &store);
    assert!(i["content_unavailable"].is_string(), "{i}");
    refused_unchanged(
        &env,
        &x,
        &["key", "import", "alias/byok", "--material", s(&m2_raw)],
        &["differs"],
    );
    let out = env.sealfs(&["key", "import", "alias/byok", "--material", s(&m1_raw)]);
    assert!(ok(&out, "re-import").contains("Enabled"));
    assert_eq!(
        describe(&env, "alias/byok")["versions"][0]["material"],
        "present"
    );
    assert_eq!(info(&env, &store)["content_unavailable"], Value::Null);
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after re-import");
    m.unmount();

    // Rotation of an imported key needs new material.
    refused_unchanged(&env, &x, &["key", "rotate", "alias/byok"], &["--material"]);
    refused_unchanged(
        &env,
        &x,
        &["key", "rotate", "alias/byok", "--material", s(&m1_raw)],
        &["already has this material"],
    );
    refused_unchanged(
        &env,
        &x,
        &["key", "rotate", "alias/byok", "--material", s(&short)],
        &["32 raw bytes"],
    );
    // and it cannot rotate automatically
    refused_unchanged(
        &env,
        &x,
        &["key", "rotation", "enable", "alias/byok", "--period", "30"],
        &["imported"],
    );
    let out = env.sealfs(&["key", "rotate", "alias/byok", "--material", s(&m2_raw)]);
    assert!(ok(&out, "rotate with new material").contains("v2"));
    let d = describe(&env, "alias/byok");
    assert_eq!(d["current_version"], 2);
    assert_eq!(d["versions"].as_array().unwrap().len(), 2);
    // The store (v1) still opens; mount re-wraps to v2.
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after rotating the imported key");
    m.unmount();
    assert_eq!(info(&env, &store)["content_key"]["version"], 2);
}

// ----- 4. deletion and crypto-shredding ---------------------------------

#[test]
fn scheduled_deletion_and_shredding() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let k = create_key(&env, &["--alias", "doomed"]);
    let store = env.path("store");
    ok(
        &env.sealfs(&["create", s(&store), "--kms-key", "alias/doomed"]),
        "create",
    );
    let i = info(&env, &store);
    let inline_max = i["inline_max"].as_u64().unwrap() as usize;
    let vid = i["volume_id"].as_str().unwrap().to_string();
    let mut rng = Rng::new(4);
    let mut files = Files::new();
    files.insert("tiny.txt".into(), b"inline".to_vec());
    files.insert("d/inline.bin".into(), rng.bytes(inline_max - 1));
    files.insert("big.bin".into(), rng.bytes((3 << 20) / 2 + 77));
    let m = env.mount(&store, "mnt", &[]);
    write_files(&m, &files);
    m.unmount();

    ok(
        &env.sealfs(&[
            "key",
            "schedule-deletion",
            "alias/doomed",
            "--pending-days",
            "7",
        ]),
        "schedule-deletion",
    );
    let out = mount_refused(&env, &store, "mnt");
    assert_failed(
        &out,
        &[&k, "PendingDeletion"],
        "mount while PendingDeletion",
    );

    let out = env.sealfs(&["key", "cancel-deletion", "alias/doomed"]);
    assert!(ok(&out, "cancel").contains("Disabled"));
    assert_eq!(state_of(&env, &k), "Disabled");
    let out = mount_refused(&env, &store, "mnt");
    assert_failed(&out, &[&k, "Disabled"], "mount while Disabled");
    ok(&env.sealfs(&["key", "enable", "alias/doomed"]), "enable");
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after cancelled deletion");
    m.unmount();

    let t0 = now_secs();
    ok(
        &env.sealfs(&[
            "key",
            "schedule-deletion",
            "alias/doomed",
            "--pending-days",
            "7",
        ]),
        "schedule again",
    );
    let list = list_json(&env, Some(t0 + 8 * DAY));
    assert_eq!(key_in_list(&list, &k)["state"], "Deleted");
    let list = list_json(&env, None);
    let d = key_in_list(&list, &k);
    assert_eq!(d["state"], "Deleted");
    assert_eq!(d["aliases"], serde_json::json!([]));
    let text = ok(&env.sealfs(&["key", "list"]), "key list");
    let row = text.lines().find(|l| l.starts_with(&k)).unwrap();
    assert!(row.contains("Deleted"), "{row}");

    // info says why the content is gone.
    let out = env.sealfs(&["info", s(&store)]);
    let text = ok(&out, "info");
    let line = text
        .lines()
        .find(|l| l.starts_with("Content:"))
        .unwrap_or_else(|| panic!("info has no Content: line: {text}"));
    assert!(
        line.contains("UNAVAILABLE") && line.contains("crypto-shredded"),
        "{line}"
    );
    let i = info(&env, &store);
    assert!(
        i["content_unavailable"]
            .as_str()
            .unwrap_or("")
            .contains("crypto-shredded"),
        "{i}"
    );
    // No new store under it.
    let out = env.sealfs(&["create", s(&env.path("store2")), "--kms-key", &k]);
    assert_failed(&out, &["crypto-shredded"], "create under a deleted key");
    assert!(!env.path("store2").exists());

    // Metadata-only mount: names and sizes, no content.
    let store_files = snapshot_store(&store);
    let m = env.mount(&store, "mnt", &[]);
    assert!(
        m.log_text().contains("only metadata"),
        "no warning in the daemon log: {}",
        m.log_text()
    );
    let mut names: Vec<String> = std::fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "d", "tiny.txt"]);
    for (name, data) in &files {
        let md = std::fs::metadata(m.path(name)).unwrap();
        assert_eq!(md.len(), data.len() as u64, "size of {name}");
        let r = std::fs::read(m.path(name));
        assert!(is_eacces(&r), "read {name} of a shredded volume: {r:?}");
    }
    let r = std::fs::write(m.path("new.txt"), b"x");
    assert!(is_eacces(&r), "create in a shredded volume: {r:?}");
    m.unmount();
    // Nothing of the content was touched.
    let after = snapshot_store(&store);
    for (p, b) in &store_files {
        if p.starts_with("chunks") {
            assert!(after.get(p) == Some(b), "chunk {} changed", p.display());
        }
    }

    // A background mount warns on the terminal.
    let mp = env.path("bg");
    std::fs::create_dir_all(&mp).unwrap();
    let _guard = BgGuard(mp.clone());
    let out = env.sealfs(&["mount", s(&store), s(&mp)]);
    ok(&out, "background mount of a shredded volume");
    let e = stderr(&out);
    assert!(
        e.contains("warning") && e.contains("metadata only") && e.contains("crypto-shredded"),
        "no warning: {e}"
    );
    assert!(is_mounted(&mp));
    assert!(is_eacces(&std::fs::read(mp.join("tiny.txt"))));
    ok(&env.sealfs(&["umount", s(&mp)]), "umount");

    let entries = audit_entries(&env);
    let e = expect_entry(&entries, "DestroyKey", Some(&k), "ok");
    assert_eq!(e["time"].as_u64().unwrap(), t0 + 8 * DAY);
    let e = expect_entry(&entries, "Decrypt", Some(&k), "denied");
    assert_eq!(e["volume"], vid.as_str());
}

// ----- 5. rewrap --------------------------------------------------------

#[test]
fn rewrap_is_o1_and_content_identical() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let other = create_key(&env, &["--alias", "other"]);
    let mut rng = Rng::new(5);
    let mut sets = Vec::new();
    for (name, size) in [("small", 100 << 10), ("large", 20 << 20)] {
        let store = env.create_store(name);
        let mut files = Files::new();
        let mut left: usize = size;
        let mut n = 0;
        while left > 0 {
            let len = left.min(4 << 20);
            files.insert(format!("f{n}.bin"), rng.bytes(len));
            left -= len;
            n += 1;
        }
        files.insert("note.txt".into(), format!("{name}\n").into_bytes());
        let m = env.mount(&store, &format!("mnt-{name}"), &[]);
        write_files(&m, &files);
        m.unmount();
        sets.push((store, files));
    }

    let mut reported = Vec::new();
    for (store, _) in &sets {
        let before = snapshot_store(store);
        let hdr_len = std::fs::metadata(store.join("sealfs.store")).unwrap().len();
        let out = env.sealfs(&["rewrap", s(store), "--kms-key", "alias/other"]);
        let text = ok(&out, "rewrap --kms-key");
        let n: u64 = text
            .split("rewrote the header only: ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in: {text}"));
        assert_eq!(n, hdr_len, "reported bytes vs header size");
        reported.push(n);
        let after = snapshot_store(store);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "rewrap added or removed files"
        );
        let changed: Vec<&PathBuf> = before
            .iter()
            .filter(|(p, b)| after.get(*p) != Some(*b))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            changed,
            [&PathBuf::from("sealfs.store")],
            "rewrap changed more than the header"
        );
        let i = info(&env, store);
        assert_eq!(i["content_key"]["id"], other.as_str());
        assert_eq!(i["content_key"]["version"], 1);
    }
    assert_eq!(
        reported[0], reported[1],
        "rewrap wrote different amounts for a 100 KiB and a 20 MiB store"
    );
    assert!(sets[1].1.len() > 4 && reported[1] < 64 << 10);

    // Only the new key is needed now.
    ok(
        &env.sealfs(&["key", "disable", "alias/test"]),
        "disable old",
    );
    for (store, files) in &sets {
        assert_eq!(info(&env, store)["content_unavailable"], Value::Null);
        let m = env.mount(store, "mnt", &[]);
        check_files(&m, files, "under the new key");
        m.unmount();
    }
    // And the new key is needed: disabling it locks the stores.
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable old");
    ok(
        &env.sealfs(&["key", "disable", "alias/other"]),
        "disable new",
    );
    let out = mount_refused(&env, &sets[0].0, "mnt");
    assert_failed(
        &out,
        &[&other, "Disabled"],
        "mount with the new key disabled",
    );
}

// ----- 6. live revocation -----------------------------------------------

/// Wait until reading each of `names` fails with EACCES; returns the time
/// it took since `since`.
fn wait_revoked(m: &Mount, names: &[&str], since: Instant, what: &str) -> Duration {
    let t = wait_for(since, Duration::from_secs(30), what, || {
        names.iter().all(|n| is_eacces(&std::fs::read(m.path(n))))
    });
    assert!(t < REVOCATION_BOUND, "{what}: took {t:?}");
    t
}

/// Wait until every file reads back identical; returns the time it took.
fn wait_restored(m: &Mount, files: &Files, since: Instant, what: &str) -> Duration {
    let t = wait_for(since, Duration::from_secs(30), what, || {
        files
            .iter()
            .all(|(n, d)| std::fs::read(m.path(n)).is_ok_and(|g| g == *d))
    });
    assert!(t < REVOCATION_BOUND, "{what}: took {t:?}");
    t
}

/// While revoked: names, sizes and stat work, mkdir works, content
/// reads, writes and file creation fail with EACCES.
fn check_revoked(m: &Mount, files: &Files, dir: &str) {
    let mut listed: Vec<String> = std::fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    for name in files.keys() {
        let top = name.split('/').next().unwrap();
        assert!(
            listed.iter().any(|l| l == top),
            "{top} not listed: {listed:?}"
        );
        let md = std::fs::metadata(m.path(name)).unwrap();
        assert_eq!(md.len(), files[name].len() as u64, "size of {name}");
        let r = std::fs::read(m.path(name));
        assert!(is_eacces(&r), "read {name}: {r:?}");
    }
    // appending to a small file: refused at open (or, at the latest, by
    // the write and fsync)
    let r = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("small.txt"))
        .and_then(|mut f| f.write_all(b"more").and_then(|_| f.sync_all()));
    assert!(is_eacces(&r), "append to small.txt: {r:?}");
    // writing into a large file
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("large.bin"))
        .and_then(|f| f.write_at(b"overwrite", 1000).and_then(|_| f.sync_all()));
    assert!(is_eacces(&r), "write into large.bin: {r:?}");
    // creating a regular file
    let r = std::fs::write(m.path("created-while-revoked.txt"), b"x");
    assert!(is_eacces(&r), "create: {r:?}");
    assert!(!m.path("created-while-revoked.txt").exists());
    // metadata operations still work
    std::fs::create_dir(m.path(dir)).unwrap();
    assert!(std::fs::metadata(m.path(dir)).unwrap().is_dir());
    assert!(std::fs::metadata(m.path("")).unwrap().is_dir());
}

#[test]
fn live_revocation_on_a_real_mount() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut rng = Rng::new(6);
    let mut files = Files::new();
    files.insert("small.txt".into(), b"small and inline\n".to_vec());
    files.insert("large.bin".into(), rng.bytes((5 << 20) / 2 + 3));
    files.insert("sub/mid.bin".into(), rng.bytes(200_000));
    let m = env.mount(&store, "mnt", &[]);
    // written without fsync, right before the revocation
    write_files(&m, &files);
    check_files(&m, &files, "before revocation");
    // a descriptor opened before the revocation
    let held = std::fs::File::open(m.path("large.bin")).unwrap();

    // --- disable / enable
    let t = Instant::now();
    ok(&env.sealfs(&["key", "disable", "alias/test"]), "disable");
    let took = wait_revoked(&m, &["small.txt", "large.bin", "sub/mid.bin"], t, "disable");
    eprintln!("content revoked {took:?} after disable");
    let mut buf = vec![0u8; 4096];
    let r = held.read_at(&mut buf, 0);
    assert!(
        is_eacces(&r),
        "read through a descriptor opened before: {r:?}"
    );
    check_revoked(&m, &files, "dir-made-while-disabled");

    let t = Instant::now();
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable");
    let took = wait_restored(&m, &files, t, "enable");
    eprintln!("content back {took:?} after enable");
    held.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[..], files["large.bin"][..4096]);

    // --- schedule-deletion / cancel-deletion / enable, with data written
    // just before
    let late = rng.bytes(700_000);
    files.insert("late.bin".into(), late.clone());
    files
        .get_mut("small.txt")
        .unwrap()
        .extend_from_slice(b"appended\n");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("small.txt"))
        .unwrap();
    f.write_all(b"appended\n").unwrap();
    drop(f);
    std::fs::write(m.path("late.bin"), &late).unwrap();

    let t = Instant::now();
    ok(
        &env.sealfs(&[
            "key",
            "schedule-deletion",
            "alias/test",
            "--pending-days",
            "7",
        ]),
        "schedule-deletion",
    );
    let took = wait_revoked(&m, &["small.txt", "large.bin", "late.bin"], t, "schedule");
    eprintln!("content revoked {took:?} after schedule-deletion");
    check_revoked(&m, &files, "dir-made-while-pending");
    ok(
        &env.sealfs(&["key", "cancel-deletion", "alias/test"]),
        "cancel",
    );
    assert_eq!(state_of(&env, "alias/test"), "Disabled");
    // still revoked: Disabled
    assert!(is_eacces(&std::fs::read(m.path("small.txt"))));
    let t = Instant::now();
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable");
    let took = wait_restored(&m, &files, t, "enable after cancel");
    eprintln!("content back {took:?} after cancel + enable");

    // Writing works again.
    files.insert("after.txt".into(), b"written after restore\n".to_vec());
    std::fs::write(m.path("after.txt"), &files["after.txt"]).unwrap();
    drop(held);
    m.unmount();

    let m = env.mount(&store, "mnt", &[]);
    check_files(&m, &files, "after remount");
    assert!(m.path("dir-made-while-disabled").is_dir());
    assert!(m.path("dir-made-while-pending").is_dir());
    assert!(!m.path("created-while-revoked.txt").exists());
    m.unmount();
}

#[test]
fn live_revocation_by_material_deletion_and_destruction() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let x = create_key(&env, &["--origin", "external", "--alias", "live"]);
    let mat = env.path("live.bin");
    std::fs::write(&mat, Rng::new(8).bytes(32)).unwrap();
    ok(
        &env.sealfs(&["key", "import", &x, "--material", s(&mat)]),
        "import",
    );
    let store = env.path("store");
    ok(
        &env.sealfs(&["create", s(&store), "--kms-key", "alias/live"]),
        "create",
    );
    let files = sample_files(8);
    let names: Vec<&str> = files.keys().map(|k| k.as_str()).collect();
    let m = env.mount(&store, "mnt", &[]);
    write_files(&m, &files);

    // delete-material revokes; importing the same material restores.
    let t = Instant::now();
    ok(
        &env.sealfs(&["key", "delete-material", &x]),
        "delete-material",
    );
    let took = wait_revoked(&m, &names, t, "delete-material");
    eprintln!("content revoked {took:?} after delete-material");
    check_revoked(&m, &files, "dir1");
    let t = Instant::now();
    ok(
        &env.sealfs(&["key", "import", &x, "--material", s(&mat)]),
        "re-import",
    );
    let took = wait_restored(&m, &files, t, "re-import");
    eprintln!("content back {took:?} after re-import");

    // Destroyed while mounted: content stays gone, metadata stays.
    let t0 = now_secs();
    let t = Instant::now();
    ok(
        &env.sealfs(&["key", "schedule-deletion", &x, "--pending-days", "7"]),
        "schedule-deletion",
    );
    wait_revoked(&m, &names, t, "schedule-deletion");
    let list = list_json(&env, Some(t0 + 8 * DAY));
    assert_eq!(key_in_list(&list, &x)["state"], "Deleted");
    assert_failed(
        &env.sealfs(&["key", "import", &x, "--material", s(&mat)]),
        &["crypto-shredded"],
        "import into a deleted key",
    );
    // Several key checks later, still no content; names and sizes remain.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for n in &names {
            assert!(is_eacces(&std::fs::read(m.path(n))), "{n} readable");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (n, d) in &files {
        assert_eq!(std::fs::metadata(m.path(n)).unwrap().len(), d.len() as u64);
    }
    std::fs::create_dir(m.path("dir2")).unwrap();
    m.unmount();

    let m = env.mount(&store, "mnt", &[]);
    assert!(m.log_text().contains("only metadata"), "{}", m.log_text());
    assert!(m.path("dir1").is_dir() && m.path("dir2").is_dir());
    for (n, d) in &files {
        assert_eq!(std::fs::metadata(m.path(n)).unwrap().len(), d.len() as u64);
        assert!(is_eacces(&std::fs::read(m.path(n))), "{n} readable");
    }
    m.unmount();
    let i = info(&env, &store);
    assert!(
        i["content_unavailable"]
            .as_str()
            .unwrap_or("")
            .contains("crypto-shredded"),
        "{i}"
    );
}

/// With the kernel's writeback cache, a write of whole, aligned pages needs
/// no read from the daemon. While the content key is revoked, opening a file
/// for writing is refused with EACCES. A descriptor opened for writing
/// before the revocation can still hand whole pages to the kernel's cache;
/// those writes fail at writeback, so fsync and close report EACCES, and
/// neither the store nor the mount (once the key is back) shows them.
#[test]
fn revoked_mount_refuses_whole_page_writes() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let data = Rng::new(12).bytes(1 << 20);
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f.bin"), &data).unwrap();
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("f.bin"))
        .unwrap();
    let t = Instant::now();
    ok(&env.sealfs(&["key", "disable", "alias/test"]), "disable");
    wait_revoked(&m, &["f.bin"], t, "disable");

    // a new descriptor for writing: refused at open
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("f.bin"));
    assert!(
        is_eacces(&opened),
        "open for writing while revoked: {opened:?}"
    );
    let trunc = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f.bin"));
    assert!(is_eacces(&trunc), "O_TRUNC while revoked: {trunc:?}");
    assert_eq!(
        std::fs::metadata(m.path("f.bin")).unwrap().len(),
        data.len() as u64
    );

    // the descriptor held across the revocation: the error surfaces at the
    // latest at fsync
    let w = held.write_at(&[b'Z'; 4096], 8192);
    let s = held.sync_all();
    drop(held);
    assert!(
        is_eacces(&w) || is_eacces(&s),
        "a whole-page write while revoked was reported as written: pwrite {w:?}, fsync {s:?}"
    );

    let t = Instant::now();
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable");
    wait_for(t, Duration::from_secs(30), "content back", || {
        std::fs::read(m.path("f.bin")).is_ok()
    });
    let live = std::fs::read(m.path("f.bin")).unwrap();
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    let stored = std::fs::read(m.path("f.bin")).unwrap();
    m.unmount();
    let facts = format!(
        "pwrite {w:?}, fsync {s:?}; after enable the mount showed {:?} at 8192, after a \
         remount the store has {:?} there (originally {:?})",
        &live[8192..8196],
        &stored[8192..8196],
        &data[8192..8196]
    );
    assert!(
        live == data,
        "the refused write showed up in the file: {facts}"
    );
    assert!(
        stored == data,
        "the refused write changed the file: {facts}"
    );
}

// ----- 7. audit entries ---------------------------------------------------

#[test]
fn audit_entries_for_each_operation() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let uid = unsafe { libc::getuid() } as u64;
    let a = create_key(&env, &["--alias", "audited"]);
    describe(&env, "alias/audited");
    list_json(&env, None);
    ok(&env.sealfs(&["key", "disable", &a]), "disable");
    ok(&env.sealfs(&["key", "enable", &a]), "enable");
    ok(&env.sealfs(&["key", "rotate", &a]), "rotate");
    ok(
        &env.sealfs(&["key", "rotation", "enable", &a, "--period", "90"]),
        "rotation enable",
    );
    ok(
        &env.sealfs(&["key", "rotation", "disable", &a]),
        "rotation disable",
    );
    ok(
        &env.sealfs(&["key", "alias", "create", "audited-2", &a]),
        "alias create",
    );
    ok(
        &env.sealfs(&["key", "alias", "delete", "audited-2"]),
        "alias delete",
    );
    let x = create_key(&env, &["--origin", "external"]);
    let mat = env.path("x.bin");
    std::fs::write(&mat, Rng::new(7).bytes(32)).unwrap();
    ok(
        &env.sealfs(&["key", "import", &x, "--material", s(&mat)]),
        "import",
    );
    ok(
        &env.sealfs(&["key", "delete-material", &x]),
        "delete-material",
    );

    // volume operations
    let store = env.path("store");
    ok(
        &env.sealfs(&["create", s(&store), "--kms-key", &a]),
        "create",
    );
    let i = info(&env, &store);
    let vid = i["volume_id"].as_str().unwrap().to_string();
    let b = create_key(&env, &["--alias", "second"]);
    ok(
        &env.sealfs(&["rewrap", s(&store), "--kms-key", &b]),
        "rewrap",
    );
    ok(&env.sealfs(&["key", "disable", &b]), "disable b");
    let out = mount_refused(&env, &store, "mnt");
    assert_failed(&out, &[&b, "Disabled"], "mount with a disabled key");
    ok(&env.sealfs(&["key", "enable", &b]), "enable b");
    let m = env.mount(&store, "mnt", &[]);
    m.unmount();

    // deletion
    let t0 = now_secs();
    ok(
        &env.sealfs(&["key", "schedule-deletion", &x, "--pending-days", "7"]),
        "schedule",
    );
    ok(&env.sealfs(&["key", "cancel-deletion", &x]), "cancel");
    ok(
        &env.sealfs(&["key", "schedule-deletion", &x, "--pending-days", "7"]),
        "schedule again",
    );
    list_json(&env, Some(t0 + 8 * DAY));

    // refusals
    assert_failed(
        &env.sealfs(&["key", "disable", "alias/sealfs/service"]),
        &["managed by sealfs"],
        "disable service key",
    );
    assert_failed(
        &env.sealfs(&["key", "describe", "no-such-key"]),
        &["no key matches"],
        "describe unknown",
    );

    // the keystore secret
    let k2 = env.path("k2.key");
    ok(
        &env.sealfs(&[
            "key",
            "change-passphrase",
            "--new-key-file",
            s(&k2),
            "--generate",
        ]),
        "change-passphrase",
    );
    // the backup is sealed with the original key file
    ok(&env.sealfs(&["key", "restore-backup"]), "restore-backup");

    let entries = audit_entries(&env);
    let svc = describe(&env, "alias/sealfs/service")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let expect = [
        ("CreateKey", Some(a.as_str()), "ok"),
        ("DescribeKey", Some(a.as_str()), "ok"),
        ("ListKeys", None, "ok"),
        ("DisableKey", Some(a.as_str()), "ok"),
        ("EnableKey", Some(a.as_str()), "ok"),
        ("RotateKey", Some(a.as_str()), "ok"),
        ("EnableKeyRotation", Some(a.as_str()), "ok"),
        ("DisableKeyRotation", Some(a.as_str()), "ok"),
        ("CreateAlias", Some(a.as_str()), "ok"),
        ("DeleteAlias", Some(a.as_str()), "ok"),
        ("CreateKey", Some(x.as_str()), "ok"),
        ("ImportKeyMaterial", Some(x.as_str()), "ok"),
        ("DeleteImportedKeyMaterial", Some(x.as_str()), "ok"),
        ("GenerateDataKey", Some(a.as_str()), "ok"),
        ("GenerateDataKey", Some(svc.as_str()), "ok"),
        ("Decrypt", Some(a.as_str()), "ok"),
        ("Decrypt", Some(svc.as_str()), "ok"),
        ("ReEncrypt", Some(b.as_str()), "ok"),
        ("Decrypt", Some(b.as_str()), "denied"),
        ("Decrypt", Some(b.as_str()), "ok"),
        ("ScheduleKeyDeletion", Some(x.as_str()), "ok"),
        ("CancelKeyDeletion", Some(x.as_str()), "ok"),
        ("DestroyKey", Some(x.as_str()), "ok"),
        ("DisableKey", Some(svc.as_str()), "denied"),
        ("DescribeKey", None, "error"),
        ("ChangeSecret", None, "ok"),
        ("RestoreBackup", None, "ok"),
    ];
    for (op, key, result) in expect {
        let e = expect_entry(&entries, op, key, result);
        assert_eq!(e["caller"]["uid"].as_u64(), Some(uid), "{e}");
        let cmd = e["caller"]["command"].as_str().unwrap();
        assert!(cmd.starts_with("sealfs"), "{e}");
        assert!(e["caller"]["pid"].as_u64().unwrap() > 0, "{e}");
        assert!(e["mac"].as_str().unwrap().len() == 64, "{e}");
    }
    // Details.
    let e = expect_entry(&entries, "RotateKey", Some(&a), "ok");
    assert_eq!(e["key_version"], 2);
    assert_eq!(e["caller"]["command"], "sealfs key rotate");
    let e = expect_entry(&entries, "GenerateDataKey", Some(&a), "ok");
    assert_eq!(e["volume"], vid.as_str());
    assert_eq!(e["context"]["volume"], vid.as_str());
    assert_eq!(e["context"]["purpose"], "content");
    assert_eq!(e["caller"]["command"], "sealfs create");
    let e = expect_entry(&entries, "ReEncrypt", Some(&b), "ok");
    assert_eq!(e["volume"], vid.as_str());
    assert_eq!(e["caller"]["command"], "sealfs rewrap");
    let e = expect_entry(&entries, "Decrypt", Some(&b), "denied");
    assert_eq!(e["volume"], vid.as_str());
    assert_eq!(e["caller"]["command"], "sealfs mount");
    assert!(e["detail"].as_str().unwrap().contains("Disabled"), "{e}");
    let e = expect_entry(&entries, "DisableKey", Some(&svc), "denied");
    assert!(
        e["detail"].as_str().unwrap().contains("managed by sealfs"),
        "{e}"
    );
    let e = expect_entry(&entries, "DestroyKey", Some(&x), "ok");
    assert_eq!(e["time"].as_u64().unwrap(), t0 + 8 * DAY);
    let e = expect_entry(&entries, "ImportKeyMaterial", Some(&x), "ok");
    assert_eq!(e["key_version"], 1);
    // No secret paths in the caller.
    for e in &entries {
        let cmd = e["caller"]["command"].as_str().unwrap();
        assert!(!cmd.contains('/') && !cmd.contains("k2"), "{e}");
    }
    // seq runs 1..=n, each entry chains to the one before.
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "{e}");
        if i > 0 {
            assert_eq!(e["prev"], entries[i - 1]["mac"], "{e}");
        }
    }

    // `key audit` prints the same entries; filters work.
    let out = env.sealfs(&["key", "audit", "--json"]);
    let lines: Vec<Value> = ok(&out, "audit --json")
        .lines()
        .map(|l| parse_json(l, "audit --json"))
        .collect();
    assert!(lines.len() >= entries.len());
    let out = env.sealfs(&["key", "audit", "--json", "--key", "alias/audited"]);
    let mine: Vec<Value> = ok(&out, "audit --key")
        .lines()
        .map(|l| parse_json(l, "audit --json"))
        .collect();
    assert!(mine.len() >= 10, "{mine:?}");
    assert!(mine.iter().all(|e| e["key_id"] == a.as_str()));
    let out = env.sealfs(&[
        "key",
        "audit",
        "--json",
        "--since",
        &(t0 + 8 * DAY).to_string(),
    ]);
    let late: Vec<Value> = ok(&out, "audit --since")
        .lines()
        .map(|l| parse_json(l, "audit --json"))
        .collect();
    assert!(late.iter().any(|e| e["op"] == "DestroyKey"));
    assert!(late
        .iter()
        .all(|e| e["time"].as_u64().unwrap() >= t0 + 8 * DAY));
    let out = env.sealfs(&["key", "audit"]);
    let text = ok(&out, "audit");
    for op in ["CreateKey", "DestroyKey", "ReEncrypt", "RestoreBackup"] {
        assert!(text.contains(op), "text audit lacks {op}");
    }
    let out = env.sealfs(&["key", "audit", "--verify"]);
    assert!(ok(&out, "verify").contains("intact"));
}

// ----- 8. tampering ------------------------------------------------------

#[test]
fn audit_tampering_detected() {
    let env = Env::new();
    for i in 0..4 {
        let k = create_key(&env, &["--alias", &format!("t{i}")]);
        describe(&env, &k);
        ok(&env.sealfs(&["key", "disable", &k]), "disable");
    }
    // The newest entries were saved with the keystore (disable saves).
    let path = audit_path(&env);
    let orig = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = orig.lines().collect();
    let n = lines.len();
    assert!(n >= 14, "{n} entries");
    let verify = || env.sealfs(&["key", "audit", "--verify"]);
    let out = verify();
    assert!(
        ok(&out, "verify").contains(&format!("intact: {n} entries")),
        "{}",
        stdout(&out)
    );
    let join = |v: &[&str]| v.join("\n") + "\n";

    // an edited field in a middle line
    let mid = n / 2;
    let line = lines[mid - 1];
    let v = parse_json(line, "line");
    let edited = if v["result"] == "ok" {
        line.replacen("\"result\":\"ok\"", "\"result\":\"denied\"", 1)
    } else {
        line.replacen(
            &format!("\"result\":{}", v["result"]),
            "\"result\":\"ok\"",
            1,
        )
    };
    assert_ne!(edited, line);
    let mut v2 = lines.clone();
    v2[mid - 1] = &edited;
    std::fs::write(&path, join(&v2)).unwrap();
    let out = verify();
    assert_failed(
        &out,
        &[&format!("line {mid} (entry {mid})"), "edited"],
        "edited entry",
    );
    // a changed time, keeping the JSON valid
    let t = v["time"].as_u64().unwrap();
    let edited = line.replacen(&format!("\"time\":{t}"), &format!("\"time\":{}", t - 1), 1);
    assert_ne!(edited, line);
    v2[mid - 1] = &edited;
    std::fs::write(&path, join(&v2)).unwrap();
    assert_failed(&verify(), &[&format!("line {mid} ")], "edited time");

    std::fs::write(&path, &orig).unwrap();
    ok(&verify(), "restored");

    // a removed line
    let mut v3 = lines.clone();
    v3.remove(mid - 1);
    std::fs::write(&path, join(&v3)).unwrap();
    assert_failed(&verify(), &[&format!("line {mid} ")], "removed entry");

    // two lines swapped
    let mut v4 = lines.clone();
    v4.swap(mid - 1, mid);
    std::fs::write(&path, join(&v4)).unwrap();
    assert_failed(&verify(), &[&format!("line {mid} ")], "swapped entries");

    // the tail cut off
    std::fs::write(&path, join(&lines[..n - 2])).unwrap();
    assert_failed(&verify(), &["cut off"], "truncated log");
    std::fs::write(&path, join(&lines[..n - 1])).unwrap();
    assert_failed(&verify(), &["cut off"], "last entry cut off");

    // the log deleted
    std::fs::remove_file(&path).unwrap();
    assert_failed(&verify(), &["missing"], "deleted log");

    // a forged entry appended (valid JSON, wrong MAC)
    let mut forged = parse_json(lines[n - 1], "last");
    forged["seq"] = Value::from(n as u64 + 1);
    forged["prev"] = forged["mac"].clone();
    forged["op"] = Value::from("EnableKey");
    let mut v5: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    v5.push(forged.to_string());
    std::fs::write(&path, v5.join("\n") + "\n").unwrap();
    assert_failed(
        &verify(),
        &[&format!("line {} ", n + 1), "edited"],
        "forged entry",
    );

    std::fs::write(&path, &orig).unwrap();
    let out = verify();
    assert!(ok(&out, "original again").contains(&format!("intact: {n} entries")));
    // and the chain goes on from there
    ok(&env.sealfs(&["key", "enable", "alias/t0"]), "enable");
    let out = verify();
    assert!(
        ok(&out, "after more").contains("intact:"),
        "{}",
        stdout(&out)
    );

    // entries of read-only operations, appended after the keystore's last
    // save, cut off the end: the head file still names the newest one
    let saved = std::fs::read_to_string(&path).unwrap();
    describe(&env, "alias/t1");
    describe(&env, "alias/t2");
    let longer = std::fs::read_to_string(&path).unwrap();
    assert_eq!(longer.lines().count(), saved.lines().count() + 2);
    std::fs::write(&path, &saved).unwrap();
    assert_failed(
        &verify(),
        &["cut off", "head file"],
        "read-only entries cut off",
    );
    // and the head file removed as well
    let head = std::fs::read(audit_path(&env).with_extension("audit-head")).unwrap();
    std::fs::remove_file(audit_path(&env).with_extension("audit-head")).unwrap();
    std::fs::write(&path, &longer).unwrap();
    assert_failed(&verify(), &["audit-head is missing"], "head file removed");
    std::fs::write(audit_path(&env).with_extension("audit-head"), &head).unwrap();
    ok(&verify(), "head file back");
}

// ----- 9. no audit noise from mounts --------------------------------------

#[test]
fn audit_log_stays_small() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let before = audit_len(&env);
    let m = env.mount(&store, "mnt", &[]);
    let start = Instant::now();
    for d in 0..10 {
        let dir = m.path(&format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..1000 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}\n")).unwrap();
        }
    }
    // Let the key watcher run several times (every 2 s) while mounted.
    let min = Duration::from_secs(7);
    if start.elapsed() < min {
        std::thread::sleep(min - start.elapsed());
    }
    assert_eq!(std::fs::read_dir(m.path("d7")).unwrap().count(), 1000);
    assert_eq!(std::fs::read(m.path("d3/f999")).unwrap(), b"3/999\n");
    eprintln!("10,000 files in {:?}", start.elapsed());
    m.unmount();
    let entries = audit_entries(&env);
    let new = &entries[before..];
    assert!(
        new.len() <= 10,
        "{} new audit entries for one mount: {:?}",
        new.len(),
        new.iter().map(|e| e["op"].clone()).collect::<Vec<_>>()
    );
    assert!(
        new.iter().any(|e| e["op"] == "Decrypt"),
        "the mount's unwrap was not audited"
    );
    let out = env.sealfs(&["key", "audit", "--verify"]);
    ok(&out, "verify");
}

// ----- 10. bad input ------------------------------------------------------

#[test]
fn bad_input_errors() {
    let env = Env::new();
    let a = describe(&env, "alias/test")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = create_key(&env, &["--alias", "bee"]);

    // A refused command: non-zero, message, keystore file unchanged.
    let check = |args: &[&str], needles: &[&str]| {
        let bytes = keystore_bytes(&env);
        let out = env.sealfs(args);
        assert_failed(&out, needles, &args.join(" "));
        assert!(
            keystore_bytes(&env) == bytes,
            "{}: changed the keystore",
            args.join(" ")
        );
    };

    check(&["key", "describe", "nope"], &["no key matches 'nope'"]);
    check(&["key", "enable", "alias/nope"], &["no key matches"]);
    check(
        &["key", "disable", "00000000-0000-0000-0000-000000000000"],
        &["no key matches"],
    );
    check(&["key", "alias", "delete", "nope"], &["no key matches"]);
    check(&["key", "audit", "--key", "nope"], &["no key matches"]);
    let store = env.path("store");
    check(
        &["create", s(&store), "--kms-key", "nope"],
        &["no key matches"],
    );
    assert!(!store.exists());

    // aliases
    check(
        &["key", "alias", "create", "test", &b],
        &["alias/test", "already in use"],
    );
    check(
        &["key", "alias", "create", "alias/bee", &a],
        &["already in use"],
    );
    check(&["key", "create", "--alias", "bee"], &["already in use"]);
    check(
        &["key", "create", "--alias", "x", "--alias", "x"],
        &["already in use"],
    );
    check(
        &["key", "create", "--alias", "bad alias!"],
        &["invalid alias"],
    );
    check(
        &["key", "alias", "create", "sealfs/mine", &b],
        &["invalid alias", "reserved"],
    );
    check(
        &["key", "alias", "create", "other", "alias/sealfs/default"],
        &["managed by sealfs"],
    );
    check(
        &["key", "alias", "delete", "alias/sealfs/service"],
        &["managed by sealfs"],
    );
    check(
        &["key", "rotation", "enable", &b, "--period", "0"],
        &["out of range"],
    );
    check(
        &["key", "schedule-deletion", &b, "--pending-days", "3"],
        &["out of range"],
    );

    // An alias spelled like another key's id makes that name ambiguous.
    ok(
        &env.sealfs(&["key", "alias", "create", &a, &b]),
        "alias = id of a",
    );
    for args in [
        vec!["key", "describe", a.as_str()],
        vec!["key", "disable", a.as_str()],
        vec![
            "key",
            "schedule-deletion",
            a.as_str(),
            "--pending-days",
            "7",
        ],
    ] {
        check(&args, &["ambiguous", &a, &b]);
    }
    check(&["create", s(&store), "--kms-key", &a], &["ambiguous"]);
    assert!(!store.exists());
    // alias/NAME is not ambiguous
    assert_eq!(describe(&env, &format!("alias/{a}"))["id"], b.as_str());
    ok(
        &env.sealfs(&["key", "alias", "delete", &a]),
        "drop that alias",
    );
    assert_eq!(describe(&env, &a)["id"], a.as_str());

    // A disabled key cannot protect a new store; nothing is left behind.
    ok(&env.sealfs(&["key", "disable", "alias/bee"]), "disable");
    check(
        &["create", s(&store), "--kms-key", "alias/bee"],
        &["Disabled", &b],
    );
    assert!(!store.exists(), "a refused create left the store directory");
    std::fs::create_dir(&store).unwrap();
    check(
        &["create", s(&store), "--kms-key", "alias/bee"],
        &["Disabled"],
    );
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    check(
        &["rewrap", s(&env.path("none")), "--kms-key", "alias/bee"],
        &[],
    );

    // Service keys.
    for (args, needles) in [
        (
            vec!["key", "disable", "alias/sealfs/service"],
            vec!["managed by sealfs"],
        ),
        (
            vec!["key", "disable", "alias/sealfs/default"],
            vec!["managed by sealfs"],
        ),
        (
            vec![
                "key",
                "schedule-deletion",
                "alias/sealfs/service",
                "--pending-days",
                "7",
            ],
            vec!["managed by sealfs"],
        ),
        (
            vec!["key", "enable", "alias/sealfs/default"],
            vec!["managed by sealfs"],
        ),
        (
            vec!["key", "rotation", "disable", "alias/sealfs/service"],
            vec!["managed by sealfs"],
        ),
    ] {
        check(&args, &needles);
    }
    let mat = env.path("m.bin");
    std::fs::write(&mat, [9u8; 32]).unwrap();
    check(
        &[
            "key",
            "import",
            "alias/sealfs/default",
            "--material",
            s(&mat),
        ],
        &["managed by sealfs"],
    );
    // Material for a generated key.
    check(
        &["key", "import", "alias/test", "--material", s(&mat)],
        &["--origin external"],
    );
    check(&["key", "delete-material", "alias/test"], &["generated"]);
    check(
        &["key", "rotate", "alias/test", "--material", s(&mat)],
        &["generated"],
    );
    let missing = env.path("missing.bin");
    check(
        &["key", "import", "alias/test", "--material", s(&missing)],
        &["cannot read"],
    );
    for svc in ["alias/sealfs/service", "alias/sealfs/default"] {
        assert_eq!(state_of(&env, svc), "Enabled");
    }
    // The log recorded the refusals, and is intact.
    let entries = audit_entries(&env);
    assert!(find_entry(&entries, "DisableKey", None, "denied").is_some());
    ok(&env.sealfs(&["key", "audit", "--verify"]), "verify");
}

// ----- 11. keystore secret ------------------------------------------------

/// A sealfs command that unlocks the keystore with this passphrase file.
fn with_pass(env: &Env, pass: &Path) -> Command {
    let mut c = env.cmd();
    c.env_remove("SEALFS_KEY_FILE")
        .env("SEALFS_PASSPHRASE_FILE", pass);
    c
}

/// A sealfs command that unlocks the keystore with this key file.
fn with_key(env: &Env, key: &Path) -> Command {
    let mut c = env.cmd();
    c.env("SEALFS_KEY_FILE", key);
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args).output().unwrap()
}

/// The aliases of all keys, via this command (which must unlock).
fn aliases(c: Command) -> Vec<String> {
    let out = run(c, &["key", "alias", "list", "--json"]);
    let v = parse_json(&ok(&out, "alias list"), "alias list");
    let mut a: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["alias"].as_str().unwrap().to_string())
        .collect();
    a.sort();
    a
}

#[test]
fn change_passphrase_and_restore_backup() {
    let env = Env::new();
    let k1 = env.key_file();
    let p1 = env.path("p1.pass");
    let p2 = env.path("p2.pass");
    let k2 = env.path("k2.key");
    write_private(&p1, "first passphrase\n");
    write_private(&p2, "second passphrase\n");
    let want = {
        let mut v = vec![
            "alias/sealfs/default".to_string(),
            "alias/sealfs/service".into(),
            "alias/test".into(),
        ];
        v.sort();
        v
    };
    assert_eq!(aliases(with_key(&env, &k1)), want);

    // key file -> passphrase
    let out = run(
        with_key(&env, &k1),
        &["key", "change-passphrase", "--new-passphrase-file", s(&p1)],
    );
    ok(&out, "to passphrase");
    let bak = env.path("keystore.bak");
    assert!(bak.exists());
    assert_failed(
        &run(with_key(&env, &k1), &["key", "list"]),
        &["passphrase"],
        "old key file",
    );
    assert_eq!(aliases(with_pass(&env, &p1)), want);

    // passphrase -> another passphrase
    let out = run(
        with_pass(&env, &p1),
        &["key", "change-passphrase", "--new-passphrase-file", s(&p2)],
    );
    ok(&out, "to passphrase 2");
    assert_failed(
        &run(with_pass(&env, &p1), &["key", "list"]),
        &["wrong passphrase or key file"],
        "old passphrase",
    );
    assert_eq!(aliases(with_pass(&env, &p2)), want);

    // passphrase -> a new key file
    let out = run(
        with_pass(&env, &p2),
        &[
            "key",
            "change-passphrase",
            "--new-key-file",
            s(&k2),
            "--generate",
        ],
    );
    ok(&out, "to key file");
    assert_eq!(std::fs::read(&k2).unwrap().len(), 32);
    assert_failed(
        &run(with_pass(&env, &p2), &["key", "list"]),
        &["key file"],
        "old passphrase after switching to a key file",
    );
    assert_failed(
        &run(with_key(&env, &k1), &["key", "list"]),
        &["wrong passphrase or key file"],
        "the first key file",
    );
    assert_eq!(aliases(with_key(&env, &k2)), want);
    // --new-key-file --generate never overwrites
    let before = keystore_bytes(&env);
    assert_failed(
        &run(
            with_key(&env, &k2),
            &[
                "key",
                "change-passphrase",
                "--new-key-file",
                s(&k2),
                "--generate",
            ],
        ),
        &["k2.key"],
        "generate over an existing key file",
    );
    assert!(keystore_bytes(&env) == before);
    assert_eq!(aliases(with_key(&env, &k2)), want);

    // A change after the switch, then restore the backup (sealed with p2).
    ok(
        &run(with_key(&env, &k2), &["key", "create", "--alias", "late"]),
        "key create",
    );
    let mut with_late = want.clone();
    with_late.push("alias/late".into());
    with_late.sort();
    assert_eq!(aliases(with_key(&env, &k2)), with_late);
    let bak_before = std::fs::read(&bak).unwrap();
    let current = keystore_bytes(&env);
    // the backup is the k2 version before `late`: restoring needs k2
    assert_failed(
        &run(with_pass(&env, &p2), &["key", "restore-backup"]),
        &["keystore.bak", "key file"],
        "restore with the wrong kind of secret",
    );
    assert_failed(
        &run(with_key(&env, &k1), &["key", "restore-backup"]),
        &["does not open with this secret"],
        "restore with the wrong key file",
    );
    assert!(keystore_bytes(&env) == current && std::fs::read(&bak).unwrap() == bak_before);
    ok(
        &run(with_key(&env, &k2), &["key", "restore-backup"]),
        "restore-backup",
    );
    assert_eq!(aliases(with_key(&env, &k2)), want, "late is still there");
    // The replaced version is the backup now: restoring again brings it back.
    assert!(std::fs::read(&bak).unwrap() == current);
    ok(
        &run(with_key(&env, &k2), &["key", "restore-backup"]),
        "restore-backup again",
    );
    assert_eq!(aliases(with_key(&env, &k2)), with_late);

    // Back to the previous passphrase version: change to p2, then restore
    // the k2 version with k2.
    ok(
        &run(
            with_key(&env, &k2),
            &["key", "change-passphrase", "--new-passphrase-file", s(&p2)],
        ),
        "to passphrase again",
    );
    assert_failed(
        &run(with_key(&env, &k2), &["key", "list"]),
        &["passphrase"],
        "k2 after switching to p2",
    );
    ok(
        &run(with_key(&env, &k2), &["key", "restore-backup"]),
        "restore the key-file version",
    );
    assert_eq!(aliases(with_key(&env, &k2)), with_late);
    assert_failed(
        &run(with_pass(&env, &p2), &["key", "list"]),
        &["key file"],
        "p2 after restoring the key-file version",
    );

    // The audit log survived every re-seal and is intact.
    let out = run(with_key(&env, &k2), &["key", "audit", "--verify"]);
    ok(&out, "verify");
    let entries = audit_entries(&env);
    assert_eq!(
        entries.iter().filter(|e| e["op"] == "ChangeSecret").count(),
        4
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["op"] == "RestoreBackup" && e["result"] == "ok")
            .count(),
        3
    );
}
