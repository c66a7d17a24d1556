//! Stricter POSIX details (issue 16), through real mounts with ordinary
//! tools (`xfs_io` from xfsprogs, `stat`, `mount`) and plain syscalls:
//! SEEK_DATA/SEEK_HOLE with data still in the kernel's cache, fallocate
//! space checks, set-user-ID/set-group-ID rules, rename over open files,
//! timestamps against the kernel's clock, atime modes.

mod common;
use common::*;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FallocateFlags, SeekFrom};

const MIB: u64 = 1 << 20;

fn setup(opts: &[&str]) -> (Env, std::path::PathBuf, Mount) {
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", opts);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o777)).unwrap();
    (env, store, m)
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): stdout {} stderr {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// `xfs_io` with the given commands on `path`, as root or as `uid:gid`.
fn xfs_io(path: &Path, cmds: &[&str], as_user: Option<(u32, u32)>) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("xfs_io");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(path);
    if let Some((u, g)) = as_user {
        c.uid(u).gid(g).current_dir("/");
    }
    c.output()
        .expect("xfs_io (package xfsprogs; scripts/deps.sh installs it)")
}

/// The value `xfs_io -c "seek -d|-h OFF"` prints after DATA/HOLE.
fn xfs_io_seek_results(out: &Output) -> Vec<(String, String)> {
    stdout(out)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let k = w.next()?;
            let v = w.next()?;
            (k == "DATA" || k == "HOLE").then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

// ---------------------------------------------------------------------------
// SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------

#[test]
fn seek_data_hole_sees_writes_still_in_the_kernel_cache() {
    if !require_fuse() {
        return;
    }
    let (_env, _store, m) = setup(&[]);
    // A new file, 4 KiB written at 1 MiB, no fsync, the fd still open.
    let p = m.path("sparse");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(&[0x5a; 4096], MIB).unwrap();
    let data = rustix::fs::seek(&f, SeekFrom::Data(0)).unwrap();
    assert_eq!(data, MIB, "SEEK_DATA from 0 before any writeback");
    let hole = rustix::fs::seek(&f, SeekFrom::Hole(MIB)).unwrap();
    assert_eq!(hole, MIB + 4096, "SEEK_HOLE from 1 MiB: the end");
    let hole = rustix::fs::seek(&f, SeekFrom::Hole(0)).unwrap();
    assert_eq!(hole, 0, "SEEK_HOLE from 0: the hole before the data");
    // More cached data after committed data: a second region at 3 MiB.
    f.write_all_at(&[0x33; 100], 3 * MIB).unwrap();
    let data = rustix::fs::seek(&f, SeekFrom::Data(MIB + 8192)).unwrap();
    assert_eq!(data, 3 * MIB, "SEEK_DATA past the first region");
    let hole = rustix::fs::seek(&f, SeekFrom::Hole(3 * MIB)).unwrap();
    assert_eq!(hole, 3 * MIB + 100, "SEEK_HOLE at the new end");
    // The data is intact afterwards.
    let mut b = [0u8; 4096];
    f.read_exact_at(&mut b, MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    drop(f);

    // The same with xfs_io in one process (write, then seek, no close).
    let q = m.path("sparse2");
    let out = run_ok(
        Command::new("xfs_io")
            .args([
                "-f",
                "-c",
                "pwrite -q 1m 4k",
                "-c",
                "seek -d 0",
                "-c",
                "seek -h 1m",
            ])
            .arg(&q),
    );
    assert!(out.status.success(), "xfs_io: {}", stderr(&out));
    let r = xfs_io_seek_results(&out);
    assert_eq!(
        r,
        vec![
            ("DATA".to_string(), "1048576".to_string()),
            ("HOLE".to_string(), "1052672".to_string())
        ],
        "xfs_io seek output: {}",
        stdout(&out)
    );
    m.unmount();
}

// ---------------------------------------------------------------------------
// set-user-ID / set-group-ID
// ---------------------------------------------------------------------------

#[test]
fn chown_by_root_keeps_setgid_without_group_execute() {
    if !require_fuse() {
        return;
    }
    let (uid, gid, _) = test_user();
    let (_env, _store, m) = setup(&[]);
    let cases = [
        // (mode before, mode after a chown by root), as on ext4
        (0o2644, 0o2644), // setgid without g+x: mandatory-locking mark, kept
        (0o6755, 0o0755), // setuid always cleared, setgid with g+x cleared
        (0o4644, 0o0644),
        (0o2755, 0o0755),
    ];
    for (i, (before, after)) in cases.iter().enumerate() {
        let p = m.path(&format!("f{i}"));
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*before)).unwrap();
        assert_eq!(mode_of(&p), *before);
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        assert_eq!(
            mode_of(&p),
            *after,
            "chown of a {before:o} file by root: got {:o}, want {after:o}",
            mode_of(&p)
        );
    }
    // A directory keeps both bits on chown.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
    assert_eq!(mode_of(&d), 0o2775);
    m.unmount();
}

