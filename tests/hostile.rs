//! A hostile store cannot harm the host: for every kind of entry a store
//! holds, a symlink to a canary outside the store, and a FIFO, are planted
//! in its place, and every command that touches a store is run. Each
//! canary stays byte-identical, no command hangs, and each refusal names
//! the entry. Also: a deleted lock file does not let a second writer in.

mod common;

use common::*;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any one command may take before it counts as hung.
const HANG: Duration = Duration::from_secs(60);

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

/// Run a command with a deadline; a command still running then is killed
/// and the test fails.
fn run(mut c: Command, what: &str) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`{what}` hung (killed after {HANG:?}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A store copy with its own state directory (copies of one template
/// share a volume id; each must look new to its machine).
struct Case<'a> {
    env: &'a Env,
    dir: PathBuf,
    store: PathBuf,
}

impl Case<'_> {
    fn cmd(&self) -> Command {
        let mut c = self.env.cmd();
        c.env("SEALFS_STATE_DIR", self.dir.join("state"));
        c
    }

    fn sealfs(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        run(c, &format!("sealfs {}", args.join(" ")))
    }
}

/// A store with chunked files, inline files, a directory and recycled
/// chunk files (from deleting a file).
fn template(env: &Env) -> PathBuf {
    let store = env.create_store("template");
    let m = env.mount(&store, "tmpl-mnt", &[]);
    std::fs::create_dir(m.path("dir")).unwrap();
    for i in 0..4 {
        let data: Vec<u8> = (0..300_000u32).map(|x| (x * 7 + i) as u8).collect();
        std::fs::write(m.path(&format!("dir/big{i}")), &data).unwrap();
    }
    std::fs::write(m.path("small.txt"), b"small\n").unwrap();
    Command::new("sync").status().unwrap();
    std::fs::remove_file(m.path("dir/big3")).unwrap();
    Command::new("sync").status().unwrap();
    m.unmount();
    store
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// What can be planted where.
#[derive(Clone, Copy, Debug)]
enum Plant {
    Symlink,
    Fifo,
}

/// The canaries outside the store: a file and a directory.
struct Canary {
    file: PathBuf,
    dir: PathBuf,
}

impl Canary {
    fn new(at: &Path) -> Canary {
        let file = at.join("canary");
        std::fs::write(&file, b"canary: must never change\n").unwrap();
        let dir = at.join("canary-dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep"), b"keep\n").unwrap();
        Canary { file, dir }
    }

    fn check(&self, what: &str) {
        assert_eq!(
            std::fs::read(&self.file).unwrap(),
            b"canary: must never change\n",
            "{what}: the canary file outside the store changed"
        );
        let names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["keep"],
            "{what}: something was written into the canary directory"
        );
        assert_eq!(std::fs::read(self.dir.join("keep")).unwrap(), b"keep\n");
    }
}

fn plant(at: &Path, how: Plant, target: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(at) {
        if m.is_dir() {
            std::fs::remove_dir_all(at).unwrap();
        } else {
            std::fs::remove_file(at).unwrap();
        }
    }
    match how {
        Plant::Symlink => symlink(target, at).unwrap(),
        Plant::Fifo => mkfifo(at),
    }
}

fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(store.join("chunks")).unwrap() {
        let d = d.unwrap().path();
        if d.is_dir() {
            for f in std::fs::read_dir(&d).unwrap() {
                v.push(f.unwrap().path());
            }
        }
    }
    v.sort();
    v
}

fn next_seq(store: &Path) -> u64 {
    std::fs::read_dir(store.join("meta"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            let rest = n
                .strip_prefix("journal-")
                .or_else(|| n.strip_prefix("checkpoint-"))?
                .to_string();
            u64::from_str_radix(&rest, 16).ok()
        })
        .max()
        .unwrap_or(0)
        + 1
}

