//! Integrity of a store through real mounts: damaged, swapped, foreign,
//! truncated or missing chunk objects read as EIO (never as wrong bytes);
//! damaged or reordered metadata, a tampered header and a rolled-back store
//! refuse to mount without touching the store; kill -9 keeps every fsync'ed
//! file and never invents content.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHUNK: usize = 128 * 1024;

/// Every chunk object file of a store.
fn chunk_objects(store: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let dir = store.join("chunks");
    if !dir.exists() {
        return out;
    }
    for sub in std::fs::read_dir(&dir).unwrap() {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_file() && !name.starts_with('.') {
                out.insert(p);
            }
        }
    }
    out
}

fn journals(store: &Path) -> Vec<PathBuf> {
    meta_named(store, "journal-")
}

fn checkpoints(store: &Path) -> Vec<PathBuf> {
    meta_named(store, "checkpoint-")
}

fn meta_named(store: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn flip_byte(p: &Path, at: usize) {
    let mut d = std::fs::read(p).unwrap();
    let i = at.min(d.len() - 1);
    d[i] ^= 0x01;
    std::fs::write(p, d).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a failed");
}

fn assert_eio<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "{what}: expected EIO, got {e:?}"
        ),
        Ok(v) => panic!("{what}: expected EIO, but the read succeeded: {v:?}"),
    }
}

/// Wait (briefly) until the daemon log contains `needle`.
fn log_contains(m: &Mount, needle: &str) -> bool {
    let start = Instant::now();
    loop {
        if m.log_text().contains(needle) {
            return true;
        }
        if start.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A store holding `/big.bin` (200 KiB, 2 chunk objects of 128 KiB) plus inline small
/// files and `/other.bin` (another chunked file). Returns the content of
/// big.bin, other.bin, and the chunk objects that belong to big.bin.
struct Fixture {
    env: Env,
    store: PathBuf,
    big: Vec<u8>,
    other: Vec<u8>,
    small: Vec<(String, Vec<u8>)>,
    big_chunks: Vec<PathBuf>,
}

fn fixture() -> Fixture {
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let big = rng.bytes(200 * 1024);
    let other = rng.bytes(150 * 1024);
    let small: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("small{i}.txt"), rng.bytes(100 + i * 1000)))
        .collect();

    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("big.bin"), &big).unwrap();
    m.unmount();
    let big_chunks: Vec<PathBuf> = chunk_objects(&store).into_iter().collect();
    assert_eq!(
        big_chunks.len(),
        (200 * 1024_usize).div_ceil(CHUNK),
        "a 200 KiB file should be stored as 2 chunk objects: {big_chunks:?}"
    );

    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("other.bin"), &other).unwrap();
    for (n, d) in &small {
        std::fs::write(m.path(n), d).unwrap();
    }
    m.unmount();
    let all = chunk_objects(&store);
    for c in &big_chunks {
        assert!(all.contains(c), "big.bin's chunk {c:?} vanished");
    }
    assert!(
        all.len() > big_chunks.len(),
        "other.bin has no chunk objects"
    );
    Fixture {
        env,
        store,
        big,
        other,
        small,
        big_chunks,
    }
}

/// Mount the damaged store and check: big.bin reads as EIO (whole file and
/// at least one chunk-sized region, every other region is either exact or
/// EIO), the other files read back exactly, and the daemon log names
/// /big.bin.
fn check_big_damaged(f: &Fixture) {
    let m = f.env.mount(&f.store, "mnt", &[]);
    assert_eio(std::fs::read(m.path("big.bin")), "reading big.bin");
    let file = std::fs::File::open(m.path("big.bin")).unwrap();
    let mut failed = 0;
    for (i, want) in f.big.chunks(CHUNK).enumerate() {
        let mut buf = vec![0u8; want.len()];
        match file.read_exact_at(&mut buf, (i * CHUNK) as u64) {
            Ok(()) => assert!(
                buf == want,
                "big.bin region {i} returned bytes it never had"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "region {i}: {e:?}");
                failed += 1;
            }
        }
    }
    assert!(failed >= 1, "no region of big.bin failed");
    drop(file);
    assert!(
        std::fs::read(m.path("other.bin")).unwrap() == f.other,
        "other.bin changed"
    );
    for (n, d) in &f.small {
        assert!(std::fs::read(m.path(n)).unwrap() == *d, "{n} changed");
    }
    assert!(
        log_contains(&m, "/big.bin"),
        "the daemon log does not name /big.bin: {}",
        m.log_text()
    );
    m.unmount();
}

#[test]
fn flipped_bit_in_chunk_is_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    let obj = &f.big_chunks[1];
    let len = std::fs::metadata(obj).unwrap().len() as usize;
    // a byte in the ciphertext, past the 10-byte header and 12-byte nonce
    flip_byte(obj, 22 + (len - 22) / 2);
    check_big_damaged(&f);
}