#[test]
fn fallocate_punch_zero_by_non_owner_clear_setuid_setgid() {
    if !require_fuse() {
        return;
    }
    let (uid, gid, _) = test_user();
    let (_env, _store, m) = setup(&["allow_other"]);
    for (i, cmd) in ["falloc 0 8192", "fpunch 0 4096", "fzero 0 4096"]
        .iter()
        .enumerate()
    {
        let p = m.path(&format!("s{i}"));
        fs::write(&p, vec![7u8; 16384]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
        assert_eq!(mode_of(&p), 0o6777);
        let out = xfs_io(&p, &[cmd], Some((uid, gid)));
        assert!(out.status.success(), "xfs_io {cmd}: {}", stderr(&out));
        assert_eq!(
            mode_of(&p),
            0o0777,
            "after `{cmd}` by a non-owner both bits must be gone (as write does), got {:o}",
            mode_of(&p)
        );
    }
    // Root (CAP_FSETID) keeps them, as with write.
    let p = m.path("root");
    fs::write(&p, vec![7u8; 16384]).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
    let out = xfs_io(&p, &["falloc 0 32768", "fpunch 0 4096"], None);
    assert!(out.status.success(), "xfs_io as root: {}", stderr(&out));
    assert_eq!(mode_of(&p), 0o6777);
    // And a write by the non-owner clears them too (the reference).
    let p = m.path("w");
    fs::write(&p, vec![7u8; 16384]).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
    let out = xfs_io(&p, &["pwrite -q 0 10"], Some((uid, gid)));
    assert!(out.status.success(), "xfs_io pwrite: {}", stderr(&out));
    assert_eq!(mode_of(&p), 0o0777);
    m.unmount();
}

#[test]
fn setuid_set_after_a_write_survives_writeback() {
    if !require_fuse() {
        return;
    }
    let (uid, gid, _) = test_user();
    let (env, store, m) = setup(&[]);
    let p = m.path("prog");
    fs::write(&p, b"").unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    // Write, then chmod u+s through the same fd before it is closed: the
    // cached data reaches the daemon only at close (writeback), after the
    // chmod, and must not take the bit away then.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o4755))
        .unwrap();
    drop(f);
    assert_eq!(mode_of(&p), 0o4755);
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(mode_of(&m.path("prog")), 0o4755, "after remount");
    m.unmount();
}

// ---------------------------------------------------------------------------
// rename over an open file or directory
// ---------------------------------------------------------------------------

#[test]
fn rename_over_open_file_and_directory_keeps_fstat_working() {
    if !require_fuse() {
        return;
    }
    let (_env, _store, m) = setup(&[]);
    fs::write(m.path("victim"), b"old content").unwrap();
    fs::write(m.path("new"), b"new content").unwrap();
    let f = File::open(m.path("victim")).unwrap();
    let ino = f.metadata().unwrap().ino();
    fs::rename(m.path("new"), m.path("victim")).unwrap();
    let md = f.metadata().expect("fstat of a file renamed over");
    assert_eq!(md.nlink(), 0, "nlink of the replaced file");
    assert_eq!(md.ino(), ino);
    assert_eq!(md.len(), 11);
    let mut b = [0u8; 11];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"old content");
    assert_eq!(fs::read(m.path("victim")).unwrap(), b"new content");
    drop(f);

    fs::create_dir(m.path("d1")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    let d = File::open(m.path("d1")).unwrap();
    let dino = d.metadata().unwrap().ino();
    fs::rename(m.path("d2"), m.path("d1")).unwrap();
    // fstat(2) on the directory fd (the kernel may answer nlink from its
    // own copy; the daemon must not make it fail)
    let md = d.metadata().expect("fstat of a directory renamed over");
    assert_eq!(md.ino(), dino);
    assert_eq!(md.nlink(), 0, "nlink of the replaced directory");
    drop(d);
    m.unmount();
}

// ---------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------

fn ts(t: SystemTime) -> (i64, i64) {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() as i64, d.subsec_nanos() as i64)
}

fn ctime(md: &fs::Metadata) -> (i64, i64) {
    (md.ctime(), md.ctime_nsec())
}

fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