/// Plant `how` at the entries of kind `entry` in `store`; returns the
/// words a refusal must contain (one of them).
fn plant_entry(store: &Path, entry: &str, how: Plant, canary: &Canary) -> Vec<String> {
    match entry {
        "lock" => {
            plant(&store.join("lock"), how, &canary.file);
            vec!["lock".into()]
        }
        "recycle" => {
            for e in std::fs::read_dir(store.join("recycle")).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
            plant(&store.join("recycle/r0"), how, &canary.file);
            vec!["recycle/r0".into()]
        }
        "chunk" => {
            let c = chunk_files(store).into_iter().next().expect("a chunk");
            plant(&c, how, &canary.file);
            let name = c.file_name().unwrap().to_string_lossy().to_string();
            vec![name]
        }
        "meta-tmp" => {
            let n = next_seq(store);
            for seq in n..n + 8 {
                for kind in ["journal", "checkpoint"] {
                    let p = store.join(format!("meta/.tmp-{kind}-{seq:016x}"));
                    plant(&p, how, &canary.file);
                }
            }
            vec![".tmp-".into()]
        }
        "header-tmp" => {
            plant(&store.join(".tmp-sealfs.store"), how, &canary.file);
            vec![".tmp-sealfs.store".into()]
        }
        "manifest" => {
            plant(
                &store.join("meta/snapshot-00000000deadbeef"),
                how,
                &canary.file,
            );
            vec!["snapshot-00000000deadbeef".into()]
        }
        "fanout" => {
            // every empty fan-out directory: new chunks land in them
            let mut words = Vec::new();
            for d in std::fs::read_dir(store.join("chunks")).unwrap() {
                let d = d.unwrap().path();
                if std::fs::read_dir(&d).unwrap().next().is_none() {
                    plant(&d, how, &canary.dir);
                    words.push(format!(
                        "chunks/{}",
                        d.file_name().unwrap().to_string_lossy()
                    ));
                }
            }
            assert!(words.len() > 100, "expected many empty fan-out directories");
            words
        }
        other => panic!("unknown entry {other}"),
    }
}

/// Every command that touches a store, against the planted entry.
fn every_command(c: &Case, words: &[String], canary: &Canary, label: &str) {
    let st = s(&c.store);
    let clone1 = c.dir.join("clone1");
    let clone2 = c.dir.join("clone2");
    let mp = c.dir.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let runs: Vec<(String, Output)> = vec![
        ("info".into(), c.sealfs(&["info", st])),
        ("fsck".into(), c.sealfs(&["fsck", st])),
        ("gc".into(), c.sealfs(&["gc", st])),
        ("rewrap".into(), c.sealfs(&["rewrap", st])),
        (
            "snapshot create".into(),
            c.sealfs(&["snapshot", "create", st, "snap1"]),
        ),
        (
            "clone from a snapshot".into(),
            c.sealfs(&["clone", &format!("{st}@snap1"), s(&clone1)]),
        ),
        (
            "snapshot delete".into(),
            c.sealfs(&["snapshot", "delete", st, "snap1"]),
        ),
        ("clone".into(), c.sealfs(&["clone", st, s(&clone2)])),
        ("fsck --repair".into(), c.sealfs(&["fsck", "--repair", st])),
        ("rekey".into(), c.sealfs(&["rekey", st])),
    ];
    let mut all = runs;
    // mount, write and delete (new chunks, recycled files, commits), umount
    let out = c.sealfs(&["mount", st, s(&mp)]);
    let mounted = out.status.success();
    all.push(("mount".into(), out));
    if mounted {
        let _guard = BgGuard(mp.clone());
        for i in 0..3 {
            let data: Vec<u8> = (0..200_000u32).map(|x| (x ^ i) as u8).collect();
            let p = mp.join(format!("new{i}"));
            // (a write may fail with EIO on a planted chunk; that is fine)
            if std::fs::write(&p, &data).is_ok() {
                if let Ok(f) = std::fs::File::open(&p) {
                    let _ = f.sync_all();
                }
            }
        }
        let _ = std::fs::remove_file(mp.join("new0"));
        let _ = std::fs::remove_file(mp.join("dir/big0"));
        let _ = Command::new("sync").arg("-f").arg(&mp).status();
        let mut u = c.cmd();
        u.args(["umount", s(&mp)]);
        all.push(("umount".into(), run(u, "sealfs umount")));
    }
    all.push(("info again".into(), c.sealfs(&["info", st])));
    canary.check(label);
    for (what, out) in &all {
        if out.status.success() {
            continue;
        }
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            words.iter().any(|w| err.contains(w.as_str())),
            "{label}: `{what}` failed without naming the planted entry ({words:?}): {err}"
        );
    }
    // the store was never written through: nothing outside it appeared
    assert!(!c.dir.join("canary-dir").join("chunks").exists());
}