#[test]
fn flipped_bit_in_chunk_header_or_tag_is_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    let len = std::fs::metadata(&f.big_chunks[0]).unwrap().len() as usize;
    // magic, version, generation, nonce, last byte of the tag
    for at in [0usize, 5, 7, 12, len - 1] {
        let obj = &f.big_chunks[0];
        let orig = std::fs::read(obj).unwrap();
        flip_byte(obj, at);
        check_big_damaged(&f);
        std::fs::write(obj, orig).unwrap();
    }
    // restored: reads fine again
    let m = f.env.mount(&f.store, "mnt", &[]);
    assert!(std::fs::read(m.path("big.bin")).unwrap() == f.big);
    m.unmount();
}

#[test]
fn swapped_chunks_are_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    let a = &f.big_chunks[0];
    let b = &f.big_chunks[1];
    let tmp = f.store.join("chunks").join("swap.tmp");
    std::fs::rename(a, &tmp).unwrap();
    std::fs::rename(b, a).unwrap();
    std::fs::rename(&tmp, b).unwrap();
    check_big_damaged(&f);
}

#[test]
fn chunk_from_another_store_is_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    // Same keystore, same master key (alias/test), another volume.
    let store2 = f.env.create_store("store2");
    let m = f.env.mount(&store2, "mnt2", &[]);
    std::fs::write(m.path("big.bin"), Rng::seeded().bytes(200 * 1024)).unwrap();
    m.unmount();
    let foreign: Vec<PathBuf> = chunk_objects(&store2).into_iter().collect();
    assert!(!foreign.is_empty());
    std::fs::copy(&foreign[0], &f.big_chunks[1]).unwrap();
    check_big_damaged(&f);
}

#[test]
fn truncated_chunk_is_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    let obj = &f.big_chunks[0];
    let len = std::fs::metadata(obj).unwrap().len();
    let fh = std::fs::OpenOptions::new().write(true).open(obj).unwrap();
    fh.set_len(len / 2).unwrap();
    drop(fh);
    check_big_damaged(&f);
    // and truncated to nothing at all
    std::fs::write(obj, b"").unwrap();
    check_big_damaged(&f);
}

#[test]
fn deleted_chunk_is_eio() {
    if !require_fuse() {
        return;
    }
    let f = fixture();
    std::fs::remove_file(&f.big_chunks[1]).unwrap();
    check_big_damaged(&f);
}

// ----- metadata ------------------------------------------------------------

