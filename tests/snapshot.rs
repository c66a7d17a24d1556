//! Snapshots, clones, gc and fsck through real mounts and the CLI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Every chunk object name in a store.
fn chunk_objects(store: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in std::fs::read_dir(store.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            out.insert(f.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// Bytes of a full 128 KiB chunk object (38 bytes of header and tag).
const CHUNK_OBJ: u64 = (128 << 10) + 38;

fn chunk_path(store: &Path, name: &str) -> PathBuf {
    store.join("chunks").join(&name[..2]).join(name)
}

/// Every file under `root` (relative path -> content; symlinks as
/// "-> target"), not following `.snapshots`.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else if md.is_dir() {
                out.insert(rel.clone(), b"<dir>".to_vec());
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A tree with inline files, multi-chunk files, directories and a symlink.
fn populate(root: &Path, rng: &mut Rng) {
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    for i in 0..10 {
        let len = rng.below(3000) as usize;
        std::fs::write(root.join(format!("docs/small-{i}.txt")), rng.bytes(len)).unwrap();
    }
    std::fs::write(root.join("docs/deep/mid.bin"), rng.bytes(300_000)).unwrap();
    std::fs::write(root.join("big.bin"), rng.bytes(3 << 20)).unwrap();
    std::os::unix::fs::symlink("docs/deep/mid.bin", root.join("link")).unwrap();
}

fn fails(out: &std::process::Output, what: &str, msg: &str) {
    assert!(!out.status.success(), "{what} succeeded: {}", stdout(out));
    assert!(
        stderr(out).contains(msg),
        "{what}: expected {msg:?} in: {}",
        stderr(out)
    );
}

#[test]
fn snapshot_stays_unchanged_while_the_live_volume_changes() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    populate(&m.mountpoint, &mut rng);
    let before = tree(&m.mountpoint);
    ok(
        &env.sealfs(&["snapshot", "create", s(&m.mountpoint), "before"]),
        "snapshot create",
    );
    // .snapshots is hidden from the root listing, reachable by name
    let names: Vec<String> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.contains(&".snapshots".to_string()), "{names:?}");
    let snap = m.path(".snapshots/before");
    assert_eq!(tree(&snap), before);

    // overwrite, truncate, rename, delete, create around it
    std::fs::write(m.path("big.bin"), rng.bytes(1 << 20)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("docs/deep/mid.bin"))
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    std::fs::rename(m.path("docs/small-1.txt"), m.path("renamed.txt")).unwrap();
    std::fs::remove_file(m.path("docs/small-2.txt")).unwrap();
    std::fs::remove_file(m.path("link")).unwrap();
    std::fs::write(m.path("docs/small-3.txt"), b"changed").unwrap();
    std::fs::write(m.path("new.txt"), b"new").unwrap();
    assert_eq!(tree(&snap), before, "snapshot changed with the live volume");
    let after = tree(&m.mountpoint);
    assert_ne!(after, before);

    // writes into .snapshots are refused with EROFS
    let rofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    rofs(std::fs::write(snap.join("x"), b"x"), "create in a snapshot");
    rofs(
        std::fs::write(snap.join("big.bin"), b"x"),
        "overwrite in a snapshot",
    );
    rofs(std::fs::remove_file(snap.join("big.bin")), "unlink");
    rofs(std::fs::create_dir(snap.join("d")), "mkdir in a snapshot");
    rofs(
        std::fs::rename(snap.join("big.bin"), snap.join("b2")),
        "rename",
    );
    rofs(
        std::fs::set_permissions(snap.join("big.bin"), std::fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    rofs(
        std::fs::write(m.path(".snapshots/file"), b"x"),
        "a file in .snapshots",
    );
    assert_eq!(tree(&snap), before);
    m.unmount();

    // survives remount; the live volume kept its changes
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(tree(&m.path(".snapshots/before")), before);
    assert_eq!(tree(&m.mountpoint), after);
    m.unmount();

    // read-only mounts of the snapshot, both spellings
    let m = env.mount(&store, "old", &["snapshot=before"]);
    assert_eq!(tree(&m.mountpoint), before);
    let e = std::fs::write(m.path("x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    m.unmount();
    let mp = env.path("old2");
    std::fs::create_dir_all(&mp).unwrap();
    let out = env.sealfs(&["mount", "--snapshot", "before", s(&store), s(&mp)]);
    ok(&out, "mount --snapshot");
    let _g = BgGuard(mp.clone());
    assert_eq!(tree(&mp), before);
    ok(&env.sealfs(&["umount", s(&mp)]), "umount");
}

#[test]
fn snapshot_during_concurrent_writes_is_consistent() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    let mp = m.mountpoint.clone();
    let stop = Arc::new(AtomicBool::new(false));
    // Writer: file k is created (fully written) only after k-1; the log
    // file gets block k (content derived from k) after file k exists.
    let done = Arc::new(AtomicI64::new(-1));
    let writer = {
        let (stop, done, mp) = (stop.clone(), done.clone(), mp.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let mut k = 0i64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(mp.join(format!("f{k}")), vec![k as u8; 5000]).unwrap();
                // (closed after each write: with the kernel's writeback
                // cache, a write has reached sealfs once close returns)
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(mp.join("log"))
                    .unwrap();
                log.write_all_at(&[(k % 251) as u8 + 1; 4096], k as u64 * 4096)
                    .unwrap();
                drop(log);
                done.store(k, Ordering::SeqCst);
                k += 1;
            }
        })
    };
    let mut checked = 0;
    let mut prev = -1i64;
    let mut rng = Rng::seeded();
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(150));
        let before = done.load(Ordering::SeqCst);
        let name = format!("s{round}");
        ok(
            &env.sealfs(&["snapshot", "create", s(&mp), &name]),
            "snapshot create",
        );
        let after = done.load(Ordering::SeqCst);
        let snap = mp.join(".snapshots").join(&name);
        // the files are f0..fN without a gap: every one that was written
        // before is in it, none written after the snapshot returned
        let mut ks: Vec<i64> = std::fs::read_dir(&snap)
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.strip_prefix('f').and_then(|k| k.parse().ok())
            })
            .collect();
        ks.sort_unstable();
        let n = ks.len() as i64;
        assert!(
            ks.iter().copied().eq(0..n),
            "{name}: files are not a prefix"
        );
        assert!(n > before, "{name}: f{before} missing ({n} files)");
        assert!(n - 1 <= after + 1, "{name}: files from after the snapshot");
        // contents: every file and log block written since the previous
        // round, a sample of older ones, and those written meanwhile
        // (complete or empty, never half-written)
        let mut check: Vec<i64> = (prev + 1..=before).collect();
        if before >= 0 {
            check.extend((0..20).map(|_| rng.below(before as u64 + 1) as i64));
        }
        let log = std::fs::File::open(snap.join("log")).unwrap();
        for &k in &check {
            let f = std::fs::read(snap.join(format!("f{k}"))).unwrap();
            assert_eq!(f, vec![k as u8; 5000], "{name}: file f{k}");
            let mut blk = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&log, &mut blk, k as u64 * 4096).unwrap();
            assert!(
                blk.iter().all(|&x| x == (k % 251) as u8 + 1),
                "{name}: log block {k}"
            );
        }
        for k in before + 1..n {
            let f = std::fs::read(snap.join(format!("f{k}"))).unwrap();
            assert!(
                f.is_empty() || f == vec![k as u8; 5000],
                "{name}: f{k} half-written"
            );
        }
        checked += check.len();
        prev = before;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(checked > 0);
    m.unmount();
    let out = env.sealfs(&["fsck", s(&store)]);
    ok(&out, "fsck after concurrent snapshots");
}