/// How far behind CLOCK_REALTIME the kernel's own timestamps of a
/// regular file may be: the kernel stamps them with its coarse clock (one
/// tick, at most 10 ms with HZ=100; FUSE gets no fine-grained timestamps).
const KERNEL_TICK_NS: i64 = 10_000_000;

fn minus_tick(t: (i64, i64)) -> (i64, i64) {
    let ns = t.0 as i128 * 1_000_000_000 + t.1 as i128 - KERNEL_TICK_NS as i128;
    (
        (ns.div_euclid(1_000_000_000)) as i64,
        ns.rem_euclid(1_000_000_000) as i64,
    )
}

#[test]
fn timestamps_never_before_a_clock_reading_taken_before_the_operation() {
    if !require_fuse() {
        return;
    }
    let (_env, _store, m) = setup(&[]);
    fs::create_dir(m.path("dir")).unwrap();
    for round in 0..30 {
        // Times the daemon sets: never before the clock reading.
        let check = |what: &str, t0: (i64, i64), got: (i64, i64)| {
            assert!(
                got >= t0,
                "round {round}: {what} = {got:?} is before the clock reading {t0:?} taken \
                 just before the operation"
            );
        };
        // Times of a regular file's data and attribute changes, which the
        // kernel sets itself under the writeback cache (README limitations).
        let check_kernel = |what: &str, t0: (i64, i64), got: (i64, i64)| {
            assert!(
                got >= minus_tick(t0),
                "round {round}: {what} = {got:?} is more than one kernel tick before the \
                 clock reading {t0:?} taken just before the operation"
            );
        };
        let dir = m.path("dir");
        let f = m.path(&format!("dir/f{round}"));
        let t0 = ts(SystemTime::now());
        File::create(&f).unwrap();
        let md = fs::metadata(&f).unwrap();
        check("create ctime", t0, ctime(&md));
        check("create mtime", t0, mtime(&md));
        let pd = fs::metadata(&dir).unwrap();
        check("parent mtime after create", t0, mtime(&pd));
        check("parent ctime after create", t0, ctime(&pd));

        let sub = m.path(&format!("dir/sub{round}"));
        let t0 = ts(SystemTime::now());
        fs::create_dir(&sub).unwrap();
        check("mkdir ctime", t0, ctime(&fs::metadata(&sub).unwrap()));
        check(
            "parent mtime after mkdir",
            t0,
            mtime(&fs::metadata(&dir).unwrap()),
        );

        let t0 = ts(SystemTime::now());
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        check(
            "chmod ctime (directory)",
            t0,
            ctime(&fs::metadata(&sub).unwrap()),
        );

        let sub2 = m.path(&format!("dir/sub{round}-renamed"));
        let t0 = ts(SystemTime::now());
        fs::rename(&sub, &sub2).unwrap();
        check(
            "rename ctime (directory)",
            t0,
            ctime(&fs::metadata(&sub2).unwrap()),
        );
        check(
            "parent mtime after rename",
            t0,
            mtime(&fs::metadata(&dir).unwrap()),
        );

        let l = m.path(&format!("dir/sym{round}"));
        let t0 = ts(SystemTime::now());
        std::os::unix::fs::symlink("target", &l).unwrap();
        check(
            "symlink ctime",
            t0,
            ctime(&fs::symlink_metadata(&l).unwrap()),
        );

        let t0 = ts(SystemTime::now());
        fs::remove_file(&l).unwrap();
        check(
            "parent mtime after unlink",
            t0,
            mtime(&fs::metadata(&dir).unwrap()),
        );

        // regular file, kernel-stamped
        let t0 = ts(SystemTime::now());
        let h = OpenOptions::new().write(true).open(&f).unwrap();
        h.write_all_at(b"more", 2).unwrap();
        h.sync_all().unwrap();
        let md = h.metadata().unwrap();
        drop(h);
        check_kernel("write mtime", t0, mtime(&md));
        check_kernel("write ctime", t0, ctime(&md));

        let t0 = ts(SystemTime::now());
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        check_kernel("chmod ctime (file)", t0, ctime(&fs::metadata(&f).unwrap()));

        let t0 = ts(SystemTime::now());
        let h = OpenOptions::new().write(true).open(&f).unwrap();
        h.set_len(1).unwrap();
        let md = h.metadata().unwrap();
        drop(h);
        check_kernel("truncate mtime", t0, mtime(&md));
        std::thread::sleep(Duration::from_millis(3));
    }
    m.unmount();
}

// ---------------------------------------------------------------------------
// fallocate
// ---------------------------------------------------------------------------