fn hostile(entry: &str) {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let tmpl = template(&env);
    for how in [Plant::Symlink, Plant::Fifo] {
        let label = format!("{entry} as a {how:?}");
        let dir = env.path(&format!("case-{entry}-{how:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let canary = Canary::new(&dir);
        let store = dir.join("store");
        copy_dir(&tmpl, &store);
        let words = plant_entry(&store, entry, how, &canary);
        let c = Case {
            env: &env,
            dir: dir.clone(),
            store,
        };
        every_command(&c, &words, &canary, &label);
    }
}

#[test]
fn hostile_lock_file() {
    hostile("lock");
}

#[test]
fn hostile_recycled_chunk_file() {
    hostile("recycle");
}

#[test]
fn hostile_chunk_object() {
    hostile("chunk");
}

#[test]
fn hostile_metadata_temp_files() {
    hostile("meta-tmp");
}

#[test]
fn hostile_header_temp_file() {
    hostile("header-tmp");
}

#[test]
fn hostile_snapshot_manifest() {
    hostile("manifest");
}

#[test]
fn hostile_fanout_directories() {
    hostile("fanout");
}

/// A clone's destination that is a symlink to a directory outside is not
/// written through.
#[test]
fn clone_destination_symlink_is_not_followed() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("src");
    let outside = env.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let dest = env.path("dest");
    symlink(&outside, &dest).unwrap();
    let out = env.sealfs(&["clone", s(&store), s(&dest)]);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "clone wrote into the directory its destination links to: {}",
        stderr(&out)
    );
    if !out.status.success() {
        assert!(stderr(&out).contains("dest"), "{}", stderr(&out));
    }
}

/// Deleting `STORE/lock` under a live mount does not let a second writer
/// in: every command that changes the store is refused naming the mount,
/// and the mounted volume loses nothing that was fsynced.
#[test]
fn deleted_lock_file_does_not_let_a_second_writer_in() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    let mut f = std::fs::File::create(m.path("kept")).unwrap();
    std::io::Write::write_all(&mut f, b"fsynced before the lock file went\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::remove_file(store.join("lock")).unwrap();
    let mp2 = env.path("mnt2");
    std::fs::create_dir(&mp2).unwrap();
    let mp = m.mountpoint.to_str().unwrap().to_string();
    for args in [
        vec!["mount", s(&store), s(&mp2)],
        vec!["fsck", "--repair", s(&store)],
        vec!["rekey", s(&store)],
        vec!["rewrap", s(&store)],
    ] {
        let mut c = env.cmd();
        c.args(&args);
        let out = run(c, &args.join(" "));
        let _g = BgGuard(mp2.clone());
        assert!(!out.status.success(), "`{}` was let in", args.join(" "));
        let err = stderr(&out);
        assert!(
            err.contains(&mp),
            "`{}` refused without naming the live mount {mp}: {err}",
            args.join(" ")
        );
        assert!(!is_mounted(&mp2));
    }
    // offline commands that bypass the mount table still meet the lease
    let mut c = env.cmd();
    c.args(["snapshot", "create", s(&store), "x"]);
    let out = run(c, "snapshot create");
    // (through the daemon: it is mounted) the snapshot is taken safely
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = env.cmd();
    c.args(["gc", s(&store)]);
    let out = run(c, "gc");
    assert!(
        out.status.success(),
        "gc through the mount: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(m.path("kept")).unwrap(),
        b"fsynced before the lock file went\n"
    );
    m.unmount();
    let m = env.mount(&store, "mnt3", &[]);
    assert_eq!(
        std::fs::read(m.path("kept")).unwrap(),
        b"fsynced before the lock file went\n"
    );
    m.unmount();
}
