//! Custom key stores in a PKCS#11 token, against the real SoftHSM2 module:
//! key-store records and their bad input, keys generated in the token,
//! volumes protected by them (real FUSE mounts), rotation and rewrap, the
//! Unavailable state (disconnected, token gone, PIN changed) on a live
//! mount, destruction of token objects on deletion, and the audit log.
//!
//! Each test has its own SoftHSM2 configuration (`SOFTHSM2_CONF`) and token
//! directory. Without SoftHSM2 the tests skip, except with CI=true, where
//! they fail.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const EACCES: i32 = 13;
const REVOCATION_BOUND: Duration = Duration::from_secs(5);
// (not hex, so that it cannot turn up by chance in a MAC or a key id)
const PIN: &str = "pin-Zk8wQ3";
const SO_PIN: &str = "123456";

/// True if SoftHSM2 and pkcs11-tool are here. Panics when CI=true and
/// they are not.
fn require_softhsm() -> bool {
    let ok = Path::new(MODULE).is_file()
        && Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        && Command::new("pkcs11-tool").arg("--help").output().is_ok();
    if !ok {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("CI=true but SoftHSM2 ({MODULE}, softhsm2-util) or pkcs11-tool is missing: run scripts/deps.sh");
        }
        eprintln!("skipping: SoftHSM2 is not installed (scripts/deps.sh installs it)");
    }
    ok
}

/// A sealfs environment with its own SoftHSM2 token directory and a token
/// labelled `sealfs`.
struct Hsm {
    env: Env,
    conf: PathBuf,
    tokens: PathBuf,
    pin_file: PathBuf,
}

impl Hsm {
    fn new() -> Hsm {
        let env = Env::new();
        let tokens = env.path("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = env.path("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let h = Hsm {
            pin_file: env.path("hsm1.pin"),
            env,
            conf,
            tokens,
        };
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &h.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                "sealfs",
                "--so-pin",
                SO_PIN,
                "--pin",
                PIN,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "init-token: {}", stderr(&out));
        write_private(&h.pin_file, format!("{PIN}\n"));
        h
    }

