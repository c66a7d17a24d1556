//! Mounting as the system sees it: the mount(8) helper and fstab lines,
//! read-only mounts, allow_other, unprivileged users (fusermount3), signals
//! and dead daemons, `sealfs status`, and where a background daemon logs.

mod common;
use common::*;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where mount(8) looks for sealfs's helper (scripts/install.sh puts it there).
const HELPER: &str = "/sbin/mount.fuse.sealfs";
const MIB: usize = 1 << 20;

fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Skip (or fail, under CI) a test that needs something this machine lacks.
fn require(ok: bool, what: &str) -> bool {
    if !ok {
        if ci() {
            panic!("CI=true but {what}");
        }
        eprintln!("skipping: {what}");
    }
    ok
}

/// Whether we run as root (mount(8), runuser, useradd and chown need it);
/// other users skip these tests.
fn require_root() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root");
    }
    root
}

/// Whether the mount(8) helper is installed.
fn require_helper() -> bool {
    require(
        Path::new(HELPER).exists(),
        &format!("{HELPER} is missing (run scripts/install.sh)"),
    )
}

fn empty_dir(env: &Env, name: &str) -> PathBuf {
    let p = env.path(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Poll `f` every 50 ms until it holds; panic after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run a command to completion (stdin closed, output collected); kill it
/// and panic if it takes longer than `secs`.
fn run_timeout(mut c: Command, secs: u64) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{c:?} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: to.join().unwrap(),
        stderr: te.join().unwrap(),
    }
}

/// `base mount [-o opt]... STORE MP` (a background mount); asserts it
/// succeeded and that the mount is live when the command returns.
fn bg_mount(mut base: Command, store: &Path, mp: &Path, opts: &[&str]) {
    base.arg("mount");
    for o in opts {
        base.arg("-o").arg(o);
    }
    base.arg(store).arg(mp);
    let out = run_timeout(base, 60);
    assert!(
        out.status.success(),
        "background mount of {} failed: {}",
        store.display(),
        stderr(&out)
    );
    assert!(
        is_mounted(mp),
        "sealfs mount returned before {} was live",
        mp.display()
    );
}

/// Retry a command while it fails because the mount is busy (a parallel
/// test that forks can briefly hold inherited descriptors of ours).
fn retry_busy(what: &str, mut make: impl FnMut() -> Command) -> Output {
    let mut last = None;
    for _ in 0..100 {
        let out = run_timeout(make(), 150);
        if out.status.success() {
            return out;
        }
        let e = stderr(&out);
        if !e.contains("busy") {
            panic!("{what} failed: {e}");
        }
        last = Some(e);
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} kept failing: {}", last.unwrap_or_default());
}

/// `sealfs umount MP` (which waits for the final commit); asserts success.
fn sealfs_umount(env: &Env, mp: &Path) {
    retry_busy(&format!("sealfs umount {}", mp.display()), || {
        let mut c = env.cmd();
        c.arg("umount").arg(mp);
        c
    });
    assert!(
        !is_mounted(mp),
        "{} still mounted after sealfs umount",
        mp.display()
    );
}

/// Plain `umount MP` (umount(8)); asserts success.
fn umount8(mp: &Path) {
    retry_busy(&format!("umount {}", mp.display()), || {
        let mut c = Command::new("umount");
        c.arg(mp);
        c
    });
    assert!(
        !is_mounted(mp),
        "{} still mounted after umount",
        mp.display()
    );
}

/// `mount` (mount(8)) with this environment's state dir but no keystore or
/// key file from the environment: the -o options must name them.
fn mount8(env: &Env) -> Command {
    let mut c = Command::new("mount");
    c.env("SEALFS_STATE_DIR", env.path("state"))
        .env_remove("SEALFS_KEYSTORE")
        .env_remove("SEALFS_KEY_FILE")
        .env_remove("SEALFS_PASSPHRASE_FILE")
        .stdin(Stdio::null());
    c
}

/// A hint for a mount(8) failure that comes from an installed helper older
/// than the tree under test (mount(8) runs /usr/local/bin/sealfs, not the
/// binary cargo built).
fn helper_hint(err: &str) -> &'static str {
    if err.contains("upgrade sealfs") || err.contains("format version") {
        "\n(hint: the installed mount helper is older than this tree; run scripts/install.sh)"
    } else {
        ""
    }
}

/// `keystore=K,key_file=KF` for this environment.
fn key_opts(env: &Env) -> String {
    format!(
        "keystore={},key_file={}",
        env.keystore().display(),
        env.key_file().display()
    )
}

/// Wait (up to 30 s) until no daemon holds the store (after umount(8),
/// which does not wait for the final commit).
fn wait_store_released(env: &Env, store: &Path) {
    wait_until(
        &format!("{} to be released", store.display()),
        Duration::from_secs(30),
        || {
            let out = env.sealfs(&["info", "--json", store.to_str().unwrap()]);
            assert!(out.status.success(), "info: {}", stderr(&out));
            let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            v["in_use"] == serde_json::Value::Bool(false)
        },
    );
}

fn write_fsync(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// One /proc/self/mountinfo entry.
#[derive(Debug)]
struct MountInfo {
    mount_opts: Vec<String>,
    fstype: String,
    source: String,
    super_opts: Vec<String>,
}

/// The (topmost) mountinfo entry of `mp`.
fn mountinfo(mp: &Path) -> Option<MountInfo> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mp.to_str().unwrap();
    let mut found = None;
    for l in info.lines() {
        let Some((pre, post)) = l.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        let p: Vec<&str> = post.split(' ').collect();
        if f.len() >= 6 && p.len() >= 3 && f[4] == mp {
            found = Some(MountInfo {
                mount_opts: f[5].split(',').map(String::from).collect(),
                fstype: p[0].to_string(),
                source: p[1].to_string(),
                super_opts: p[2].split(',').map(String::from).collect(),
            });
        }
    }
    found
}