/// Free bytes for unprivileged use, as statfs(2) on the mount reports.
fn free_bytes(p: &Path) -> u64 {
    let s = rustix::fs::statvfs(p).unwrap();
    s.f_bavail * s.f_frsize
}

#[test]
fn fallocate_beyond_free_space_fails_enospc_and_keep_size_keeps_size() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup(&[]);
    let p = m.path("big");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    let free = free_bytes(&m.mountpoint);
    assert!(free > 0);
    let too_much = free + (1 << 30);
    for (flags, what) in [
        (FallocateFlags::empty(), "mode 0"),
        (FallocateFlags::KEEP_SIZE, "KEEP_SIZE"),
        (FallocateFlags::ZERO_RANGE, "ZERO_RANGE"),
    ] {
        let r = rustix::fs::fallocate(&f, flags, 0, too_much);
        assert_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(libc::ENOSPC),
            "{what} fallocate of {too_much} bytes with {free} free"
        );
        assert_eq!(f.metadata().unwrap().len(), 65536, "{what}: size unchanged");
    }
    // The part that already holds data does not count: re-allocating the
    // written 64 KiB always fits.
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 65536).unwrap();
    // Punching a hole never needs space.
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        too_much,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 65536);
    drop(f);

    // KEEP_SIZE: writes inside the allocated range do not change the size
    // unless they go past it; as with xfs_io on ext4.
    let q = m.path("keep");
    fs::write(&q, vec![2u8; 65536]).unwrap();
    let out = xfs_io(
        &q,
        &[
            "falloc -k 0 1m",
            "pwrite -q 0 4096",
            "pwrite -q 60000 5536",
            "fsync",
        ],
        None,
    );
    assert!(out.status.success(), "xfs_io: {}", stderr(&out));
    assert_eq!(
        fs::metadata(&q).unwrap().len(),
        65536,
        "writes inside the size"
    );
    let out = xfs_io(&q, &["pwrite -q 100000 4000", "fsync"], None);
    assert!(out.status.success(), "xfs_io: {}", stderr(&out));
    assert_eq!(
        fs::metadata(&q).unwrap().len(),
        104000,
        "a write past the size"
    );
    // Mode 0 within the free space succeeds and sets the size.
    let r = m.path("ok");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&r)
        .unwrap();
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 8 * MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8 * MIB);
    f.write_all_at(&[3u8; 4096], MIB).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8 * MIB);
    drop(f);
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(fs::metadata(m.path("keep")).unwrap().len(), 104000);
    assert_eq!(fs::metadata(m.path("ok")).unwrap().len(), 8 * MIB);
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), 65536);
    m.unmount();
}

// ---------------------------------------------------------------------------
// atime
// ---------------------------------------------------------------------------

fn atime(p: &Path) -> (i64, i64) {
    let md = fs::metadata(p).unwrap();
    (md.atime(), md.atime_nsec())
}

fn cat(p: &Path) {
    let out = run_ok(Command::new("cat").arg(p));
    assert!(!out.stdout.is_empty());
}

/// A file whose atime (year 2001) is older than its mtime and ctime.
fn old_atime_file(m: &Mount, name: &str) -> std::path::PathBuf {
    let p = m.path(name);
    fs::write(&p, b"some content\n").unwrap();
    run_ok(
        Command::new("touch")
            .args(["-a", "-d", "@1000000000"])
            .arg(&p),
    );
    assert_eq!(atime(&p).0, 1_000_000_000);
    p
}

#[test]
fn atime_relatime_by_default() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup(&[]);
    let p = old_atime_file(&m, "f");
    let t0 = ts(SystemTime::now());
    cat(&p);
    let a1 = atime(&p);
    assert!(
        a1 >= t0,
        "relatime: a read of a file with atime older than mtime updates it: {a1:?} < {t0:?}"
    );
    // atime is now newer than mtime and ctime: another read leaves it.
    std::thread::sleep(Duration::from_millis(20));
    cat(&p);
    assert_eq!(atime(&p), a1, "relatime: a second read keeps atime");
    // A change makes the next read update again.
    fs::write(&p, b"changed\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t1 = ts(SystemTime::now());
    cat(&p);
    let a2 = atime(&p);
    assert!(a2 >= t1, "relatime after a change: {a2:?} < {t1:?}");
    // Directories: listing one updates its atime the same way.
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/x"), b"x").unwrap();
    run_ok(
        Command::new("touch")
            .args(["-a", "-d", "@1000000000"])
            .arg(m.path("d")),
    );
    let t2 = ts(SystemTime::now());
    run_ok(Command::new("ls").arg(m.path("d")));
    assert!(atime(&m.path("d")) >= t2, "relatime on readdir");
    // It is committed.
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(atime(&m.path("f")), a2, "atime after remount");
    m.unmount();
}

