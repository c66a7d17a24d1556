//! Shared helpers for integration tests that mount real volumes.
//!
//! Every test that needs FUSE calls [`require_fuse`]: outside CI it skips
//! (returns false) when /dev/fuse is unusable; with CI=true it fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the sealfs binary built by cargo for these tests.
pub fn sealfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sealfs"))
}

/// True if FUSE mounts can work here. Panics when CI=true and they cannot.
pub fn require_fuse() -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
    if !ok {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("CI=true but /dev/fuse is not usable: FUSE tests cannot run");
        }
        eprintln!("skipping: /dev/fuse is not usable on this machine");
    }
    ok
}

/// Write a file only its owner can read (mode 0600), as sealfs demands
/// of key files and passphrase files.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.write_all(data.as_ref()).unwrap();
    // an existing file keeps its mode on open: set it
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// A temporary environment: keystore + key file + state dir + stores.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// New environment with an initialized key-file keystore and a key
    /// with alias `test`.
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("sealfs-test-")
            .tempdir()
            .unwrap();
        let e = Env { dir };
        let out = e.sealfs(&["init", "--generate-key-file"]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        let out = e.sealfs(&["key", "create", "--alias", "test"]);
        assert!(out.status.success(), "key create failed: {}", stderr(&out));
        e
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn keystore(&self) -> PathBuf {
        self.path("keystore")
    }

    pub fn key_file(&self) -> PathBuf {
        self.path("keystore.key")
    }

    /// A `sealfs` command with this environment's keystore, key file and
    /// state dir set through the environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(sealfs_bin());
        c.env("SEALFS_KEYSTORE", self.keystore())
            .env("SEALFS_KEY_FILE", self.key_file())
            .env("SEALFS_STATE_DIR", self.path("state"))
            .env_remove("SEALFS_PASSPHRASE_FILE")
            .stdin(Stdio::null());
        c
    }

    /// Run sealfs with args and collect output.
    pub fn sealfs(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Create a store named `name` under alias/test; returns its path.
    pub fn create_store(&self, name: &str) -> PathBuf {
        let store = self.path(name);
        let out = self.sealfs(&["create", store.to_str().unwrap(), "--kms-key", "alias/test"]);
        assert!(out.status.success(), "create failed: {}", stderr(&out));
        store
    }

    /// Mount `store` in the foreground as a child process (stderr captured
    /// to a file) and wait until the mount is live.
    pub fn mount(&self, store: &Path, name: &str, opts: &[&str]) -> Mount {
        let mp = self.path(name);
        std::fs::create_dir_all(&mp).unwrap();
        let log = self.path(&format!("{name}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut c = self.cmd();
        c.arg("mount").arg("-f");
        for o in opts {
            c.arg("-o").arg(o);
        }
        c.arg(store).arg(&mp).stdout(Stdio::null()).stderr(logf);
        let child = c.spawn().unwrap();
        let mut m = Mount {
            mountpoint: mp,
            child: Some(child),
            log,
        };
        m.wait_live();
        m
    }
}

/// A live mount. Dropping it unmounts lazily and reaps the daemon, also
/// when a test panics.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub fn is_mounted(mp: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mp = mp.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(mp))
}

impl Mount {
    fn wait_live(&mut self) {
        let start = Instant::now();
        loop {
            if is_mounted(&self.mountpoint) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "sealfs mount exited with {st} before mounting: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("mount did not become live in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.mountpoint.join(p)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmount cleanly (umount(2)) and wait for the daemon to finish its
    /// final commit; asserts it exited successfully.
    pub fn unmount(mut self) {
        // A parallel test that forks a tool can briefly hold inherited
        // descriptors of ours (until its exec closes them): retry on EBUSY.
        let mut ok = false;
        for _ in 0..100 {
            let out = Command::new("umount")
                .arg(&self.mountpoint)
                .output()
                .unwrap();
            if out.status.success() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ok, "umount failed");
        let mut child = self.child.take().unwrap();
        let st = wait_timeout(&mut child, Duration::from_secs(60));
        assert!(st.success(), "daemon exited with {st}: {}", self.log_text());
    }

    /// kill -9 the daemon, then clear the dead mount.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > t {
            let _ = child.kill();
            panic!("daemon did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Guard for a mount made outside [`Env::mount`] (a background daemon,
/// mount(8)): unmounts lazily on drop, also when the test panics.
pub struct BgGuard(pub PathBuf);

impl Drop for BgGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert a non-zero exit whose stderr contains every needle.
pub fn assert_failed(out: &Output, needles: &[&str], what: &str) {
    assert!(
        !out.status.success(),
        "{what}: expected failure, got success: {}{}",
        stdout(out),
        stderr(out)
    );
    let e = stderr(out);
    for n in needles {
        assert!(e.contains(n), "{what}: message lacks {n:?}: {e}");
    }
}

/// All files under a store directory (relative path -> bytes), ignoring the
/// top-level `lock` file; to check that a failed command left it untouched.
pub fn snapshot_store(root: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                walk(root, &p, out);
            } else if rel != Path::new("lock") {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Run a command that must exit on its own (a mount expected to fail).
/// If it mounts `mp` instead, clean up and panic; kill it after 60 s.
pub fn run_expect_exit(mut c: Command, mp: &Path) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if is_mounted(mp) || start.elapsed() > Duration::from_secs(60) {
            let _ = Command::new("umount").arg("-l").arg(mp).status();
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("command mounted {} or hung: {}", mp.display(), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Small deterministic PRNG (splitmix64, no extra crate) shared by the
/// integration tests, so that a failure can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seed from `SEALFS_TEST_SEED`, else the clock; the seed is printed.
    pub fn seeded() -> Rng {
        let seed = std::env::var("SEALFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("seed: SEALFS_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Name of the unprivileged user the multi-user tests run commands as.
pub const TEST_USER: &str = "sealfs-test";

/// The unprivileged test user `sealfs-test` as (uid, gid, name), created
/// (no home directory, no login shell) if it does not exist yet. Needs root.
pub fn test_user() -> (u32, u32, String) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").arg(flag).arg(TEST_USER).output().ok()?;
        if !o.status.success() {
            return None;
        }
        stdout(&o).trim().parse().ok()
    };
    if id("-u").is_none() {
        // Another test binary may create it at the same time: useradd then
        // exits 9 ("already exists"), or 10 while the other holds the lock.
        for attempt in 0..50 {
            let o = Command::new("useradd")
                .args(["-M", "-s", "/usr/sbin/nologin", TEST_USER])
                .output()
                .expect("cannot run useradd");
            match o.status.code() {
                Some(0) | Some(9) => break,
                Some(10) if attempt < 49 => std::thread::sleep(Duration::from_millis(100)),
                _ => panic!("useradd {TEST_USER} failed: {}", stderr(&o)),
            }
        }
    }
    let uid = id("-u").unwrap_or_else(|| panic!("user {TEST_USER} does not exist"));
    let gid = id("-g").unwrap_or_else(|| panic!("user {TEST_USER} has no group"));
    (uid, gid, TEST_USER.to_string())
}

/// Parse the output of `sealfs status --json` (asserting it succeeded).
pub fn parse_status_json(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "sealfs status --json: {}",
        stderr(out)
    );
    match serde_json::from_str(&stdout(out)) {
        Ok(serde_json::Value::Array(v)) => v,
        other => panic!(
            "sealfs status --json did not print an array ({other:?}): {}",
            stdout(out)
        ),
    }
}

/// `sealfs status --json` in this environment: one object per sealfs
/// mount on the machine (other tests' mounts included).
pub fn status_json(env: &Env) -> Vec<serde_json::Value> {
    parse_status_json(&env.sealfs(&["status", "--json"]))
}

/// The `sealfs status --json` entry of the mount at `mp`, if listed.
pub fn status_entry(env: &Env, mp: &Path) -> Option<serde_json::Value> {
    let mp = mp.to_str().unwrap();
    status_json(env)
        .into_iter()
        .find(|e| e["mountpoint"].as_str() == Some(mp))
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Assert that a command succeeded; returns its stdout.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: expected success, got {}: {}{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