/// Whether process `pid` still runs (a zombie counts as gone).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Wait (up to 30 s) until process `pid` is dead and reaped. An orphaned
/// daemon is reaped by init, which in some containers takes a while; until
/// then kill(pid, 0) still succeeds.
fn wait_reaped(pid: u32) {
    wait_until(
        &format!("process {pid} to die and be reaped"),
        Duration::from_secs(30),
        || !Path::new(&format!("/proc/{pid}")).exists(),
    );
}

fn send_signal(sig: &str, pid: u32) {
    let out = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "kill -{sig} {pid}: {}", stderr(&out));
}

/// The daemon pid of the mount at `mp`, from `sealfs status --json`.
fn daemon_pid(env: &Env, mp: &Path) -> u32 {
    let e = status_entry(env, mp)
        .unwrap_or_else(|| panic!("sealfs status does not list {}", mp.display()));
    let pid = e["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no daemon pid in the status of {}: {e}", mp.display()));
    assert!(pid > 1, "implausible daemon pid {pid}");
    assert!(pid_alive(pid as u32), "daemon pid {pid} is not running");
    pid as u32
}

/// Wait (up to 30 s) until the daemon `pid` exited and `mp` is unmounted.
fn wait_daemon_gone(pid: u32, mp: &Path) {
    wait_until(
        &format!("daemon {pid} to exit and {} to be unmounted", mp.display()),
        Duration::from_secs(30),
        || !pid_alive(pid) && !is_mounted(mp),
    );
}

fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// errno of statvfs(2) on `p` (which FUSE always asks the daemon about),
/// None on success.
fn statvfs_errno(p: &Path) -> Option<i32> {
    let c = cstr(p);
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    libc_errno(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) })
}

/// errno of a libc call's -1 result, None on success.
fn libc_errno(r: libc::c_int) -> Option<i32> {
    if r == 0 {
        None
    } else {
        std::io::Error::last_os_error().raw_os_error()
    }
}

/// A set of files (path relative to the mount, content) with random
/// contents, some larger than 1 MiB, in a subdirectory too.
fn random_files(rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("big-a.bin".to_string(), rng.bytes(3 * MIB + 17)),
        ("big-b.bin".to_string(), rng.bytes(MIB + MIB / 2 + 4093)),
        ("sub/deeper/big-c.bin".to_string(), rng.bytes(MIB + 1)),
    ];
    for i in 0..6 {
        let n = rng.below(200_000) as usize;
        v.push((format!("sub/small-{i}.bin"), rng.bytes(n)));
    }
    v.push(("empty".to_string(), Vec::new()));
    v
}

/// Write `files` under `root` without fsync.
fn write_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
}

fn check_files(root: &Path, files: &[(String, Vec<u8>)], what: &str) {
    for (name, data) in files {
        let got = std::fs::read(root.join(name))
            .unwrap_or_else(|e| panic!("{what}: cannot read {name}: {e}"));
        assert!(
            got.len() == data.len(),
            "{what}: {name} has {} bytes, wrote {}",
            got.len(),
            data.len()
        );
        if let Some(i) = got.iter().zip(data).position(|(a, b)| a != b) {
            panic!("{what}: {name} differs from what was written at byte {i}");
        }
    }
}

// ---------------------------------------------------------------------------
// mount(8) and fstab

#[test]
fn helper_mount_t_fuse_sealfs() {
    if !require_fuse() || !require_root() || !require_helper() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());

    let mut c = mount8(&env);
    c.args(["-t", "fuse.sealfs", "-o", &key_opts(&env)])
        .arg(&store)
        .arg(&mp);
    let out = run_timeout(c, 60);
    assert!(
        out.status.success(),
        "mount -t fuse.sealfs failed ({}): {}{}",
        out.status,
        stderr(&out),
        helper_hint(&stderr(&out))
    );
    assert!(
        is_mounted(&mp),
        "mount(8) returned before the mount was live"
    );
    let mi = mountinfo(&mp).unwrap();
    assert_eq!(mi.fstype, "fuse.sealfs", "{mi:?}");
    assert_eq!(mi.source, store.to_str().unwrap(), "{mi:?}");
    let out = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE", "--mountpoint"])
        .arg(&mp)
        .output()
        .unwrap();
    assert!(out.status.success(), "findmnt: {}", stderr(&out));
    let s = stdout(&out);
    assert!(
        s.contains("fuse.sealfs") && s.contains(store.to_str().unwrap()),
        "findmnt: {s}"
    );
    // The daemon started by the helper publishes its status like any other.
    let e = status_entry(&env, &mp).expect("sealfs status lists the mount");
    assert_eq!(e["state"], "live", "{e}");
    assert_eq!(e["store"], store.to_str().unwrap(), "{e}");

    let data = rng.bytes(300_000);
    write_fsync(&mp.join("hello.bin"), &data);
    assert!(std::fs::read(mp.join("hello.bin")).unwrap() == data);
    umount8(&mp);
    assert_eq!(
        std::fs::read_dir(&mp).unwrap().count(),
        0,
        "the file was written beside the mount, not into it"
    );

    // sealfs mount waits for the previous daemon's final commit.
    bg_mount(env.cmd(), &store, &mp, &[]);
    let got = std::fs::read(mp.join("hello.bin")).unwrap();
    assert!(got == data, "hello.bin changed across umount(8) + remount");
    sealfs_umount(&env, &mp);
}