#[test]
fn atime_noatime_and_strictatime() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &["noatime"]);
    let p = old_atime_file(&m, "f");
    cat(&p);
    run_ok(Command::new("ls").arg(&m.mountpoint));
    assert_eq!(atime(&p).0, 1_000_000_000, "noatime: reads leave atime");
    m.unmount();

    let m = env.mount(&store, "mnt", &["strictatime"]);
    let p = m.path("f");
    assert_eq!(
        atime(&p).0,
        1_000_000_000,
        "noatime kept it through remount"
    );
    cat(&p);
    let a1 = atime(&p);
    assert!(a1.0 > 1_000_000_000, "strictatime: first read updates");
    std::thread::sleep(Duration::from_millis(20));
    let t0 = ts(SystemTime::now());
    cat(&p);
    let a2 = atime(&p);
    assert!(
        a2 >= t0 && a2 > a1,
        "strictatime: every read (open) updates: {a1:?} then {a2:?}"
    );
    m.unmount();

    // relatime given explicitly (as mount(8) may pass it) is the default
    let m = env.mount(&store, "mnt", &["relatime"]);
    let a = atime(&m.path("f"));
    cat(&m.path("f"));
    assert_eq!(
        atime(&m.path("f")),
        a,
        "relatime: atime newer than mtime stays"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------
// remount,ro / remount,rw
// ---------------------------------------------------------------------------

fn touch_errno(p: &Path) -> Option<i32> {
    match fs::write(p, b"x") {
        Ok(()) => None,
        Err(e) => e.raw_os_error(),
    }
}

#[test]
fn remount_ro_commits_and_rw_writes_again() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    // No background commit within the test: only the remount commits.
    let m = env.mount(&store, "mnt", &["commit_interval=3600"]);
    let remount = |how: &str| {
        env.sealfs(&[
            "mount",
            "-o",
            how,
            store.to_str().unwrap(),
            m.mountpoint.to_str().unwrap(),
        ])
    };
    fs::write(m.path("a"), vec![0xa5u8; 300_000]).unwrap();
    // A file open for writing keeps the mount from turning read-only.
    let busy = OpenOptions::new().write(true).open(m.path("a")).unwrap();
    let out = remount("remount,ro");
    assert_failed(
        &out,
        &["read-only", "open for writing"],
        "remount,ro while busy",
    );
    drop(busy);

    let out = remount("remount,ro");
    assert!(out.status.success(), "remount,ro: {}", stderr(&out));
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.mountpoint.to_str().unwrap()))
        .unwrap();
    assert!(
        line.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "mountinfo after remount,ro: {line}"
    );
    assert_eq!(touch_errno(&m.path("new")), Some(libc::EROFS));
    assert_eq!(touch_errno(&m.path("a")), Some(libc::EROFS));
    assert_eq!(fs::read(m.path("a")).unwrap().len(), 300_000);

    let out = remount("remount,rw");
    assert!(out.status.success(), "remount,rw: {}", stderr(&out));
    fs::write(m.path("b"), b"written after remount,rw").unwrap();
    let out = remount("remount,ro");
    assert!(out.status.success(), "second remount,ro: {}", stderr(&out));
    // Both writes were committed by going read-only: they survive the
    // daemon's death.
    m.kill9();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(fs::read(m.path("a")).unwrap(), vec![0xa5u8; 300_000]);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"written after remount,rw");
    m.unmount();

    // A volume mounted read-only cannot be remounted read-write.
    let m = env.mount(&store, "mnt", &["ro"]);
    let out = env.sealfs(&[
        "mount",
        "-o",
        "remount,rw",
        store.to_str().unwrap(),
        m.mountpoint.to_str().unwrap(),
    ]);
    assert_failed(
        &out,
        &["mounted read-only", "mount it again"],
        "remount,rw of ro",
    );
    assert_eq!(touch_errno(&m.path("c")), Some(libc::EROFS));
    m.unmount();
}

/// Needs the helper installed (`scripts/install.sh`, which scripts/test.sh
/// runs first): mount(8) runs /sbin/mount.fuse.sealfs for a remount.
#[test]
fn remount_through_mount8_and_the_helper() {
    if !require_fuse() {
        return;
    }
    assert!(
        Path::new("/sbin/mount.fuse.sealfs").exists(),
        "/sbin/mount.fuse.sealfs is missing: run scripts/install.sh"
    );
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &["commit_interval=3600"]);
    fs::write(m.path("a"), b"before remount").unwrap();
    // mount(8) looks the source up in the mount table and runs the helper
    // with the daemon's environment missing: remount needs neither keys
    // nor a keystore.
    let out = run_ok(
        Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&m.mountpoint),
    );
    let _ = out;
    assert_eq!(touch_errno(&m.path("x")), Some(libc::EROFS));
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&m.mountpoint),
    );
    fs::write(m.path("b"), b"after").unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&m.mountpoint),
    );
    m.kill9();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(fs::read(m.path("a")).unwrap(), b"before remount");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"after");
    m.unmount();
}