/// A store with a checkpoint and at least 3 journal records: written with
/// fsync several times, then the daemon is killed so no clean-unmount
/// checkpoint compacts them.
fn journaled_store(env: &Env) -> PathBuf {
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    for i in 0..4 {
        let mut f = std::fs::File::create(m.path(&format!("f{i}"))).unwrap();
        f.write_all(format!("content {i}").as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    m.kill9();
    let j = journals(&store);
    assert!(j.len() >= 3, "expected several journal records, got {j:?}");
    assert_eq!(checkpoints(&store).len(), 1);
    store
}

/// Mount in the foreground expecting a refusal; returns the message.
fn refused_mount(env: &Env, store: &Path) -> String {
    let mp = env.path("mnt-fail");
    std::fs::create_dir_all(&mp).unwrap();
    let mut c = env.cmd();
    c.arg("mount").arg("-f").arg(store).arg(&mp);
    let out = run_expect_exit(c, &mp);
    assert!(!out.status.success(), "mount of a damaged store succeeded");
    assert!(!is_mounted(&mp));
    let msg = stderr(&out);
    assert!(!msg.trim().is_empty(), "no error message");
    msg
}

/// Fresh copy of a pristine store to damage.
fn scratch_copy(env: &Env, pristine: &Path, name: &str) -> PathBuf {
    let to = env.path(name);
    copy_dir(pristine, &to);
    to
}

#[test]
fn damaged_metadata_refuses_to_mount_and_leaves_store_alone() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let pristine = journaled_store(&env);

    // (a) a middle journal record deleted
    let s = scratch_copy(&env, &pristine, "a");
    let j = journals(&s);
    std::fs::remove_file(&j[1]).unwrap();
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(
        msg.contains("missing") || msg.contains("damaged"),
        "(a) unclear message: {msg}"
    );
    assert!(
        before == snapshot_store(&s),
        "(a) failed mount changed the store"
    );

    // (b) two journal records swapped
    let s = scratch_copy(&env, &pristine, "b");
    let j = journals(&s);
    let tmp = s.join("meta").join("swap.tmp");
    std::fs::rename(&j[0], &tmp).unwrap();
    std::fs::rename(&j[1], &j[0]).unwrap();
    std::fs::rename(&tmp, &j[1]).unwrap();
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(msg.contains("damaged"), "(b) unclear message: {msg}");
    assert!(
        before == snapshot_store(&s),
        "(b) failed mount changed the store"
    );

    // (c) a bit flipped in the checkpoint
    let s = scratch_copy(&env, &pristine, "c");
    let c = checkpoints(&s);
    let len = std::fs::metadata(&c[0]).unwrap().len() as usize;
    flip_byte(&c[0], len / 2);
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(
        msg.contains("damaged") && msg.contains("checkpoint"),
        "(c) unclear message: {msg}"
    );
    assert!(
        before == snapshot_store(&s),
        "(c) failed mount changed the store"
    );

    // (d) a bit flipped in the header: in the body, in the wrapped keys and
    // in the MAC
    let hdr_len = std::fs::metadata(pristine.join("sealfs.store"))
        .unwrap()
        .len() as usize;
    for at in [20, hdr_len / 2, hdr_len - 40, hdr_len - 1] {
        let s = scratch_copy(&env, &pristine, &format!("d{at}"));
        flip_byte(&s.join("sealfs.store"), at);
        let before = snapshot_store(&s);
        let msg = refused_mount(&env, &s);
        assert!(
            msg.contains("header"),
            "(d) flip at {at}: message does not say the header is bad: {msg}"
        );
        assert!(
            before == snapshot_store(&s),
            "(d) flip at {at}: failed mount changed the store"
        );
    }

    // The untouched original still mounts, with all its fsync'ed files.
    let m = env.mount(&pristine, "mnt", &[]);
    for i in 0..4 {
        assert_eq!(
            std::fs::read_to_string(m.path(&format!("f{i}"))).unwrap(),
            format!("content {i}")
        );
    }
    m.unmount();
}

#[test]
fn flipped_journal_or_missing_checkpoint_refuses() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let pristine = journaled_store(&env);
    // a bit flipped in a journal record
    let s = scratch_copy(&env, &pristine, "flip");
    let j = journals(&s);
    let len = std::fs::metadata(&j[1]).unwrap().len() as usize;
    flip_byte(&j[1], len / 2);
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(msg.contains("damaged"), "unclear message: {msg}");
    assert!(
        before == snapshot_store(&s),
        "failed mount changed the store"
    );
    // the newest journal record deleted: the chain is intact, but this
    // machine has seen that commit, so it is a rollback
    let s = scratch_copy(&env, &pristine, "notail");
    std::fs::remove_file(journals(&s).last().unwrap()).unwrap();
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(msg.contains("rollback"), "unclear message: {msg}");
    assert!(
        before == snapshot_store(&s),
        "failed mount changed the store"
    );
    // the checkpoint deleted
    let s = scratch_copy(&env, &pristine, "nockpt");
    std::fs::remove_file(&checkpoints(&s)[0]).unwrap();
    let before = snapshot_store(&s);
    let msg = refused_mount(&env, &s);
    assert!(
        msg.contains("damaged") || msg.contains("missing"),
        "unclear message: {msg}"
    );
    assert!(
        before == snapshot_store(&s),
        "failed mount changed the store"
    );
}

#[test]
fn rollback_is_refused() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("a.txt"), b"version 1").unwrap();
    m.unmount();
    let old = env.path("old-copy");
    copy_dir(&store, &old);

    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("a.txt"), b"version 2").unwrap();
    std::fs::write(m.path("b.txt"), b"new").unwrap();
    m.unmount();

    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&old, &store);
    let before = snapshot_store(&store);
    let msg = refused_mount(&env, &store);
    assert!(msg.contains("rollback"), "unclear message: {msg}");
    assert!(
        before == snapshot_store(&store),
        "failed mount changed the store"
    );
}

// ----- kill -9 ------------------------------------------------------------

/// Files the unsynced writer started, with the content it meant to write.
type WriteLog = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What a directory of the volume must contain after a crash.
#[derive(Default)]
struct Expect {
    /// Files that must exist with exactly this content.
    exact: BTreeMap<String, Vec<u8>>,
    /// Files written without fsync: if present, a prefix of this content.
    maybe: BTreeMap<String, Vec<u8>>,
}