#[test]
fn snapshot_survives_kill9_and_remount() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    populate(&m.mountpoint, &mut rng);
    let before = tree(&m.mountpoint);
    std::fs::create_dir(m.path(".snapshots/crash")).unwrap();
    std::fs::write(m.path("big.bin"), b"overwritten").unwrap();
    m.kill9();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(tree(&m.path(".snapshots/crash")), before);
    let list = env.sealfs(&["snapshot", "list", s(&m.mountpoint)]);
    ok(&list, "snapshot list");
    assert!(stdout(&list).contains("crash"), "{}", stdout(&list));
    m.unmount();
    ok(&env.sealfs(&["fsck", s(&store)]), "fsck");
}

#[test]
fn deleting_a_snapshot_frees_exactly_the_chunks_only_it_held() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    // 16 chunks of 128 KiB
    let data = rng.bytes(16 << 17);
    std::fs::write(m.path("f"), &data).unwrap();
    std::fs::File::open(m.path("f"))
        .unwrap()
        .sync_all()
        .unwrap();
    let base = chunk_objects(&store);
    assert_eq!(base.len(), 16);
    ok(
        &env.sealfs(&["snapshot", "create", s(&m.mountpoint), "a"]),
        "create a",
    );
    ok(
        &env.sealfs(&["snapshot", "create", s(&m.mountpoint), "b"]),
        "create b",
    );
    // rewrite 4 chunks (2 after snapshot b, 2 more after snapshot c)
    write_at_sync(&m.path("f"), &rng.bytes(2 << 17), 0);
    ok(
        &env.sealfs(&["snapshot", "create", s(&m.mountpoint), "c"]),
        "create c",
    );
    write_at_sync(&m.path("f"), &rng.bytes(2 << 17), 4 << 17);
    let all = chunk_objects(&store);
    assert_eq!(all.len(), 20, "16 + 2 + 2 objects");
    // what each snapshot alone holds ("snapshot list"): a and b share the
    // original chunks 0-1, all three the original 4-5
    let held = || -> BTreeMap<String, u64> {
        let out = env.sealfs(&["snapshot", "list", "--json", s(&m.mountpoint)]);
        ok(&out, "snapshot list");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["referenced_bytes"].as_u64().unwrap(), 16 * CHUNK_OBJ);
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["exclusive_bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        held(),
        BTreeMap::from([("a".into(), 0), ("b".into(), 0), ("c".into(), 0)])
    );
    // a and b hold the same 2 old chunks: deleting a frees nothing
    std::fs::remove_dir(m.path(".snapshots/a")).unwrap();
    assert_eq!(chunk_objects(&store), all);
    assert_eq!(
        held(),
        BTreeMap::from([("b".into(), 2 * CHUNK_OBJ), ("c".into(), 0)])
    );
    // deleting b frees exactly chunks 0 and 1 of the original
    std::fs::remove_dir(m.path(".snapshots/b")).unwrap();
    let now = chunk_objects(&store);
    assert_eq!(now.len(), 18);
    assert!(now.is_subset(&all));
    let gone: BTreeSet<_> = all.difference(&now).cloned().collect();
    assert_eq!(gone.len(), 2);
    assert!(gone.is_subset(&base), "only original chunks were freed");
    assert_eq!(held(), BTreeMap::from([("c".into(), 2 * CHUNK_OBJ)]));
    // c still reads as it was: chunks 0-1 new, 4-5 old
    let c = std::fs::read(m.path(".snapshots/c/f")).unwrap();
    assert_eq!(c[2 << 17..], data[2 << 17..]);
    m.unmount();
    // offline: delete by store path frees c's 2 exclusive chunks
    let out = env.sealfs(&["snapshot", "delete", s(&store), "c"]);
    ok(&out, "snapshot delete offline");
    assert!(
        stdout(&out).contains("freed 2 chunk objects"),
        "{}",
        stdout(&out)
    );
    assert_eq!(chunk_objects(&store).len(), 16);
    ok(&env.sealfs(&["fsck", s(&store)]), "fsck");
}