/// While a mount is remounted read-only, reads change nothing: atime stays
/// (also after the daemon's final commit), the store is not written, and
/// `sealfs status` shows the mount read-only.
#[test]
fn remount_ro_reads_commit_nothing_and_status_shows_it() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    // Background commits every second: a changed atime would be committed.
    let m = env.mount(&store, "mnt", &["commit_interval=1"]);
    let p = old_atime_file(&m, "f");
    let remount = |how: &str| {
        let out = env.sealfs(&[
            "mount",
            "-o",
            how,
            store.to_str().unwrap(),
            m.mountpoint.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{how}: {}", stderr(&out));
    };
    remount("remount,ro");
    let e = status_entry(&env, &m.mountpoint).expect("mount listed in status");
    assert_eq!(e["read_only"], serde_json::json!(true), "status: {e}");
    let human = stdout(&env.sealfs(&["status"]));
    assert!(human.contains("live, read-only"), "status: {human}");
    std::thread::sleep(Duration::from_millis(1200));
    let before = snapshot_store(&store);
    // relatime: atime (2001) is older than mtime, so a read-write mount
    // would update it on this read.
    cat(&p);
    fs::read_dir(&m.mountpoint).unwrap().for_each(drop);
    assert_eq!(atime(&p).0, 1_000_000_000, "atime changed on a ro mount");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        snapshot_store(&store) == before,
        "the store was written while the mount was read-only"
    );
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(atime(&m.path("f")).0, 1_000_000_000);
    // Back to read-write, reads update atime again.
    let m2 = m;
    let out = env.sealfs(&[
        "mount",
        "-o",
        "remount,ro",
        store.to_str().unwrap(),
        m2.mountpoint.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.sealfs(&[
        "mount",
        "-o",
        "remount,rw",
        store.to_str().unwrap(),
        m2.mountpoint.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = status_entry(&env, &m2.mountpoint).expect("mount listed in status");
    assert_eq!(e["read_only"], serde_json::json!(false), "status: {e}");
    cat(&m2.path("f"));
    assert!(
        atime(&m2.path("f")).0 > 1_000_000_000,
        "rw read keeps atime"
    );
    m2.unmount();
}

// security.* / trusted.* xattrs, file capabilities
// ---------------------------------------------------------------------------

fn getcap(p: &Path) -> String {
    stdout(&run_ok(Command::new("getcap").arg(p)))
}

/// In `dir`: a binary copied in with cp(1), given a capability, then
/// appended to by root. Returns getcap's output before and after that
/// write.
fn capability_across_write(dir: &Path) -> (String, String) {
    let t = dir.join("prog");
    run_ok(Command::new("cp").arg("/bin/true").arg(&t));
    run_ok(
        Command::new("setcap")
            .arg("cap_net_bind_service+ep")
            .arg(&t),
    );
    let before = getcap(&t);
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("printf y >> \"$1\"")
            .arg("sh")
            .arg(&t),
    );
    (before, getcap(&t))
}

#[test]
fn security_and_trusted_xattrs_and_capabilities_like_ext4() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup(&[]);
    // The host file system (ext4 or the like, where the test's temporary
    // directory lives) is the reference.
    let host = env.path("host");
    fs::create_dir(&host).unwrap();
    let (hb, ha) = capability_across_write(&host);
    assert!(hb.contains("cap_net_bind_service=ep"), "host getcap: {hb}");
    let (sb, sa) = capability_across_write(&m.mountpoint);
    assert!(
        sb.contains("cap_net_bind_service=ep"),
        "sealfs getcap: {sb}"
    );
    assert_eq!(
        ha.is_empty(),
        sa.is_empty(),
        "capability after a write: host {ha:?}, sealfs {sa:?}"
    );
    assert!(sa.is_empty(), "a write kept the capability: {sa}");

    // setcap/getcap, trusted.* and security.* as root; they survive a
    // remount.
    let p = m.path("prog");
    run_ok(Command::new("setcap").arg("cap_net_raw+ep").arg(&p));
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    run_ok(
        Command::new("setfattr")
            .args(["-n", "trusted.overlay.opaque", "-v", "y"])
            .arg(&f),
    );
    run_ok(
        Command::new("setfattr")
            .args(["-n", "security.label", "-v", "lbl"])
            .arg(&f),
    );
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert!(getcap(&m.path("prog")).contains("cap_net_raw=ep"));
    let out = stdout(&run_ok(
        Command::new("getfattr")
            .args(["-d", "-m", "-"])
            .arg(m.path("f")),
    ));
    assert!(out.contains("trusted.overlay.opaque=\"y\""), "{out}");
    assert!(out.contains("security.label=\"lbl\""), "{out}");
    // chown clears the capability too (the kernel asks the daemon to).
    run_ok(Command::new("chown").arg("1:1").arg(m.path("prog")));
    assert_eq!(getcap(&m.path("prog")), "");
    // The kernel's permission rules hold: trusted.* needs CAP_SYS_ADMIN,
    // setting a capability CAP_SETFCAP.
    let fs_ = m.path("f");
    for (cap, cmd) in [
        (
            "cap_sys_admin",
            format!("setfattr -n trusted.z -v 1 '{}'", fs_.display()),
        ),
        (
            "cap_setfcap",
            format!("setcap cap_net_raw+ep '{}'", m.path("prog").display()),
        ),
    ] {
        let out = Command::new("capsh")
            .arg(format!("--drop={cap}"))
            .args(["--", "-c", &cmd])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd} without {cap} succeeded");
    }
    assert_eq!(getcap(&m.path("prog")), "");
    let out = stdout(&run_ok(
        Command::new("getfattr")
            .args(["-d", "-m", "trusted"])
            .arg(&fs_),
    ));
    assert!(!out.contains("trusted.z"), "{out}");

    m.unmount();
}

// RENAME_WHITEOUT, O_TMPFILE
// ---------------------------------------------------------------------------

#[test]
fn rename_whiteout_leaves_a_whiteout_and_overlayfs_upper_works() {
    if !require_fuse() {
        return;
    }
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let (env, store, m) = setup(&[]);
    fs::write(m.path("a"), b"moved").unwrap();
    renameat_with(CWD, m.path("a"), CWD, m.path("b"), RenameFlags::WHITEOUT).unwrap();
    let check = |m: &Mount| {
        let md = fs::symlink_metadata(m.path("a")).unwrap();
        assert_eq!(md.mode() & libc::S_IFMT, libc::S_IFCHR, "whiteout type");
        assert_eq!(md.rdev(), 0, "whiteout device");
        assert_eq!(fs::read(m.path("b")).unwrap(), b"moved");
    };
    check(&m);
    // not with RENAME_EXCHANGE (as the kernel's other file systems)
    fs::write(m.path("c"), b"c").unwrap();
    let e = renameat_with(
        CWD,
        m.path("b"),
        CWD,
        m.path("c"),
        RenameFlags::WHITEOUT | RenameFlags::EXCHANGE,
    )
    .unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EINVAL);
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    check(&m);

    // overlayfs with its upper directory on sealfs: removing a lower file
    // leaves a whiteout in the upper directory.
    let lower = env.path("lower");
    fs::create_dir(&lower).unwrap();
    fs::write(lower.join("l"), b"lower").unwrap();
    fs::create_dir(m.path("up")).unwrap();
    fs::create_dir(m.path("work")).unwrap();
    let ov = env.path("ov");
    fs::create_dir(&ov).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                m.path("up").display(),
                m.path("work").display()
            ))
            .arg(&ov),
    );
    let r = fs::remove_file(ov.join("l"));
    let listed = fs::read_dir(&ov).unwrap().count();
    run_ok(Command::new("umount").arg(&ov));
    r.unwrap();
    assert_eq!(listed, 0, "the lower file still shows in the overlay");
    let md = fs::symlink_metadata(m.path("up/l")).unwrap();
    assert_eq!(md.mode() & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(md.rdev(), 0);
    m.unmount();
}