    fn cmd(&self) -> Command {
        let mut c = self.env.cmd();
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn run_at(&self, at: u64, args: &[&str]) -> Output {
        self.cmd()
            .env("SEALFS_KMS_NOW", at.to_string())
            .args(args)
            .output()
            .unwrap()
    }

    fn create_store_hsm1(&self) {
        ok(
            &self.run(&[
                "key-store",
                "create",
                "hsm1",
                "--pkcs11-module",
                MODULE,
                "--token-label",
                "sealfs",
                "--pin-file",
                s(&self.pin_file),
            ]),
            "key-store create",
        );
    }

    /// `pkcs11-tool --list-objects`: labels of the token's secret keys.
    fn token_objects(&self, pin: &str) -> Vec<String> {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--module",
                MODULE,
                "--token-label",
                "sealfs",
                "--login",
                "--pin",
                pin,
                "--list-objects",
                "--type",
                "secrkey",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "pkcs11-tool: {}", stderr(&out));
        stdout(&out)
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("label:")
                    .map(|x| x.trim().to_string())
            })
            .collect()
    }

    fn change_pin(&self, old: &str, new: &str) {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--module",
                MODULE,
                "--token-label",
                "sealfs",
                "--login",
                "--pin",
                old,
                "--change-pin",
                "--new-pin",
                new,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "change-pin: {}", stderr(&out));
    }

    fn describe(&self, key: &str) -> Value {
        let out = self.run(&["key", "describe", key, "--json"]);
        serde_json::from_str(&ok(&out, "describe")).unwrap()
    }

    fn store_json(&self, name: &str) -> Value {
        let out = self.run(&["key-store", "describe", name, "--json"]);
        serde_json::from_str(&ok(&out, "key-store describe")).unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.env.path("keystore.audit"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Mount in the foreground with this SoftHSM2 configuration.
    fn mount(&self, store: &Path, name: &str) -> Mount {
        let mp = self.env.path(name);
        std::fs::create_dir_all(&mp).unwrap();
        let log = self.env.path(&format!("{name}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut c = self.cmd();
        c.arg("mount")
            .arg("-f")
            .arg(store)
            .arg(&mp)
            .stdout(Stdio::null())
            .stderr(logf);
        let mut child = c.spawn().unwrap();
        let t = Instant::now();
        while !is_mounted(&mp) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "mount exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(t.elapsed() < Duration::from_secs(30), "mount not live");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mount {
            mountpoint: mp,
            child: Some(child),
            log,
        }
    }

    fn mount_refused(&self, store: &Path, name: &str) -> Output {
        let mp = self.env.path(name);
        std::fs::create_dir_all(&mp).unwrap();
        let mut c = self.cmd();
        c.arg("mount").arg("-f").arg(store).arg(&mp);
        let out = run_expect_exit(c, &mp);
        assert!(!out.status.success(), "mount succeeded: {}", stderr(&out));
        assert!(!is_mounted(&mp));
        out
    }
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn has_entry(entries: &[Value], op: &str, result: &str, detail_has: &str) -> bool {
    entries.iter().any(|e| {
        e["op"] == op
            && e["result"] == result
            && e["detail"].as_str().unwrap_or("").contains(detail_has)
    })
}

fn assert_entry(entries: &[Value], op: &str, result: &str, detail_has: &str) {
    assert!(
        has_entry(entries, op, result, detail_has),
        "no audit entry {op} {result} with '{detail_has}':\n{}",
        entries
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// No PIN in anything sealfs wrote or printed.
fn assert_no_pin(h: &Hsm, texts: &[&str]) {
    let audit = std::fs::read_to_string(h.env.path("keystore.audit")).unwrap_or_default();
    for t in texts.iter().copied().chain([audit.as_str()]) {
        assert!(!t.contains(PIN), "the PIN appears in: {t}");
    }
}

/// A refused command: fails with all `needles` in stderr and leaves the
/// keystore file unchanged.
fn refused_unchanged(h: &Hsm, args: &[&str], needles: &[&str]) {
    let before = std::fs::read(h.env.keystore()).unwrap();
    let out = h.run(args);
    assert_failed(&out, needles, &args.join(" "));
    assert_no_pin(h, &[&stderr(&out), &stdout(&out)]);
    assert!(
        std::fs::read(h.env.keystore()).unwrap() == before,
        "{}: the refused command changed the keystore",
        args.join(" ")
    );
}

#[test]
fn key_stores_keys_unavailable_and_destruction() {
    if !require_softhsm() {
        return;
    }
    let h = Hsm::new();
    let pin = s(&h.pin_file).to_string();
    let create = |name: &str, module: &str, label: &str, pin: &str| -> Vec<String> {
        [
            "key-store",
            "create",
            name,
            "--pkcs11-module",
            module,
            "--token-label",
            label,
            "--pin-file",
            pin,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };

    // --- bad input: clear errors, nothing changed
    let v = create("hsm1", "/nonexistent/libpkcs11.so", "sealfs", &pin);
    refused_unchanged(
        &h,
        &args(&v),
        &["/nonexistent/libpkcs11.so", "does not exist"],
    );
    let v = create("hsm1", MODULE, "no-such-token", &pin);
    refused_unchanged(&h, &args(&v), &["no token labelled 'no-such-token'"]);
    let wrong = h.env.path("wrong.pin");
    write_private(&wrong, "pin-Wrong1\n");
    let v = create("hsm1", MODULE, "sealfs", s(&wrong));
    refused_unchanged(&h, &args(&v), &["wrong PIN", "wrong.pin"]);
    let open_pin = h.env.path("open.pin");
    std::fs::write(&open_pin, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(
        &open_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let v = create("hsm1", MODULE, "sealfs", s(&open_pin));
    refused_unchanged(
        &h,
        &args(&v),
        &["accessible by group or others", "chmod 600"],
    );
    refused_unchanged(
        &h,
        &["key", "create", "--alias", "x", "--key-store", "nope"],
        &["no key store 'nope'"],
    );
    refused_unchanged(
        &h,
        &["key-store", "connect", "nope"],
        &["no key store 'nope'"],
    );
    let out = h.run(&["key-store", "list", "--json"]);
    assert_eq!(ok(&out, "list").trim(), "[]");

    // --- create, list, describe
    h.create_store_hsm1();
    let v = create("hsm1", MODULE, "sealfs", &pin);
    refused_unchanged(&h, &args(&v), &["already exists"]);
    let st = h.store_json("hsm1");
    assert_eq!(st["connection_state"], "Connected", "{st}");
    assert_eq!(st["available"], true, "{st}");
    assert_eq!(st["token_label"], "sealfs");

    // --- a key generated in the token
    let out = h.run(&["key", "create", "--alias", "db", "--key-store", "hsm1"]);
    let id = ok(&out, "key create --key-store").trim().to_string();
    let d = h.describe("alias/db");
    assert_eq!(d["origin"], "Hsm", "{d}");
    assert_eq!(d["key_store"], "hsm1", "{d}");
    assert_eq!(d["state"], "Enabled", "{d}");
    let label = d["versions"][0]["token_object_label"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(label.contains(&id), "{label}");
    let text = ok(&h.run(&["key", "describe", "alias/db"]), "describe");
    assert!(text.contains("Origin:       HSM (hsm1)"), "{text}");
    assert!(text.contains(&label), "{text}");
    assert_eq!(h.token_objects(PIN), vec![label.clone()]);
    // the object is sensitive and not extractable
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &h.conf)
        .args([
            "--module",
            MODULE,
            "--token-label",
            "sealfs",
            "--login",
            "--pin",
            PIN,
            "--list-objects",
            "--type",
            "secrkey",
        ])
        .output()
        .unwrap();
    let listing = stdout(&out);
    assert!(
        listing.contains("sensitive") && listing.contains("never extractable"),
        "{listing}"
    );

    // --- delete refused while the key lives
    refused_unchanged(
        &h,
        &["key-store", "delete", "hsm1"],
        &["still holds keys", "alias/db"],
    );

    // --- disconnected: Unavailable with the reason
    ok(&h.run(&["key-store", "disconnect", "hsm1"]), "disconnect");
    let d = h.describe("alias/db");
    assert_eq!(d["state"], "Unavailable", "{d}");
    assert!(
        d["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("disconnected"),
        "{d}"
    );
    let list = ok(&h.run(&["key", "list"]), "list");
    assert!(
        list.contains("Unavailable") && list.contains("disconnected"),
        "{list}"
    );
    let st = h.store_json("hsm1");
    assert_eq!(st["connection_state"], "Disconnected", "{st}");
    assert!(
        st["keys"][0].as_str().unwrap().contains("(Unavailable)"),
        "{st}"
    );
    ok(&h.run(&["key-store", "connect", "hsm1"]), "connect");
    assert_eq!(h.describe("alias/db")["state"], "Enabled");

    // --- the token gone (its directory moved away)
    let moved = h.env.path("tokens-away");
    std::fs::rename(&h.tokens, &moved).unwrap();
    let d = h.describe("alias/db");
    assert_eq!(d["state"], "Unavailable", "{d}");
    // SoftHSM2 refuses to initialise without its token directory
    let why = d["unavailable_reason"].as_str().unwrap();
    assert!(
        why.contains("cannot be used")
            && (why.contains("no token labelled 'sealfs'") || why.contains("token directory")),
        "{why}"
    );
    let st = h.store_json("hsm1");
    assert_eq!(st["available"], false, "{st}");
    let out = h.run(&["key-store", "connect", "hsm1"]);
    assert_failed(
        &out,
        &["cannot connect key store hsm1"],
        "connect without token",
    );
    std::fs::rename(&moved, &h.tokens).unwrap();
    assert_eq!(h.describe("alias/db")["state"], "Enabled");

    // --- the PIN changed in the token: the PIN file is wrong now
    h.change_pin(PIN, "pin-Yx2vR7");
    let d = h.describe("alias/db");
    assert_eq!(d["state"], "Unavailable", "{d}");
    assert!(
        d["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("wrong PIN"),
        "{d}"
    );
    write_private(&h.pin_file, "pin-Yx2vR7\n");
    assert_eq!(h.describe("alias/db")["state"], "Enabled");
    h.change_pin("pin-Yx2vR7", PIN);
    write_private(&h.pin_file, format!("{PIN}\n"));

    // --- rotation makes a new token object
    let out = ok(&h.run(&["key", "rotate", "alias/db"]), "rotate");
    assert!(out.contains("v2"), "{out}");
    let d = h.describe("alias/db");
    let label2 = d["versions"][1]["token_object_label"]
        .as_str()
        .unwrap()
        .to_string();
    let mut objs = h.token_objects(PIN);
    objs.sort();
    let mut want = vec![label.clone(), label2.clone()];
    want.sort();
    assert_eq!(objs, want);
    refused_unchanged(
        &h,
        &["key", "rotation", "enable", "alias/db", "--period", "30"],
        &["rotates on demand"],
    );

    // --- scheduled deletion destroys the token objects when due
    ok(
        &h.run(&[
            "key",
            "schedule-deletion",
            "alias/db",
            "--pending-days",
            "7",
        ]),
        "schedule-deletion",
    );
    assert_eq!(
        h.token_objects(PIN).len(),
        2,
        "not destroyed before it is due"
    );
    let later = now_secs() + 8 * 86_400;
    let out = h.run_at(later, &["key", "describe", &id, "--json"]);
    let d: Value = serde_json::from_str(&ok(&out, "describe later")).unwrap();
    assert_eq!(d["state"], "Deleted", "{d}");
    assert_eq!(
        d["versions"][0]["material"], "destroyed in the token",
        "{d}"
    );
    assert!(
        h.token_objects(PIN).is_empty(),
        "token objects left: {:?}",
        h.token_objects(PIN)
    );
    let a = h.audit();
    assert_entry(&a, "DestroyTokenObject", "ok", &label);
    assert_entry(&a, "DestroyTokenObject", "ok", &label2);

    // --- now the key store can be deleted
    ok(&h.run_at(later, &["key-store", "delete", "hsm1"]), "delete");
    let out = h.run_at(later, &["key-store", "list", "--json"]);
    assert_eq!(ok(&out, "list").trim(), "[]");

    // --- audit: each operation and failure
    let a = h.audit();
    assert_entry(&a, "CreateKeyStore", "error", "does not exist");
    assert_entry(&a, "CreateKeyStore", "error", "wrong PIN");
    assert_entry(&a, "CreateKeyStore", "error", "no token labelled");
    assert_entry(
        &a,
        "CreateKeyStore",
        "error",
        "accessible by group or others",
    );
    assert_entry(&a, "CreateKeyStore", "ok", "token 'sealfs'");
    assert_entry(&a, "CreateKey", "ok", "origin Hsm");
    assert_entry(&a, "CreateKey", "denied", "no key store 'nope'");
    assert_entry(&a, "DisconnectKeyStore", "ok", "hsm1");
    assert_entry(&a, "ConnectKeyStore", "ok", "hsm1");
    assert_entry(
        &a,
        "ConnectKeyStore",
        "error",
        "cannot connect key store hsm1",
    );
    assert_entry(&a, "DeleteKeyStore", "error", "still holds keys");
    assert_entry(&a, "DeleteKeyStore", "ok", "hsm1");
    assert_entry(&a, "DescribeKeyStores", "ok", "hsm1: unavailable");
    assert_no_pin(&h, &[]);
    ok(
        &h.run_at(later, &["key", "audit", "--verify"]),
        "audit verifies",
    );
}

/// Through the library: the token's AES-GCM binds the encryption context
/// (and key id and version) like software wrapping; a modified wrapped key
/// or another context is refused; errors carry no PIN.
#[test]
fn token_wrapping_binds_the_context() {
    use sealfs::crypto::Key32;
    use sealfs::kms::{volume_context, Keystore, KeystoreSecret, KmsError};
    if !require_softhsm() {
        return;
    }
    let h = Hsm::new();
    h.create_store_hsm1();
    ok(
        &h.run(&["key", "create", "--alias", "db", "--key-store", "hsm1"]),
        "key create",
    );
    // the only in-process PKCS#11 user of this test binary
    std::env::set_var("SOFTHSM2_CONF", &h.conf);
    let secret = KeystoreSecret::from_key_file(&h.env.key_file()).unwrap();
    let ks = Keystore::open(&h.env.keystore(), &secret, false).unwrap();
    let dk = Key32::random();
    let ctx = volume_context("00112233445566778899aabbccddeeff", "content");
    let w = ks.wrap("alias/db", &ctx, &dk).unwrap();
    assert_eq!(w.sealed.len(), 12 + 32 + 16);
    assert!(ks.unwrap(&w, &ctx).unwrap().ct_eq(&dk));
    for other in [
        volume_context("ffeeddccbbaa99887766554433221100", "content"),
        volume_context("00112233445566778899aabbccddeeff", "metadata"),
    ] {
        let e = ks.unwrap(&w, &other).unwrap_err();
        assert!(matches!(e, KmsError::UnwrapFailed { .. }), "{e}");
    }
    let mut bad = w.clone();
    bad.sealed[20] ^= 1;
    let e = ks.unwrap(&bad, &ctx).unwrap_err();
    assert!(matches!(e, KmsError::UnwrapFailed { .. }), "{e}");
    // with a wrong PIN: Unavailable, the PIN file named, no PIN
    write_private(&h.pin_file, "pin-Bad0no\n");
    let e = ks.unwrap(&w, &ctx).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, KmsError::Unavailable { .. }), "{text}");
    assert!(
        text.contains("wrong PIN") && text.contains("hsm1.pin"),
        "{text}"
    );
    assert!(
        !text.contains("pin-Bad0no") && !text.contains(PIN),
        "{text}"
    );
    assert_no_pin(&h, &[&text]);
}

fn is_eacces<T>(r: &std::io::Result<T>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(EACCES))
}

fn wait_for(since: Instant, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    loop {
        if f() {
            let t = since.elapsed();
            assert!(t < REVOCATION_BOUND, "{what}: took {t:?}");
            return t;
        }
        if since.elapsed() > Duration::from_secs(30) {
            panic!("{what}: not the case after {:?}", since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn volume_on_hsm_key_mount_rotate_disconnect() {
    if !require_softhsm() || !require_fuse() {
        return;
    }
    let h = Hsm::new();
    h.create_store_hsm1();
    let id = ok(
        &h.run(&["key", "create", "--alias", "db", "--key-store", "hsm1"]),
        "key create",
    )
    .trim()
    .to_string();
    let store = h.env.path("db.store");
    ok(
        &h.run(&["create", s(&store), "--kms-key", "alias/db"]),
        "create volume",
    );
    let store2 = h.env.path("db2.store");
    ok(
        &h.run(&["create", s(&store2), "--kms-key", "alias/db"]),
        "create volume 2",
    );
    let mut rng = Rng::new(13);
    let big = rng.bytes((3 << 20) / 2 + 7);
    let small = b"inline secret\n".to_vec();

    let m = h.mount(&store, "mnt");
    std::fs::write(m.path("big.bin"), &big).unwrap();
    std::fs::write(m.path("small.txt"), &small).unwrap();
    assert_eq!(std::fs::read(m.path("big.bin")).unwrap(), big);

    // --- disconnect while mounted: EACCES within seconds, metadata listable
    let t = Instant::now();
    ok(&h.run(&["key-store", "disconnect", "hsm1"]), "disconnect");
    let took = wait_for(t, "revoked after disconnect", || {
        is_eacces(&std::fs::read(m.path("big.bin")))
            && is_eacces(&std::fs::read(m.path("small.txt")))
    });
    eprintln!("content revoked {took:?} after disconnect");
    let names: Vec<String> = std::fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"big.bin".to_string()), "{names:?}");
    assert_eq!(
        std::fs::metadata(m.path("big.bin")).unwrap().len(),
        big.len() as u64
    );
    assert!(is_eacces(&std::fs::write(m.path("new.txt"), b"x")));
    // mounting another volume under the key is refused with the reason
    let out = h.mount_refused(&store2, "mnt2");
    assert_failed(
        &out,
        &["Unavailable", "hsm1", "disconnected"],
        "mount while disconnected",
    );

    // --- reconnect: access again without a remount
    let t = Instant::now();
    ok(&h.run(&["key-store", "connect", "hsm1"]), "connect");
    let took = wait_for(t, "restored after connect", || {
        std::fs::read(m.path("big.bin")).is_ok_and(|g| g == big)
    });
    eprintln!("content back {took:?} after connect");
    assert_eq!(std::fs::read(m.path("small.txt")).unwrap(), small);

    // --- the token gone while mounted: revoked too, back when it returns
    let moved = h.env.path("tokens-away");
    let t = Instant::now();
    std::fs::rename(&h.tokens, &moved).unwrap();
    let gone = wait_for(t, "revoked after the token went away", || {
        is_eacces(&std::fs::read(m.path("big.bin")))
    });
    eprintln!("content revoked {gone:?} after the token directory moved");
    let t = Instant::now();
    std::fs::rename(&moved, &h.tokens).unwrap();
    wait_for(t, "restored after the token came back", || {
        std::fs::read(m.path("big.bin")).is_ok_and(|g| g == big)
    });

    // --- the token's PIN changed while mounted: revoked (wrong PIN), and
    // back once the PIN file has the new PIN
    let t = Instant::now();
    h.change_pin(PIN, "pin-Wm5tP9");
    wait_for(t, "revoked after the PIN changed", || {
        is_eacces(&std::fs::read(m.path("big.bin")))
    });
    let d = h.describe("alias/db");
    assert_eq!(d["state"], "Unavailable", "{d}");
    assert!(
        d["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("wrong PIN"),
        "{d}"
    );
    let t = Instant::now();
    write_private(&h.pin_file, "pin-Wm5tP9\n");
    wait_for(t, "restored after the PIN file was fixed", || {
        std::fs::read(m.path("big.bin")).is_ok_and(|g| g == big)
    });
    h.change_pin("pin-Wm5tP9", PIN);
    write_private(&h.pin_file, format!("{PIN}\n"));
    let log = m.log_text();
    assert!(
        !log.contains(PIN) && !log.contains("pin-Wm5tP9"),
        "PIN in the mount log: {log}"
    );
    m.unmount();

    // --- rotate; old version still unwraps; rewrap moves to v2
    ok(&h.run(&["key", "rotate", "alias/db"]), "rotate");
    let out = ok(&h.run(&["rewrap", s(&store)]), "rewrap");
    eprintln!("rewrap: {out}");
    let info: Value =
        serde_json::from_str(&ok(&h.run(&["info", s(&store), "--json"]), "info")).unwrap();
    assert!(info.to_string().contains(&id), "{info}");
    let m = h.mount(&store, "mnt");
    assert_eq!(std::fs::read(m.path("big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(m.path("small.txt")).unwrap(), small);
    m.unmount();
    // store2 is still wrapped under v1
    let m2 = h.mount(&store2, "mnt2");
    std::fs::write(m2.path("f"), b"v1 volume").unwrap();
    assert_eq!(std::fs::read(m2.path("f")).unwrap(), b"v1 volume");
    m2.unmount();

    // --- audit: wraps and unwraps happened in the token
    let a = h.audit();
    assert!(
        a.iter().any(|e| e["op"] == "Decrypt"
            && e["result"] == "ok"
            && e["key_version"] == 1
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("key store hsm1")),
        "no Decrypt v1 in the token"
    );
    assert!(
        a.iter().any(|e| e["op"] == "Decrypt"
            && e["result"] == "ok"
            && e["key_version"] == 2
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("key store hsm1")),
        "no Decrypt v2 in the token"
    );
    assert_entry(&a, "GenerateDataKey", "ok", "AES-GCM in the token");
    assert!(
        a.iter().any(|e| e["op"] == "Decrypt"
            && e["result"] == "denied"
            && e["detail"].as_str().unwrap_or("").contains("disconnected")),
        "no denied Decrypt for the refused mount"
    );
    assert_no_pin(&h, &[]);
}