/// Overwrite part of a file and fsync it (a commit).
fn write_at_sync(p: &Path, data: &[u8], off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn key_cmd(env: &Env, args: &[&str]) {
    let mut a = vec!["key"];
    a.extend_from_slice(args);
    ok(&env.sealfs(&a), &format!("key {args:?}"));
}

#[test]
fn clones_match_byte_for_byte_and_outlive_their_origin() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    key_cmd(&env, &["create", "--alias", "other"]);
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    populate(&m.mountpoint, &mut rng);
    let frozen = tree(&m.mountpoint);
    ok(
        &env.sealfs(&["snapshot", "create", s(&m.mountpoint), "s"]),
        "snapshot",
    );
    std::fs::write(m.path("big.bin"), b"later").unwrap();
    // clones of a snapshot while the origin is mounted
    let src = format!("{}@s", s(&store));
    let same = env.path("same");
    let out = env.sealfs(&["clone", &src, s(&same)]);
    ok(&out, "clone");
    assert!(
        stdout(&out).contains("shares its data (content) key"),
        "{}",
        stdout(&out)
    );
    let other = env.path("other");
    let out = env.sealfs(&["clone", &src, s(&other), "--kms-key", "alias/other"]);
    ok(&out, "clone --kms-key");
    assert!(stdout(&out).contains("shares its data"), "{}", stdout(&out));
    let re = env.path("re");
    let out = env.sealfs(&[
        "clone",
        &src,
        s(&re),
        "--kms-key",
        "alias/other",
        "--reencrypt",
    ]);
    ok(&out, "clone --reencrypt");
    assert!(
        stdout(&out).contains("fresh content key"),
        "{}",
        stdout(&out)
    );
    m.unmount();
    // the same-key clone shares the chunk objects (hard links); the
    // re-encrypted one has its own
    let orig = chunk_objects(&store);
    let shared = chunk_objects(&same);
    assert!(!shared.is_empty() && shared.is_subset(&orig));
    use std::os::unix::fs::MetadataExt;
    let n = shared.iter().next().unwrap();
    assert!(std::fs::metadata(chunk_path(&same, n)).unwrap().nlink() >= 2);
    // ... under new object names, so they cannot be matched to the origin's
    let re_objs = chunk_objects(&re);
    assert_eq!(re_objs.len(), shared.len());
    assert!(
        re_objs.is_disjoint(&orig),
        "re-encrypted objects keep origin names"
    );
    for n in &re_objs {
        assert_eq!(std::fs::metadata(chunk_path(&re, n)).unwrap().nlink(), 1);
    }
    // `info` tells a clone that shares its origin's objects
    let info = |p: &Path| -> serde_json::Value {
        let out = env.sealfs(&["info", "--json", s(p)]);
        ok(&out, "info");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let origin = info(&store);
    assert_eq!(origin["snapshots"], 1);
    assert_eq!(origin["format_version"], 4);
    assert!(origin["shares_data_of"].is_null());
    assert_eq!(info(&same)["shares_data_of"], origin["volume_id"]);
    assert_eq!(info(&other)["shares_data_of"], origin["volume_id"]);
    assert!(info(&re)["shares_data_of"].is_null());
    assert_ne!(info(&same)["volume_id"], origin["volume_id"]);
    assert_eq!(info(&same)["snapshots"], 0);
    // a clone of the live state of an unmounted store
    let live = env.path("live");
    ok(&env.sealfs(&["clone", s(&store), s(&live)]), "clone live");

    // delete the origin entirely; every clone still mounts and matches
    std::fs::remove_dir_all(&store).unwrap();
    for c in [&same, &other, &re] {
        let m = env.mount(c, "cm", &[]);
        assert_eq!(tree(&m.mountpoint), frozen, "{}", c.display());
        // and is writable on its own
        std::fs::write(m.path("big.bin"), b"mine").unwrap();
        m.unmount();
        ok(&env.sealfs(&["fsck", s(c)]), "fsck clone");
    }
    let m = env.mount(&live, "cm", &[]);
    assert_eq!(std::fs::read(m.path("big.bin")).unwrap(), b"later");
    m.unmount();
    // writing to one clone did not change another that shares objects
    let m = env.mount(&other, "cm", &[]);
    assert_eq!(std::fs::read(m.path("big.bin")).unwrap(), b"mine");
    m.unmount();
}

#[test]
fn reencrypted_clone_under_another_key_is_independent_of_the_origin_key() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    key_cmd(&env, &["create", "--alias", "other"]);
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), vec![3u8; 500_000]).unwrap();
    std::fs::write(m.path("small"), b"small").unwrap();
    m.unmount();
    ok(
        &env.sealfs(&["snapshot", "create", s(&store), "s"]),
        "snapshot offline",
    );
    let re = env.path("re");
    let src = format!("{}@s", s(&store));
    ok(
        &env.sealfs(&[
            "clone",
            &src,
            s(&re),
            "--kms-key",
            "alias/other",
            "--reencrypt",
        ]),
        "clone",
    );
    // only the origin's key enabled: the clone cannot be opened
    key_cmd(&env, &["disable", "alias/other"]);
    let mp = env.path("cm");
    std::fs::create_dir_all(&mp).unwrap();
    let mut c = env.cmd();
    c.args(["mount", "-f", s(&re), s(&mp)]);
    let out = run_expect_exit(c, &mp);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is Disabled"), "{}", stderr(&out));
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("small")).unwrap(), b"small");
    m.unmount();
    // and vice versa
    key_cmd(&env, &["enable", "alias/other"]);
    key_cmd(&env, &["disable", "alias/test"]);
    let mut c = env.cmd();
    c.args(["mount", "-f", s(&store), s(&mp)]);
    let out = run_expect_exit(c, &mp);
    assert!(!out.status.success());
    let m = env.mount(&re, "cm", &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), vec![3u8; 500_000]);
    assert_eq!(std::fs::read(m.path("small")).unwrap(), b"small");
    m.unmount();
    // a same-key clone needs the origin key to be usable to be made
    let out = env.sealfs(&["clone", &src, s(&env.path("x"))]);
    fails(&out, "clone with the origin key disabled", "is Disabled");
    assert!(!env.path("x").exists());
}