/// fuser 0.18 has no FUSE_TMPFILE: the kernel turns its ENOSYS into
/// EOPNOTSUPP, as README's limitations say.
#[test]
fn o_tmpfile_fails_with_eopnotsupp() {
    if !require_fuse() {
        return;
    }
    use rustix::fs::{openat, Mode, OFlags, CWD};
    let (_env, _store, m) = setup(&[]);
    for _ in 0..2 {
        let e = openat(
            CWD,
            &m.mountpoint,
            OFlags::TMPFILE | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), libc::EOPNOTSUPP);
    }
    // nothing was left behind
    assert_eq!(fs::read_dir(&m.mountpoint).unwrap().count(), 0);
    m.unmount();
}

// umount(8) then mount at once
// ---------------------------------------------------------------------------

/// umount(8) returns before the daemon's final commit; a mount of the same
/// store right after waits for it without a warning, and sees everything.
#[test]
fn umount_then_mount_at_once_is_quiet_and_keeps_data() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut worst = Duration::ZERO;
    for round in 0..3u8 {
        // nothing is committed before the unmount
        let mut m = env.mount(&store, "mnt", &["commit_interval=3600"]);
        let data: Vec<u8> = (0..48 * MIB as usize)
            .map(|i| (i as u8) ^ round.wrapping_mul(31))
            .collect();
        fs::write(m.path("big"), &data).unwrap();
        let mut old = m.child.take().unwrap();
        run_ok(Command::new("umount").arg(&m.mountpoint));
        let gone = std::time::Instant::now();
        let m2 = env.mount(&store, "mnt", &[]);
        let st = old.wait().unwrap();
        assert!(st.success(), "old daemon: {st}: {}", m.log_text());
        worst = worst.max(gone.elapsed());
        let log = m2.log_text();
        assert!(
            !log.contains("still locked") && !log.contains("WARN"),
            "the mount right after umount printed: {log}"
        );
        assert!(fs::read(m2.path("big")).unwrap() == data, "round {round}");
        m2.unmount();
    }
    eprintln!("umount(8) to final commit: at most {worst:?}");
}