#[test]
fn fstab_line_mount() {
    if !require_fuse() || !require_root() || !require_helper() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    let data = rng.bytes(200_000);
    bg_mount(env.cmd(), &store, &mp, &[]);
    write_fsync(&mp.join("before.bin"), &data);
    sealfs_umount(&env, &mp);

    let fstab = env.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.sealfs defaults,{},nofail,_netdev,x-systemd.automount 0 0\n",
            store.display(),
            mp.display(),
            key_opts(&env)
        ),
    )
    .unwrap();
    let mut c = mount8(&env);
    c.arg("--fstab").arg(&fstab).arg(&mp);
    let out = run_timeout(c, 60);
    assert!(
        out.status.success(),
        "mount --fstab failed ({}): {}{}",
        out.status,
        stderr(&out),
        helper_hint(&stderr(&out))
    );
    assert!(
        is_mounted(&mp),
        "mount(8) returned before the mount was live"
    );
    let mi = mountinfo(&mp).unwrap();
    assert_eq!(mi.fstype, "fuse.sealfs", "{mi:?}");
    assert_eq!(mi.source, store.to_str().unwrap(), "{mi:?}");
    assert!(mi.mount_opts.iter().any(|o| o == "rw"), "{mi:?}");
    let got = std::fs::read(mp.join("before.bin")).unwrap();
    assert!(got == data, "before.bin differs through the fstab mount");
    // Writable too.
    let more = rng.bytes(70_000);
    write_fsync(&mp.join("after.bin"), &more);
    umount8(&mp);
    wait_store_released(&env, &store);

    bg_mount(env.cmd(), &store, &mp, &[]);
    assert!(std::fs::read(mp.join("after.bin")).unwrap() == more);
    sealfs_umount(&env, &mp);
}

#[test]
fn helper_bad_input_fails_before_mount() {
    if !require_fuse() || !require_root() || !require_helper() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    let before = snapshot_store(&store);
    let wrong_key = env.path("wrong.key");
    write_private(&wrong_key, [0x5au8; 32]);
    let regular = env.path("regular-file");
    std::fs::write(&regular, b"not a directory").unwrap();
    let ko = key_opts(&env);

    let cases: Vec<(&str, String, &Path, &str)> = vec![
        ("unknown option", format!("{ko},bogus"), &mp, "bogus"),
        (
            "malformed option",
            format!("{ko},threads=abc"),
            &mp,
            "threads=abc",
        ),
        (
            "wrong key file",
            format!(
                "keystore={},key_file={}",
                env.keystore().display(),
                wrong_key.display()
            ),
            &mp,
            "wrong passphrase or key file",
        ),
        (
            "regular file mountpoint",
            ko.clone(),
            &regular,
            "not a directory",
        ),
        (
            "unknown snapshot",
            format!("{ko},snapshot=x"),
            &mp,
            "no snapshot named \"x\"",
        ),
    ];
    for (what, opts, target, needle) in cases {
        let mut c = mount8(&env);
        c.args(["-t", "fuse.sealfs", "-o", &opts])
            .arg(&store)
            .arg(target);
        let out = run_expect_exit(c, target);
        let e = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(32),
            "{what}: exit {}: {e}",
            out.status
        );
        assert!(
            e.contains(needle),
            "{what}: message lacks {needle:?}: {e}{}",
            helper_hint(&e)
        );
        assert!(!is_mounted(target), "{what}: mounted anyway");
        assert!(snapshot_store(&store) == before, "{what}: store changed");
    }
    assert_eq!(std::fs::read(&regular).unwrap(), b"not a directory");

    // The store is in use: a second mount is refused, the first stays.
    bg_mount(env.cmd(), &store, &mp, &[]);
    std::fs::write(mp.join("f"), b"first mount").unwrap();
    let mp2 = empty_dir(&env, "mnt2");
    let _guard2 = BgGuard(mp2.clone());
    let mut c = mount8(&env);
    c.args(["-t", "fuse.sealfs", "-o", &ko])
        .arg(&store)
        .arg(&mp2);
    let out = run_expect_exit(c, &mp2);
    let e = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(32),
        "store in use: exit {}: {e}",
        out.status
    );
    assert!(
        e.contains("in use"),
        "store in use: message lacks \"in use\": {e}"
    );
    assert!(!is_mounted(&mp2));
    assert!(is_mounted(&mp), "the first mount went away");
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"first mount");
    sealfs_umount(&env, &mp);
}

// ---------------------------------------------------------------------------
// Read-only mounts and access control