#[test]
fn snapshot_content_is_revoked_with_the_key() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("big"), vec![5u8; 400_000]).unwrap();
    std::fs::write(m.path("small"), b"small").unwrap();
    std::fs::create_dir(m.path(".snapshots/s")).unwrap();
    // cached pages of a snapshot file are dropped on revocation too
    assert_eq!(
        std::fs::read(m.path(".snapshots/s/big")).unwrap(),
        vec![5u8; 400_000]
    );
    key_cmd(&env, &["disable", "alias/test"]);
    let start = Instant::now();
    loop {
        let r = std::fs::read(m.path(".snapshots/s/small"));
        if r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not revoked: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = std::fs::read(m.path(".snapshots/s/big")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    // names and sizes stay visible (metadata is under the service key)
    assert_eq!(
        std::fs::metadata(m.path(".snapshots/s/big")).unwrap().len(),
        400_000
    );
    key_cmd(&env, &["enable", "alias/test"]);
    let start = Instant::now();
    while std::fs::read(m.path(".snapshots/s/big")).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "not restored");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        std::fs::read(m.path(".snapshots/s/big")).unwrap(),
        vec![5u8; 400_000]
    );
    m.unmount();
}

#[test]
fn gc_never_removes_a_referenced_object() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &["commit_interval=1"]);
    let mp = m.mountpoint.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mp) = (stop.clone(), mp.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(7);
            let mut k = 0u64;
            let mut last = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{}", k % 7);
                let d = rng.bytes(100_000 + (k as usize % 5) * 70_000);
                std::fs::write(mp.join(&name), &d).unwrap();
                last.insert(name, d);
                k += 1;
            }
            last
        })
    };
    let snapper = {
        let (stop, mp) = (stop.clone(), mp.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                std::fs::create_dir(mp.join(format!(".snapshots/g{n}"))).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            n
        })
    };
    // an orphan the daemon's gc must remove
    let orphan = "00112233445566778899aabbccddeeff";
    std::fs::write(chunk_path(&store, orphan), b"junk").unwrap();
    let mut removed = 0;
    for _ in 0..8 {
        let out = env.sealfs(&["gc", s(&mp)]);
        ok(&out, "gc while mounted");
        if stdout(&out).contains("removed 1 unreferenced") {
            removed += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    let snaps = snapper.join().unwrap();
    assert!(snaps > 0);
    assert!(removed >= 1, "the orphan was never removed");
    assert!(!chunk_path(&store, orphan).exists());
    for (name, d) in &last {
        assert!(std::fs::read(mp.join(name)).unwrap() == *d, "{name}");
    }
    // the store spelled another way (a symlink) still reaches the daemon
    let link = env.path("store-link");
    std::os::unix::fs::symlink(&store, &link).unwrap();
    ok(
        &env.sealfs(&["gc", s(&link)]),
        "gc through a symlink while mounted",
    );
    m.unmount();
    let out = env.sealfs(&["fsck", s(&store)]);
    ok(&out, "fsck after gc");
    // gc by store path when not mounted
    std::fs::write(chunk_path(&store, orphan), b"junk").unwrap();
    let out = env.sealfs(&["gc", s(&store)]);
    ok(&out, "gc offline");
    assert!(
        stdout(&out).contains("removed 1 unreferenced"),
        "{}",
        stdout(&out)
    );
    ok(&env.sealfs(&["fsck", s(&store)]), "fsck");
}

#[test]
fn fsck_finds_each_injected_fault_and_names_the_file() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::create_dir(m.path("photos")).unwrap();
    std::fs::write(m.path("photos/victim.jpg"), vec![9u8; 600_000]).unwrap();
    std::fs::write(m.path("note.txt"), b"inline").unwrap();
    std::fs::create_dir(m.path(".snapshots/keep")).unwrap();
    m.unmount();
    let out = env.sealfs(&["fsck", s(&store)]);
    ok(&out, "fsck of a good store");
    assert!(stdout(&out).contains("0 problems"), "{}", stdout(&out));
    let objs: Vec<String> = chunk_objects(&store).into_iter().collect();
    assert_eq!(objs.len(), 5);
    let victim = chunk_path(&store, &objs[2]);
    let orig = std::fs::read(&victim).unwrap();

    let check = |what: &str, expect: &str| {
        let out = env.sealfs(&["fsck", s(&store)]);
        assert!(
            !out.status.success(),
            "{what}: fsck passed: {}",
            stdout(&out)
        );
        let text = stdout(&out);
        assert!(text.contains(expect), "{what}: {text}");
        assert!(
            text.contains("affects /photos/victim.jpg"),
            "{what}: {text}"
        );
        assert!(
            text.contains("affects .snapshots/keep/photos/victim.jpg"),
            "{what}: {text}"
        );
        assert!(stderr(&out).contains("damaged"), "{what}: {}", stderr(&out));
    };
    // flipped bit
    let mut b = orig.clone();
    b[100] ^= 0x10;
    std::fs::write(&victim, &b).unwrap();
    check("flipped bit", "damaged: chunks/");
    // truncated object
    std::fs::write(&victim, &orig[..orig.len() - 7]).unwrap();
    check("truncated chunk", "damaged: chunks/");
    // deleted object
    std::fs::remove_file(&victim).unwrap();
    check("deleted chunk", "missing: chunks/");
    std::fs::write(&victim, &orig).unwrap();
    ok(&env.sealfs(&["fsck", s(&store)]), "fsck after restoring");

    // a truncated journal record (kill -9 leaves the journal in place)
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("later.txt"), b"later").unwrap();
    std::fs::File::open(m.path("later.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.kill9();
    let journal = std::fs::read_dir(store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal-")
        })
        .max()
        .expect("a journal record");
    let j = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, &j[..j.len() - 5]).unwrap();
    let out = env.sealfs(&["fsck", s(&store)]);
    assert!(!out.status.success());
    let name = journal.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stdout(&out).contains(&format!("damaged: meta/{name}")),
        "{}",
        stdout(&out)
    );
    // --repair never deletes anything a state references, and keeps
    // "orphans" while a state is unreadable
    let before = snapshot_store(&store);
    let out = env.sealfs(&["fsck", "--repair", s(&store)]);
    assert!(!out.status.success());
    assert!(
        snapshot_store(&store) == before,
        "--repair changed a damaged store"
    );
    std::fs::write(&journal, &j).unwrap();

    // orphans: reported, non-zero; --repair removes them
    let orphan = "00112233445566778899aabbccddeeff";
    std::fs::write(chunk_path(&store, orphan), b"junk").unwrap();
    let out = env.sealfs(&["fsck", s(&store)]);
    fails(&out, "fsck with an orphan", "unreferenced objects");
    assert!(
        stdout(&out).contains("orphan: chunks/00/0011"),
        "{}",
        stdout(&out)
    );
    ok(
        &env.sealfs(&["fsck", "--repair", s(&store)]),
        "fsck --repair",
    );
    assert!(!chunk_path(&store, orphan).exists());
    assert_eq!(chunk_objects(&store).len(), 5);
    ok(&env.sealfs(&["fsck", s(&store)]), "fsck after repair");
    // fsck refuses a mounted store
    let m = env.mount(&store, "mnt", &[]);
    fails(&env.sealfs(&["fsck", s(&store)]), "fsck mounted", "in use");
    assert_eq!(std::fs::read(m.path("later.txt")).unwrap(), b"later");
    m.unmount();
}