// file handles
// ---------------------------------------------------------------------------

/// name_to_handle_at / open_by_handle_at through python3's ctypes (no
/// common tool wraps them): `save PATH` prints the handle, `open MOUNT
/// TYPE HEX` prints the file's data, or a directory's path and entries,
/// or the errno.
const HANDLE_PY: &str = r#"
import ctypes, os, sys, struct
libc = ctypes.CDLL(None, use_errno=True)
class FH(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]
def name_to_handle(path):
    fh = FH(); fh.handle_bytes = 128
    mid = ctypes.c_int()
    r = libc.name_to_handle_at(-100, path.encode(), ctypes.byref(fh), ctypes.byref(mid), 0)
    if r != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])
def open_by_handle(mnt, htype, hb, flags=os.O_RDONLY):
    fh = FH(); fh.handle_bytes = len(hb); fh.handle_type = htype
    ctypes.memmove(fh.f_handle, hb, len(hb))
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
    e = ctypes.get_errno(); os.close(mfd)
    if fd < 0: raise OSError(e, os.strerror(e))
    return fd
cmd = sys.argv[1]
if cmd == "save":
    t, h = name_to_handle(sys.argv[2]); print(t, h.hex())
elif cmd == "open":
    mnt, t, h = sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
    try:
        fd = open_by_handle(mnt, t, h)
    except OSError as e:
        print("errno", e.errno); sys.exit(0)
    import stat
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.fchdir(fd); print("dir", os.getcwd(), ",".join(sorted(os.listdir("."))))
    else:
        print("data", os.read(fd, 1 << 20).hex())
    os.close(fd)
"#;

fn handle_tool(env: &Env, args: &[&str]) -> String {
    let script = env.path("handles.py");
    if !script.exists() {
        fs::write(&script, HANDLE_PY).unwrap();
    }
    stdout(&run_ok(Command::new("python3").arg(&script).args(args)))
        .trim()
        .to_string()
}

#[test]
fn file_handles_open_across_a_remount() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup(&[]);
    fs::create_dir_all(m.path("p/q")).unwrap();
    fs::write(m.path("p/q/f"), b"handle data").unwrap();
    fs::write(m.path("gone"), b"x").unwrap();
    let mp = m.mountpoint.to_str().unwrap().to_string();
    let save = |p: &str| handle_tool(&env, &["save", m.path(p).to_str().unwrap()]);
    let (hf, hd, hg) = (save("p/q/f"), save("p/q"), save("gone"));
    let open = |h: &str| {
        let mut a = vec!["open", mp.as_str()];
        a.extend(h.split(' '));
        handle_tool(&env, &a)
    };
    let data = format!("data {}", hex::encode(b"handle data"));
    assert_eq!(open(&hf), data);
    fs::remove_file(m.path("gone")).unwrap();
    m.unmount();
    // A new daemon and a new kernel mount: the kernel has no inode cached
    // and asks the daemon for "." (and ".." up to the root for the
    // directory's path).
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(open(&hf), data);
    assert_eq!(open(&hd), format!("dir {mp}/p/q f"));
    assert_eq!(open(&hg), format!("errno {}", libc::ESTALE));
    m.unmount();
}
