//! The on-disk format is a contract: stores written by earlier versions
//! (committed fixtures made by the binaries of those versions) keep
//! opening, show exactly what they held, and are upgraded by a read-write
//! mount.

mod common;

use common::*;
use std::path::Path;

/// Copy a directory tree (plain files and directories only).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// What `tests/fixtures/make-format3.sh` records of a tree: every path,
/// with sha256 and user xattrs of plain files, the type of the rest.
fn manifest(dir: &Path) -> String {
    let script = r#"cd "$1" && find . -path ./.snapshots -prune -o -print | LC_ALL=C sort | while read -r p; do
    if [ -f "$p" ] && [ ! -L "$p" ]; then printf '%s %s %s\n' "$p" "$(sha256sum < "$p" | cut -c1-64)" "$(getfattr -d "$p" 2>/dev/null | grep -v '^#' | tr '\n' ' ')"; else printf '%s %s\n' "$p" "$(stat -c %F "$p")"; fi
  done"#;
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("manifest")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "manifest: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// An environment holding the fixture's keystore and a copy of its store.
fn fixture_env(name: &str) -> (Env, std::path::PathBuf) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::Builder::new()
        .prefix("sealfs-fixture-")
        .tempdir()
        .unwrap();
    let env = Env { dir };
    for f in [
        "keystore",
        "keystore.bak",
        "keystore.audit",
        "keystore.audit-head",
    ] {
        std::fs::copy(fx.join(f), env.path(f)).unwrap();
    }
    write_private(
        &env.key_file(),
        std::fs::read(fx.join("keystore.key")).unwrap(),
    );
    let store = env.path("store");
    copy_tree(&fx.join("store"), &store);
    (env, store)
}

fn info_json(env: &Env, store: &Path) -> serde_json::Value {
    let out = env.sealfs(&["info", "--json", store.to_str().unwrap()]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn format_3_store_reads_and_upgrades() {
    if !require_fuse() {
        return;
    }
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3");
    let live = std::fs::read_to_string(fx.join("live.manifest")).unwrap();
    let snap = std::fs::read_to_string(fx.join("snapshot-before.manifest")).unwrap();
    let (env, store) = fixture_env("format3");
    assert_eq!(info_json(&env, &store)["format_version"], 3);

    // read-only: everything as it was, nothing written
    let before = snapshot_store(&store);
    let m = env.mount(&store, "ro", &["ro"]);
    assert_eq!(
        manifest(&m.path("")),
        live,
        "live state of the format 3 store"
    );
    assert_eq!(
        manifest(&m.path(".snapshots/before")),
        snap,
        "snapshot of the format 3 store"
    );
    m.unmount();
    let after = snapshot_store(&store);
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, d)| p.as_path() != Path::new("lease") && before.get(*p) != Some(d))
        .map(|(p, _)| p.clone())
        .collect();
    assert!(changed.is_empty(), "a read-only mount changed {changed:?}");
    assert_eq!(info_json(&env, &store)["format_version"], 3);

    // read-write: upgraded to the current format, same content, and what
    // is written now survives a remount
    let m = env.mount(&store, "rw", &[]);
    assert_eq!(manifest(&m.path("")), live);
    std::fs::write(m.path("new.txt"), b"written by format 4\n").unwrap();
    std::fs::File::open(m.path("new.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.unmount();
    assert_eq!(info_json(&env, &store)["format_version"], 4);
    let m = env.mount(&store, "rw2", &[]);
    let now = manifest(&m.path(""));
    for l in live.lines() {
        assert!(
            now.lines().any(|n| n == l),
            "missing after upgrade: {l}\n{now}"
        );
    }
    assert!(
        now.lines().any(|l| l.starts_with("./new.txt ")),
        "new file missing: {now}"
    );
    assert_eq!(
        std::fs::read(m.path("new.txt")).unwrap(),
        b"written by format 4\n"
    );
    assert_eq!(manifest(&m.path(".snapshots/before")), snap);
    m.unmount();
    let out = env.sealfs(&["fsck", store.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "fsck after upgrade: {}{}",
        stdout(&out),
        stderr(&out)
    );
}