#[test]
fn snapshot_errors_are_clear_and_change_nothing() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    let mp = s(&m.mountpoint).to_string();
    ok(&env.sealfs(&["snapshot", "create", &mp, "s"]), "create");
    fails(
        &env.sealfs(&["snapshot", "create", &mp, "s"]),
        "duplicate",
        "already exists",
    );
    let e = std::fs::create_dir(m.path(".snapshots/s")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    fails(
        &env.sealfs(&["snapshot", "delete", &mp, "nope"]),
        "unknown",
        "no snapshot named \"nope\"",
    );
    fails(
        &env.sealfs(&["snapshot", "create", &mp, "a/b"]),
        "bad name",
        "invalid snapshot name",
    );
    fails(
        &env.sealfs(&["snapshot", "create", &mp, ".x"]),
        "bad name",
        "invalid snapshot name",
    );
    // the store of a mounted volume works as a target too
    let list = env.sealfs(&["snapshot", "list", "--json", s(&store)]);
    ok(&list, "list by store while mounted");
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "s");
    // a clone of the live state of a mounted store is refused
    fails(
        &env.sealfs(&["clone", s(&store), s(&env.path("c"))]),
        "clone of a mounted store",
        "take a snapshot",
    );
    m.unmount();

    let before = snapshot_store(&store);
    fails(
        &env.sealfs(&["snapshot", "create", s(&store), "s"]),
        "duplicate offline",
        "already exists",
    );
    fails(
        &env.sealfs(&["snapshot", "delete", s(&store), "nope"]),
        "unknown offline",
        "no snapshot named",
    );
    let c = env.path("c");
    fails(
        &env.sealfs(&["clone", &format!("{}@nope", s(&store)), s(&c)]),
        "clone of an unknown snapshot",
        "no snapshot named",
    );
    assert!(!c.exists(), "a failed clone left {}", c.display());
    // clone into a non-empty directory
    std::fs::create_dir(&c).unwrap();
    std::fs::write(c.join("keep"), b"mine").unwrap();
    fails(
        &env.sealfs(&["clone", &format!("{}@s", s(&store)), s(&c)]),
        "clone into a non-empty target",
        "not empty",
    );
    assert_eq!(std::fs::read(c.join("keep")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&c).unwrap().count(), 1);
    let mp2 = env.path("m2");
    std::fs::create_dir_all(&mp2).unwrap();
    let mut cmd = env.cmd();
    cmd.args(["mount", "-f", "--snapshot", "nope", s(&store), s(&mp2)]);
    let out = run_expect_exit(cmd, &mp2);
    fails(&out, "mount of an unknown snapshot", "no snapshot named");
    // rekey is refused while snapshots exist, and says what to do
    fails(
        &env.sealfs(&["rekey", s(&store)]),
        "rekey with snapshots",
        "sealfs snapshot delete",
    );
    // an empty existing directory is a fine clone target
    let empty = env.path("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(
        &env.sealfs(&["clone", &format!("{}@s", s(&store)), s(&empty)]),
        "clone into an empty dir",
    );
    // none of the failures changed the store (the clone does not either)
    assert!(snapshot_store(&store) == before, "store changed");
}