/// Check a directory after remount, then turn what was found into exact
/// expectations (it is committed now and nothing changes it any more).
fn verify_dir(m: &Mount, dir: &str, e: &mut Expect) {
    let mut present = BTreeSet::new();
    for ent in std::fs::read_dir(m.path(dir)).unwrap() {
        present.insert(ent.unwrap().file_name().to_string_lossy().into_owned());
    }
    for (name, want) in &e.exact {
        let got = std::fs::read(m.path(&format!("{dir}/{name}")))
            .unwrap_or_else(|err| panic!("{dir}/{name} (fsync'ed) unreadable: {err}"));
        assert!(
            got == *want,
            "{dir}/{name}: fsync'ed content differs (len {} vs {})",
            got.len(),
            want.len()
        );
    }
    let mut found = BTreeMap::new();
    for name in &present {
        if e.exact.contains_key(name) {
            continue;
        }
        let Some(full) = e.maybe.get(name) else {
            panic!("{dir}/{name} exists but was never created");
        };
        let got = std::fs::read(m.path(&format!("{dir}/{name}")))
            .unwrap_or_else(|err| panic!("{dir}/{name} unreadable after crash: {err}"));
        assert!(
            got.len() <= full.len() && got[..] == full[..got.len()],
            "{dir}/{name}: {} bytes after crash are not a prefix of what was written ({} bytes)",
            got.len(),
            full.len()
        );
        found.insert(name.clone(), got);
    }
    if !e.maybe.is_empty() {
        eprintln!(
            "{dir}: {} of {} unsynced files survived the crash ({} bytes)",
            found.len(),
            e.maybe.len(),
            found.values().map(Vec::len).sum::<usize>()
        );
    }
    e.maybe.clear();
    e.exact.extend(found);
}

#[test]
fn kill9_keeps_fsynced_files_and_never_invents_content() {
    if !require_fuse() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let mut dirs: BTreeMap<String, Expect> = BTreeMap::new();
    const ROUNDS: usize = 5;
    for round in 0..ROUNDS {
        // Mostly short commit intervals, so that kills land between,
        // during and after background commits; one round with the default.
        let opts: &[&str] = if round == 2 {
            &[]
        } else {
            &["commit_interval=1"]
        };
        let m = env.mount(&store, "mnt", opts);
        for (d, e) in dirs.iter_mut() {
            verify_dir(&m, d, e);
        }
        let dir = format!("r{round}");
        std::fs::create_dir(m.path(&dir)).unwrap();
        let mut e = Expect::default();

        // Durable files.
        let a = rng.bytes(1 << 20);
        let mut f = std::fs::File::create(m.path(&format!("{dir}/A"))).unwrap();
        f.write_all(&a).unwrap();
        f.sync_all().unwrap();
        e.exact.insert("A".into(), a);
        let b = {
            let n = 100 * 1024 + rng.below(200 * 1024) as usize;
            rng.bytes(n)
        };
        let mut f = std::fs::File::create(m.path(&format!("{dir}/B"))).unwrap();
        f.write_all(&b).unwrap();
        f.sync_all().unwrap();
        e.exact.insert("B".into(), b);
        for i in 0..5 {
            let d = {
                let n = rng.below(6000) as usize;
                rng.bytes(n)
            };
            let mut f = std::fs::File::create(m.path(&format!("{dir}/s{i}"))).unwrap();
            f.write_all(&d).unwrap();
            f.sync_all().unwrap();
            e.exact.insert(format!("s{i}"), d);
        }

        // Unsynced writer, killed at a random point.
        let log: WriteLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let log = log.clone();
            let stop = stop.clone();
            let base = m.path(&dir);
            let mut wrng = Rng::new(rng.next());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("u{i}");
                    i += 1;
                    let content = {
                        let n = wrng.below(200 * 1024) as usize;
                        wrng.bytes(n)
                    };
                    log.lock().unwrap().push((name.clone(), content.clone()));
                    let Ok(mut f) = std::fs::File::create(base.join(&name)) else {
                        return;
                    };
                    let mut off = 0;
                    while off < content.len() {
                        let n = (1 + wrng.below(8000) as usize).min(content.len() - off);
                        if f.write_all(&content[off..off + n]).is_err() {
                            return;
                        }
                        off += n;
                        // Throttled, so that background commits land while
                        // files are half written.
                        std::thread::sleep(Duration::from_millis(1 + wrng.below(3)));
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(100 + rng.below(3500)));
        assert!(!writer.is_finished(), "the writer stopped before the kill");
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        for (name, content) in log.lock().unwrap().drain(..) {
            e.maybe.insert(name, content);
        }
        dirs.insert(dir, e);
    }

    // Remount without any repair: everything checks out, the volume is
    // writable, and a clean unmount / remount keeps it all.
    let m = env.mount(&store, "mnt", &[]);
    for (d, e) in dirs.iter_mut() {
        verify_dir(&m, d, e);
    }
    std::fs::write(m.path("after.txt"), b"still works").unwrap();
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    for (d, e) in dirs.iter_mut() {
        verify_dir(&m, d, e);
    }
    assert_eq!(std::fs::read(m.path("after.txt")).unwrap(), b"still works");
    m.unmount();
}