#[test]
fn ro_mount_refuses_writes() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"read-only content").unwrap();
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::write(m.path("d/g"), b"inside").unwrap();
    std::fs::create_dir(m.path("empty")).unwrap();
    let r = unsafe {
        libc::setxattr(
            cstr(&m.path("f")).as_ptr(),
            c"user.kept".as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(libc_errno(r), None, "setxattr on the rw mount");
    std::fs::File::open(m.path("f"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.unmount();
    let before = snapshot_store(&store);

    let m = env.mount(&store, "mnt", &["ro"]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"read-only content");
    assert_eq!(std::fs::read(m.path("d/g")).unwrap(), b"inside");
    let mut names: Vec<String> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "empty", "f"]);

    let erofs = Some(libc::EROFS);
    use std::fs::OpenOptions;
    assert_eq!(errno(std::fs::File::create(m.path("new"))), erofs, "create");
    assert_eq!(
        errno(OpenOptions::new().write(true).open(m.path("f"))),
        erofs,
        "open for writing"
    );
    assert_eq!(
        errno(OpenOptions::new().append(true).open(m.path("f"))),
        erofs,
        "open for appending"
    );
    assert_eq!(errno(std::fs::create_dir(m.path("newdir"))), erofs, "mkdir");
    assert_eq!(errno(std::fs::remove_file(m.path("f"))), erofs, "unlink");
    assert_eq!(errno(std::fs::remove_dir(m.path("empty"))), erofs, "rmdir");
    assert_eq!(
        errno(std::fs::rename(m.path("f"), m.path("f2"))),
        erofs,
        "rename"
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink("f", m.path("link"))),
        erofs,
        "symlink"
    );
    assert_eq!(
        errno(std::fs::hard_link(m.path("f"), m.path("hard"))),
        erofs,
        "link"
    );
    assert_eq!(
        errno(std::fs::set_permissions(
            m.path("f"),
            std::fs::Permissions::from_mode(0o600)
        )),
        erofs,
        "chmod"
    );
    let f = cstr(&m.path("f"));
    assert_eq!(
        libc_errno(unsafe { libc::truncate(f.as_ptr(), 0) }),
        erofs,
        "truncate"
    );
    assert_eq!(
        libc_errno(unsafe {
            libc::setxattr(f.as_ptr(), c"user.new".as_ptr(), b"v".as_ptr().cast(), 1, 0)
        }),
        erofs,
        "setxattr"
    );
    assert_eq!(
        libc_errno(unsafe { libc::removexattr(f.as_ptr(), c"user.kept".as_ptr()) }),
        erofs,
        "removexattr"
    );
    // Nothing changed.
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"read-only content");
    let mut buf = [0u8; 8];
    let n = unsafe {
        libc::getxattr(
            f.as_ptr(),
            c"user.kept".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, 1, "getxattr: {}", std::io::Error::last_os_error());
    assert_eq!(buf[0], b'v');

    let mi = mountinfo(&m.mountpoint).unwrap();
    assert!(mi.mount_opts.iter().any(|o| o == "ro"), "{mi:?}");
    let e = status_entry(&env, &m.mountpoint).expect("status lists the ro mount");
    assert_eq!(e["read_only"], true, "{e}");
    m.unmount();
    assert!(
        snapshot_store(&store) == before,
        "a read-only mount changed the store"
    );
}