#[test]
fn only_the_root_owner_takes_snapshots_others_browse_them() {
    if !require_fuse() || !rustix::process::geteuid().is_root() {
        eprintln!("skipping: needs root (runuser)");
        return;
    }
    let (_uid, _gid, user) = test_user();
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &["allow_other"]);
    std::fs::set_permissions(&m.mountpoint, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(m.path("shared"), b"for everyone").unwrap();
    std::fs::set_permissions(m.path("shared"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(m.path("secret"), b"root only").unwrap();
    std::fs::set_permissions(m.path("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(m.path(".snapshots/s")).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new("runuser")
            .args(["-u", &user, "--"])
            .args(args)
            .env("LC_ALL", "C")
            .current_dir("/")
            .output()
            .unwrap()
    };
    let snap = m.path(".snapshots/s");
    let out = run(&["cat", s(&snap.join("shared"))]);
    ok(&out, "another user reads a snapshot file");
    assert_eq!(out.stdout, b"for everyone");
    let out = run(&["cat", s(&snap.join("secret"))]);
    fails(
        &out,
        "another user reads a 0600 snapshot file",
        "Permission denied",
    );
    let out = run(&["mkdir", s(&m.path(".snapshots/x"))]);
    fails(&out, "another user takes a snapshot", "Permission denied");
    let out = run(&["rmdir", s(&snap)]);
    fails(&out, "another user deletes a snapshot", "Permission denied");
    assert!(snap.is_dir());
    m.unmount();
}