/// `runuser -u USER -- args...`, environment cleared of sealfs settings.
fn as_user(user: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--"])
        .args(args)
        .env_remove("SEALFS_KEYSTORE")
        .env_remove("SEALFS_KEY_FILE")
        .env_remove("SEALFS_PASSPHRASE_FILE")
        .env_remove("SEALFS_STATE_DIR")
        .env_remove("SEALFS_SYSLOG_SOCKET")
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

fn user_run(user: &str, args: &[&std::ffi::OsStr]) -> Output {
    run_timeout(as_user(user, args), 60)
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Let other users traverse the test's temporary directory.
fn open_env_dir(env: &Env) {
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn allow_other_visibility() {
    if !require_fuse() || !require_root() {
        return;
    }
    let (_uid, _gid, user) = test_user();
    let env = Env::new();
    open_env_dir(&env);
    let store = env.create_store("store");

    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("file"), b"visible to others\n").unwrap();
    std::fs::set_permissions(m.path("file"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(m.path("dir")).unwrap();
    std::fs::set_permissions(m.path("dir"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(m.path("dir/inner"), b"inner\n").unwrap();
    std::fs::set_permissions(m.path("dir/inner"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mpath = m.mountpoint.clone();
    // Without allow_other only the mounting user gets in.
    let out = user_run(&user, &[os("ls"), mpath.as_os_str()]);
    assert!(
        !out.status.success(),
        "{user} listed a mount without allow_other: {}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "ls: {}",
        stderr(&out)
    );
    let out = user_run(&user, &[os("cat"), m.path("file").as_os_str()]);
    assert!(
        !out.status.success(),
        "{user} read a file without allow_other"
    );
    assert_eq!(
        std::fs::read(m.path("file")).unwrap(),
        b"visible to others\n"
    );
    m.unmount();

    let m = env.mount(&store, "mnt", &["allow_other"]);
    let out = user_run(&user, &[os("cat"), m.path("file").as_os_str()]);
    assert!(out.status.success(), "cat as {user}: {}", stderr(&out));
    assert_eq!(stdout(&out), "visible to others\n");
    let out = user_run(&user, &[os("cat"), m.path("dir/inner").as_os_str()]);
    assert!(out.status.success(), "cat as {user}: {}", stderr(&out));
    assert_eq!(stdout(&out), "inner\n");
    let out = user_run(&user, &[os("ls"), mpath.as_os_str()]);
    assert!(out.status.success(), "ls as {user}: {}", stderr(&out));
    let listing = stdout(&out);
    let mut listed: Vec<&str> = listing.lines().collect();
    listed.sort();
    assert_eq!(listed, ["dir", "file"]);
    // default_permissions: the modes still apply to the other user.
    let out = user_run(&user, &[os("touch"), m.path("file").as_os_str()]);
    assert!(!out.status.success(), "{user} wrote root's 0644 file");
    let out = user_run(&user, &[os("touch"), m.path("dir/new").as_os_str()]);
    assert!(
        !out.status.success(),
        "{user} created a file in root's 0755 dir"
    );
    assert!(!m.path("dir/new").exists());
    assert_eq!(
        std::fs::read(m.path("file")).unwrap(),
        b"visible to others\n"
    );
    m.unmount();
}

#[test]
fn non_root_user_mounts_through_fusermount3() {
    if !require_fuse() || !require_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let fuse_mode = std::fs::metadata("/dev/fuse").unwrap().mode();
    if !require(
        fuse_mode & 0o006 == 0o006,
        "/dev/fuse is not mode 0666 (scripts/deps.sh sets it): non-root mounts cannot work",
    ) {
        return;
    }
    let has_fusermount = Command::new("sh")
        .args(["-c", "command -v fusermount3"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !require(has_fusermount, "fusermount3 is not installed") {
        return;
    }
    let (uid, gid, user) = test_user();
    let bin = sealfs_bin();
    let out = user_run(&user, &[os("test"), os("-x"), bin.as_os_str()]);
    if !require(
        out.status.success(),
        &format!("{user} cannot execute {}", bin.display()),
    ) {
        return;
    }

    let env = Env::new();
    open_env_dir(&env);
    let home = env.path("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ks = home.join("keystore");
    let kf = home.join("keystore.key");
    let state = home.join("state");
    // `sealfs ARGS` as the user.
    let sealfs = |args: &[&std::ffi::OsStr]| -> Command {
        let mut v: Vec<std::ffi::OsString> = vec![
            "env".into(),
            format!("HOME={}", home.display()).into(),
            format!("SEALFS_KEYSTORE={}", ks.display()).into(),
            format!("SEALFS_KEY_FILE={}", kf.display()).into(),
            format!("SEALFS_STATE_DIR={}", state.display()).into(),
            bin.clone().into(),
        ];
        v.extend(args.iter().map(|a| a.to_os_string()));
        let refs: Vec<&std::ffi::OsStr> = v.iter().map(|a| a.as_os_str()).collect();
        as_user(&user, &refs)
    };
    let user_dir = |name: &str| -> PathBuf {
        let p = home.join(name);
        std::fs::create_dir(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        p
    };

    let out = run_timeout(
        sealfs(&[
            os("--key-file"),
            kf.as_os_str(),
            os("init"),
            os("--generate-key-file"),
        ]),
        60,
    );
    assert!(out.status.success(), "init as {user}: {}", stderr(&out));
    assert_eq!(std::fs::metadata(&kf).unwrap().uid(), uid);
    let store = home.join("store");
    let out = run_timeout(sealfs(&[os("create"), store.as_os_str()]), 60);
    assert!(out.status.success(), "create as {user}: {}", stderr(&out));
    let mp = user_dir("mnt");
    let _guard = BgGuard(mp.clone());

    bg_mount(sealfs(&[]), &store, &mp, &[]);
    let mi = mountinfo(&mp).unwrap();
    assert_eq!(mi.fstype, "fuse.sealfs", "{mi:?}");
    assert_eq!(mi.source, store.to_str().unwrap(), "{mi:?}");
    assert!(
        mi.super_opts.iter().any(|o| *o == format!("user_id={uid}")),
        "not mounted for uid {uid}: {mi:?}"
    );

    // Write through the user's mount (root is not let in without allow_other).
    let mut rng = Rng::seeded();
    let src = env.path("src.bin");
    let n = 300_000 + rng.below(10_000) as usize;
    std::fs::write(&src, rng.bytes(n)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dst = mp.join("f.bin");
    let out = user_run(&user, &[os("cp"), src.as_os_str(), dst.as_os_str()]);
    assert!(out.status.success(), "cp as {user}: {}", stderr(&out));
    let out = user_run(&user, &[os("cmp"), src.as_os_str(), dst.as_os_str()]);
    assert!(
        out.status.success(),
        "cmp as {user}: {}{}",
        stdout(&out),
        stderr(&out)
    );

    let out = run_timeout(sealfs(&[os("status"), os("--json")]), 60);
    let e = parse_status_json(&out)
        .into_iter()
        .find(|e| e["mountpoint"].as_str() == mp.to_str())
        .unwrap_or_else(|| panic!("status as {user} does not list {}", mp.display()));
    assert_eq!(e["state"], "live", "{e}");
    assert_eq!(e["store"], store.to_str().unwrap(), "{e}");
    assert!(e["pid"].as_u64().is_some(), "{e}");

    // allow_other needs user_allow_other in /etc/fuse.conf.
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allowed = conf
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other");
    if allowed {
        eprintln!("/etc/fuse.conf has user_allow_other: not checking that allow_other is refused");
    } else {
        let store2 = home.join("store2");
        let out = run_timeout(sealfs(&[os("create"), store2.as_os_str()]), 60);
        assert!(out.status.success(), "create as {user}: {}", stderr(&out));
        let mp2 = user_dir("mnt2");
        let _guard2 = BgGuard(mp2.clone());
        let mut c = sealfs(&[os("mount"), os("-o"), os("allow_other")]);
        c.arg(&store2).arg(&mp2);
        let out = run_expect_exit(c, &mp2);
        assert!(
            !out.status.success(),
            "allow_other mount as {user} succeeded"
        );
        assert!(
            stderr(&out).contains("user_allow_other"),
            "message lacks user_allow_other: {}",
            stderr(&out)
        );
        assert!(!is_mounted(&mp2));
    }

    // The user unmounts (sealfs falls back to fusermount3 -u).
    let out = retry_busy("sealfs umount as the user", || {
        let mut c = sealfs(&[os("umount")]);
        c.arg(&mp);
        c
    });
    assert!(out.status.success());
    assert!(
        !is_mounted(&mp),
        "still mounted after the user's sealfs umount"
    );

    bg_mount(sealfs(&[]), &store, &mp, &[]);
    let out = user_run(&user, &[os("cmp"), src.as_os_str(), dst.as_os_str()]);
    assert!(
        out.status.success(),
        "f.bin changed across remount: {}{}",
        stdout(&out),
        stderr(&out)
    );
    retry_busy("sealfs umount as the user", || {
        let mut c = sealfs(&[os("umount")]);
        c.arg(&mp);
        c
    });
    assert!(!is_mounted(&mp));
}

// ---------------------------------------------------------------------------
// Signals and dead daemons

#[test]
fn sigterm_with_dirty_data_then_remount() {
    if !require_fuse() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());

    // Background daemon, SIGTERM. A long commit interval keeps the data
    // dirty in the daemon until the signal.
    bg_mount(env.cmd(), &store, &mp, &["commit_interval=3600"]);
    let files = random_files(&mut rng);
    write_files(&mp, &files);
    let pid = daemon_pid(&env, &mp);
    send_signal("TERM", pid);
    wait_daemon_gone(pid, &mp);
    // The daemon removed its status file on the way out.
    let status_file = env.path(&format!("state/run/{}.json", volume_id(&env, &store)));
    assert!(
        !status_file.exists(),
        "{} left behind",
        status_file.display()
    );
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m.mountpoint, &files, "after SIGTERM");
    m.unmount();

    // SIGHUP does the same.
    bg_mount(env.cmd(), &store, &mp, &["commit_interval=3600"]);
    let hup = rng.bytes(MIB / 2 + 3);
    std::fs::write(mp.join("hup.bin"), &hup).unwrap();
    let pid = daemon_pid(&env, &mp);
    send_signal("HUP", pid);
    wait_daemon_gone(pid, &mp);
    bg_mount(env.cmd(), &store, &mp, &[]);
    assert!(
        std::fs::read(mp.join("hup.bin")).unwrap() == hup,
        "hup.bin lost"
    );
    check_files(&mp, &files, "after SIGHUP");
    sealfs_umount(&env, &mp);

    // Foreground mount, SIGINT: the process exits successfully.
    let files2 = random_files(&mut rng);
    let mut m = env.mount(&store, "mnt", &["commit_interval=3600"]);
    write_files(&m.path("second"), &files2);
    let mut child = m.child.take().unwrap();
    send_signal("INT", child.id());
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!("sealfs mount -f did not exit within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        st.success(),
        "SIGINT: daemon exited with {st}: {}",
        m.log_text()
    );
    assert!(!is_mounted(&m.mountpoint), "still mounted after SIGINT");
    let m = env.mount(&store, "mnt", &[]);
    check_files(&m.mountpoint, &files, "first set after SIGINT");
    check_files(&m.path("second"), &files2, "after SIGINT");
    m.unmount();
}

#[test]
fn killed_daemon_stale_mount_cleared_by_sealfs_umount() {
    if !require_fuse() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    bg_mount(env.cmd(), &store, &mp, &[]);
    let data = rng.bytes(MIB + 1234);
    write_fsync(&mp.join("kept.bin"), &data);
    let pid = daemon_pid(&env, &mp);
    send_signal("KILL", pid);
    wait_reaped(pid);

    assert!(
        is_mounted(&mp),
        "the dead daemon's mount disappeared by itself"
    );
    // stat(MP) may still be answered from the kernel's attribute cache (for
    // the attribute TTL); opening the directory and statfs reach the dead
    // connection.
    assert_eq!(
        errno(std::fs::read_dir(&mp)),
        Some(libc::ENOTCONN),
        "opendir on the stale mount"
    );
    assert_eq!(
        statvfs_errno(&mp),
        Some(libc::ENOTCONN),
        "statfs on the stale mount"
    );
    let e = status_entry(&env, &mp).expect("status lists the stale mount");
    assert_eq!(e["state"], "stale", "{e}");
    let out = env.sealfs(&["status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    assert!(stdout(&out).contains("stale"), "{}", stdout(&out));

    // Mounting onto it is refused.
    let mut c = env.cmd();
    c.arg("mount").arg(&store).arg(&mp);
    let out = run_timeout(c, 60);
    let msg = stderr(&out);
    assert!(!out.status.success(), "mount onto a stale mount succeeded");
    assert!(
        msg.contains("stale") || msg.contains("already a mount point"),
        "{msg}"
    );
    assert!(is_mounted(&mp));
    assert_eq!(
        errno(std::fs::read_dir(&mp)),
        Some(libc::ENOTCONN),
        "the failed mount changed the stale mount"
    );

    // sealfs umount clears it.
    let out = env.sealfs(&["umount", mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "sealfs umount of a stale mount: {}",
        stderr(&out)
    );
    assert!(!is_mounted(&mp), "the stale mount is still there");
    assert!(status_entry(&env, &mp).is_none(), "status still lists it");

    bg_mount(env.cmd(), &store, &mp, &[]);
    let got = std::fs::read(mp.join("kept.bin")).unwrap();
    assert!(got == data, "the fsynced file did not survive kill -9");
    sealfs_umount(&env, &mp);
}

/// A mount whose daemon died is stale whoever asks: also for a `sealfs
/// status` that has no status file for it (another SEALFS_STATE_DIR, as
/// for another user's mounts). stat(2) on the mountpoint is no proof of
/// life: the kernel answers it from its attribute cache after the daemon
/// is gone.
#[test]
fn stale_mount_without_status_file_is_reported_stale() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    bg_mount(env.cmd(), &store, &mp, &[]);
    // Fill the attribute cache of the mountpoint, as any `ls -ld` would.
    std::fs::metadata(&mp).unwrap();
    let pid = daemon_pid(&env, &mp);
    send_signal("KILL", pid);
    wait_reaped(pid);
    assert_eq!(
        statvfs_errno(&mp),
        Some(libc::ENOTCONN),
        "statfs on the stale mount"
    );

    // With its own state dir, status knows the pid and says stale.
    let e = status_entry(&env, &mp).expect("status lists the stale mount");
    assert_eq!(e["state"], "stale", "{e}");
    // Without the status file, it has to find out from the mount itself.
    let mut c = env.cmd();
    c.env("SEALFS_STATE_DIR", env.path("other-state"))
        .args(["status", "--json"]);
    let rows = parse_status_json(&run_timeout(c, 60));
    let e = rows
        .iter()
        .find(|e| e["mountpoint"].as_str() == mp.to_str())
        .expect("status (other state dir) lists the mount");
    assert_eq!(
        e["state"], "stale",
        "a mount whose daemon was killed is reported as {} by `sealfs status` \
         without a status file: {e}",
        e["state"]
    );
    let out = env.sealfs(&["umount", mp.to_str().unwrap()]);
    assert!(out.status.success(), "sealfs umount: {}", stderr(&out));
    assert!(!is_mounted(&mp));
}

// ---------------------------------------------------------------------------
// sealfs status

fn volume_id(env: &Env, store: &Path) -> String {
    let out = env.sealfs(&["info", "--json", store.to_str().unwrap()]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["volume_id"].as_str().expect("volume_id").to_string()
}

fn counter(env: &Env, mp: &Path, key: &str) -> u64 {
    status_entry(env, mp).unwrap_or_else(|| panic!("status does not list {}", mp.display()))[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} for {}", mp.display()))
}

#[test]
fn two_mounts_side_by_side_and_status() {
    if !require_fuse() {
        return;
    }
    let mut rng = Rng::seeded();
    let env = Env::new();
    let sa = env.create_store("store-a");
    let sb = env.create_store("store-b");
    let ma = empty_dir(&env, "mnt-a");
    let mb = empty_dir(&env, "mnt-b");
    let _ga = BgGuard(ma.clone());
    let _gb = BgGuard(mb.clone());
    bg_mount(env.cmd(), &sa, &ma, &[]);
    bg_mount(env.cmd(), &sb, &mb, &[]);

    std::fs::write(ma.join("only-a.txt"), b"a").unwrap();
    std::fs::write(mb.join("only-b.txt"), b"b").unwrap();
    std::fs::write(ma.join("same-name"), b"content of a").unwrap();
    std::fs::write(mb.join("same-name"), b"content of b").unwrap();
    std::fs::create_dir(ma.join("dir-a")).unwrap();
    assert!(!mb.join("only-a.txt").exists());
    assert!(!ma.join("only-b.txt").exists());
    assert!(!mb.join("dir-a").exists());
    assert_eq!(
        std::fs::read(ma.join("same-name")).unwrap(),
        b"content of a"
    );
    assert_eq!(
        std::fs::read(mb.join("same-name")).unwrap(),
        b"content of b"
    );
    let list = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(&ma), ["dir-a", "only-a.txt", "same-name"]);
    assert_eq!(list(&mb), ["only-b.txt", "same-name"]);

    let (va, vb) = (volume_id(&env, &sa), volume_id(&env, &sb));
    assert_ne!(va, vb);
    for (mp, store, vid) in [(&ma, &sa, &va), (&mb, &sb, &vb)] {
        let e = status_entry(&env, mp)
            .unwrap_or_else(|| panic!("status does not list {}", mp.display()));
        assert_eq!(e["state"], "live", "{e}");
        assert_eq!(e["store"], store.to_str().unwrap(), "{e}");
        assert_eq!(e["volume_id"], vid.as_str(), "{e}");
        assert_eq!(e["read_only"], false, "{e}");
        assert!(
            e["pid"].as_u64().is_some_and(|p| pid_alive(p as u32)),
            "{e}"
        );
        for k in ["key_id", "key", "started"] {
            assert!(e[k].is_string(), "{k}: {e}");
        }
        assert!(e["uptime_seconds"].as_u64().is_some(), "{e}");
    }
    assert_ne!(
        status_entry(&env, &ma).unwrap()["pid"],
        status_entry(&env, &mb).unwrap()["pid"],
        "one daemon per mount"
    );
    let out = env.sealfs(&["status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let human = stdout(&out);
    for s in [&ma, &mb, &sa, &sb] {
        assert!(
            human.contains(s.to_str().unwrap()),
            "{} missing: {human}",
            s.display()
        );
    }

    // bytes_written counts what reaches the daemon.
    let big = rng.bytes(2 * MIB);
    write_fsync(&ma.join("two-mib.bin"), &big);
    let one = rng.bytes(MIB);
    write_fsync(&ma.join("one-mib.bin"), &one);
    wait_until(
        "bytes_written of mount a to reach 3 MiB",
        Duration::from_secs(10),
        || counter(&env, &ma, "bytes_written") >= 3 * MIB as u64,
    );
    let wb = counter(&env, &mb, "bytes_written");
    assert!(wb < MIB as u64, "mount b counts a's writes: {wb}");

    // A fresh mount has nothing cached: reading 1 MiB reaches the daemon.
    sealfs_umount(&env, &ma);
    assert!(status_entry(&env, &ma).is_none(), "status still lists a");
    bg_mount(env.cmd(), &sa, &ma, &[]);
    assert_eq!(counter(&env, &ma, "bytes_written"), 0);
    let got = std::fs::read(ma.join("one-mib.bin")).unwrap();
    assert!(got == one, "one-mib.bin differs after remount");
    wait_until(
        "bytes_read of mount a to reach 1 MiB",
        Duration::from_secs(10),
        || counter(&env, &ma, "bytes_read") >= MIB as u64,
    );
    assert!(is_mounted(&mb));
    assert_eq!(
        std::fs::read(mb.join("same-name")).unwrap(),
        b"content of b"
    );

    sealfs_umount(&env, &ma);
    sealfs_umount(&env, &mb);
    for mp in [&ma, &mb] {
        assert!(
            status_entry(&env, mp).is_none(),
            "status still lists {}",
            mp.display()
        );
    }
    let out = env.sealfs(&["status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let human = stdout(&out);
    for s in [&ma, &mb] {
        assert!(
            !human.contains(s.to_str().unwrap()),
            "{} still listed: {human}",
            s.display()
        );
    }
    // Other tests' mounts may be listed too; with none, it says so.
    if !human.contains("Mountpoint:") {
        assert!(human.contains("no sealfs mounts"), "{human}");
    }
}

// ---------------------------------------------------------------------------
// Logging of background daemons

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn syslog_logging() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    let before = snapshot_store(&store);

    // No syslog socket at all: refused before mounting.
    let system_syslog = ["/dev/log", "/var/run/syslog", "/var/run/log"]
        .iter()
        .any(|p| is_socket(Path::new(p)));
    if system_syslog || std::env::var_os("SEALFS_SYSLOG_SOCKET").is_some() {
        eprintln!("a syslog socket exists: not checking that log=syslog is refused without one");
    } else {
        let mut c = env.cmd();
        c.env_remove("SEALFS_SYSLOG_SOCKET")
            .args(["mount", "-o", "log=syslog"])
            .arg(&store)
            .arg(&mp);
        let out = run_expect_exit(c, &mp);
        assert!(!out.status.success(), "log=syslog without syslog succeeded");
        assert!(stderr(&out).contains("log=syslog"), "{}", stderr(&out));
        assert!(!is_mounted(&mp));
    }
    // SEALFS_SYSLOG_SOCKET naming no socket: refused too.
    let mut c = env.cmd();
    c.env("SEALFS_SYSLOG_SOCKET", env.path("missing.sock"))
        .args(["mount", "-o", "log=syslog"])
        .arg(&store)
        .arg(&mp);
    let out = run_expect_exit(c, &mp);
    assert!(
        !out.status.success(),
        "log=syslog to a missing socket succeeded"
    );
    assert!(stderr(&out).contains("log=syslog"), "{}", stderr(&out));
    assert!(!is_mounted(&mp));
    assert!(snapshot_store(&store) == before, "store changed");

    // A listener of our own.
    let sock_path = env.path("syslog.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut c = env.cmd();
    c.env("SEALFS_SYSLOG_SOCKET", &sock_path).arg("-v");
    bg_mount(c, &store, &mp, &["log=syslog"]);
    std::fs::write(mp.join("f"), b"logged").unwrap();
    let pid = daemon_pid(&env, &mp);
    send_signal("TERM", pid);

    let mut seen = Vec::new();
    let mut found = None;
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    while found.is_none() && start.elapsed() < Duration::from_secs(20) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains("sealfs[") && msg.contains("unmounting") {
                    found = Some(msg.clone());
                }
                seen.push(msg);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    let msg = found
        .unwrap_or_else(|| panic!("no syslog record about unmounting within 20 s; got: {seen:#?}"));
    assert!(msg.contains(&format!("sealfs[{pid}]")), "{msg}");
    assert!(msg.contains("signal"), "{msg}");
    // RFC 3164: "<PRI>...", at severity info (6).
    let pri: u32 = msg
        .strip_prefix('<')
        .and_then(|r| r.split_once('>'))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("no <PRI> prefix: {msg}"));
    assert_eq!(pri & 7, 6, "not an info record: {msg}");
    wait_daemon_gone(pid, &mp);

    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"logged");
    m.unmount();
}

#[test]
fn log_file_option() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mp = empty_dir(&env, "mnt");
    let _guard = BgGuard(mp.clone());
    let before = snapshot_store(&store);

    // An unusable log file is reported before anything is mounted.
    let mut c = env.cmd();
    c.args(["mount", "-o", "log=/nonexistent-dir/x.log"])
        .arg(&store)
        .arg(&mp);
    let out = run_expect_exit(c, &mp);
    assert!(
        !out.status.success(),
        "log=/nonexistent-dir/x.log succeeded"
    );
    assert!(stderr(&out).contains("log="), "{}", stderr(&out));
    assert!(!is_mounted(&mp));
    assert!(!Path::new("/nonexistent-dir").exists());
    assert!(snapshot_store(&store) == before, "store changed");

    let log = env.path("daemon.log");
    let opt = format!("log={}", log.display());
    let mut c = env.cmd();
    c.arg("-v");
    bg_mount(c, &store, &mp, &[&opt]);
    std::fs::write(mp.join("f"), b"with a log").unwrap();
    let pid = daemon_pid(&env, &mp);
    send_signal("TERM", pid);
    wait_daemon_gone(pid, &mp);

    let md = std::fs::metadata(&log).expect("the log file exists");
    assert_eq!(md.permissions().mode() & 0o777, 0o600, "log file mode");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("unmounting")),
        "no line about unmounting in the log: {text:?}"
    );

    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"with a log");
    m.unmount();
}
