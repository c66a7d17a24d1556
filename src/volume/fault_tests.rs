//! Model-based test under injected store faults: random operations on a
//! volume opened on a [`FaultStore`] and on an in-memory model, with
//! faults (ENOSPC, EIO, torn writes) armed at random points. After every
//! operation:
//!
//! - an operation that failed did so with the injected errno (EIO for a
//!   failed read of a chunk), and never without a fault;
//! - the volume still reads exactly like the model of what it reported as
//!   done (a failed operation changed nothing);
//! - a commit that returned is durable: a remount after a "crash" (every
//!   later store call fails, so closing cannot commit) on a fresh store
//!   shows exactly the model at the last successful commit, and fsck finds
//!   nothing missing or damaged (only orphans a crash may leave).

use super::*;
use crate::kms::KeystoreSecret;
use crate::store::fault::{FaultControl, FaultStore, Fired, Op as SOp};
use std::collections::BTreeMap as Map;
use std::collections::BTreeSet as Set;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    ks: Keystore,
}

impl Fixture {
    fn new() -> Fixture {
        // On tmpfs when there is one: a commit syncs the whole file system
        // (syncfs), which on a busy disk costs far more than the test
        // itself; durability is emulated by the fault store here.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let secret = KeystoreSecret::KeyFile(Key32::random());
        let ks = Keystore::create(&dir.path().join("ks"), &secret).unwrap();
        let f = Fixture { dir, ks };
        let o = CreateOptions {
            chunk_size: 4096,
            inline_max: 1024,
            ..Default::default()
        };
        Volume::create(&f.store(), &f.ks, &o).unwrap();
        f
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn opts(&self) -> OpenOptions2 {
        OpenOptions2 {
            read_only: false,
            // a small cache, so that reads and partial writes reach the store
            cache_bytes: 64 << 10,
            dirty_bytes: 1 << 20,
            state_dir: Some(self.dir.path().join("state")),
            snapshot: None,
            accept_rollback: false,
        }
    }

    /// Open on a fresh fault-injecting store (nothing armed).
    fn open(&self) -> (Arc<Volume>, Arc<FaultControl>) {
        let fs = FaultStore::new(Box::new(LocalDirStore::open(&self.store()).unwrap()));
        let ctl = fs.control();
        let v = Volume::open_in(Box::new(fs), &self.ks, &self.opts())
            .unwrap_or_else(|e| panic!("reopen failed: {e}"));
        (v, ctl)
    }
}

/// Files (name -> content) and directories of the root.
#[derive(Debug, Clone, Default, PartialEq)]
struct Files {
    files: Map<Vec<u8>, Vec<u8>>,
    dirs: Set<Vec<u8>>,
}

#[derive(Debug, Clone, Default)]
struct Model {
    live: Files,
    /// The live state at the last commit that returned.
    committed: Files,
    /// Snapshots: name -> (content, certain). A failed delete may still
    /// have removed the manifest, so that snapshot is uncertain.
    snaps: Map<String, (Files, bool)>,
}

fn fname(i: u64) -> Vec<u8> {
    format!("f{i}").into_bytes()
}

fn read_all(v: &Volume, ino: u64) -> FsResult<Vec<u8>> {
    let size = v.getattr(ino)?.size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let d = v.read(ino, out.len() as u64, 64 << 10)?;
        if d.is_empty() {
            break;
        }
        out.extend(d);
    }
    Ok(out)
}

/// What a directory of the volume holds.
fn files_of(v: &Volume, dir: u64) -> FsResult<Files> {
    let mut f = Files::default();
    for (ino, kind, name) in v.readdir(dir)? {
        if name == b"." || name == b".." {
            continue;
        }
        match kind {
            FileKind::Dir => {
                f.dirs.insert(name);
            }
            _ => {
                f.files.insert(name, read_all(v, ino)?);
            }
        }
    }
    Ok(f)
}

fn assert_files(got: &Files, want: &Files, what: &str) {
    assert_eq!(got.dirs, want.dirs, "{what}: directories");
    assert_eq!(
        got.files.keys().collect::<Vec<_>>(),
        want.files.keys().collect::<Vec<_>>(),
        "{what}: file names"
    );
    for (n, c) in &want.files {
        let g = &got.files[n];
        assert!(
            g == c,
            "{what}: content of {:?} differs (len {} vs {}, first difference at {:?})",
            String::from_utf8_lossy(n),
            g.len(),
            c.len(),
            g.iter().zip(c.iter()).position(|(a, b)| a != b)
        );
    }
}

/// Check the live tree against the model.
fn check_live(v: &Volume, m: &Model, what: &str) {
    let got = files_of(v, ROOT_INO).unwrap_or_else(|e| panic!("{what}: reading the volume: {e}"));
    assert_files(&got, &m.live, what);
}

/// Check the snapshot list (and, with `content`, each snapshot's tree).
fn check_snaps(v: &Volume, m: &mut Model, content: bool, what: &str) {
    let listed: Set<String> = v.snapshot_list().into_iter().map(|s| s.name).collect();
    for (name, (_, certain)) in &m.snaps {
        if *certain {
            assert!(listed.contains(name), "{what}: snapshot {name:?} is gone");
        }
    }
    for name in &listed {
        assert!(
            m.snaps.contains_key(name),
            "{what}: snapshot {name:?} exists but was never taken (or its deletion succeeded)"
        );
    }
    m.snaps.retain(|n, _| listed.contains(n));
    for (_, c) in m.snaps.values_mut() {
        *c = true;
    }
    if content {
        for (name, (want, _)) in &m.snaps {
            let a = v
                .virt_lookup(SNAPDIR_INO, name.as_bytes())
                .expect("the snapshot directory is virtual")
                .unwrap_or_else(|e| panic!("{what}: lookup of snapshot {name:?}: {e}"));
            let got = files_of(v, a.ino)
                .unwrap_or_else(|e| panic!("{what}: reading snapshot {name:?}: {e}"));
            assert_files(&got, want, &format!("{what}: snapshot {name:?}"));
        }
    }
}

fn errno_of(e: &SnapshotError) -> FsError {
    e.errno()
}

/// The errors an operation may fail with, given the faults that fired
/// while it ran: the injected errno, and EIO when a read failed (a chunk
/// that cannot be read is EIO whatever the cause).
fn allowed(fired: &[Fired]) -> Vec<FsError> {
    let mut out = Vec::new();
    for f in fired {
        out.push(FsError::from(io::Error::from_raw_os_error(f.errno)));
        if f.op == SOp::Get {
            out.push(FsError::IO);
        }
    }
    out
}

/// Arm one random fault.
fn arm(rng: &mut Rng, ctl: &FaultControl) -> String {
    let errno = if rng.chance(50) {
        libc::ENOSPC
    } else {
        libc::EIO
    };
    let kind = match rng.below(3) {
        0 => None,
        1 => Some(Kind::Chunk),
        _ => Some(Kind::Meta),
    };
    let n = 1 + rng.below(3);
    if rng.chance(25) {
        let keep = rng.below(1001) as u32;
        ctl.tear(kind, n, keep, errno);
        return format!("tear put #{n} of {kind:?} keeping {keep}/1000, errno {errno}");
    }
    let op = match rng.below(10) {
        0..=4 => SOp::Put,
        5..=6 => SOp::Sync,
        7..=8 => SOp::Get,
        _ => SOp::Delete,
    };
    let kind = if op == SOp::Sync { None } else { kind };
    ctl.fail(op, kind, n, errno);
    format!("fail {op:?} #{n} of {kind:?} with errno {errno}")
}

#[derive(Debug)]
enum Op {
    Create(u64),
    Mkdir(u64),
    Write(u64, u64, usize, u8),
    Truncate(u64, u64),
    Unlink(u64),
    Rename(u64, u64),
    Fsync,
    SnapCreate(u64),
    SnapDelete(u64),
    Remount { crash: bool },
}

fn random_op(rng: &mut Rng) -> Op {
    let f = rng.below(5);
    match rng.below(40) {
        0..=3 => Op::Create(f),
        4 => Op::Mkdir(rng.below(3)),
        5..=18 => Op::Write(
            f,
            rng.below(30_000),
            rng.below(10_000) as usize,
            rng.next() as u8,
        ),
        19..=22 => Op::Truncate(f, rng.below(30_000)),
        23..=24 => Op::Unlink(f),
        25..=26 => Op::Rename(f, rng.below(5)),
        27..=33 => Op::Fsync,
        34..=35 => Op::SnapCreate(rng.below(3)),
        36 => Op::SnapDelete(rng.below(3)),
        _ => Op::Remount {
            crash: rng.chance(70),
        },
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed) ^ (k >> 8) as u8)
        .collect()
}

/// Apply `op` to the model when the volume did it.
fn apply(m: &mut Files, op: &Op) {
    match *op {
        Op::Create(i) => {
            m.files.insert(fname(i), Vec::new());
        }
        Op::Mkdir(i) => {
            m.dirs.insert(format!("d{i}").into_bytes());
        }
        Op::Write(i, off, len, seed) => {
            let c = m.files.entry(fname(i)).or_default();
            let off = off as usize;
            if len > 0 {
                if c.len() < off + len {
                    c.resize(off + len, 0);
                }
                c[off..off + len].copy_from_slice(&pattern(len, seed));
            }
        }
        Op::Truncate(i, size) => {
            if let Some(c) = m.files.get_mut(&fname(i)) {
                c.resize(size as usize, 0);
            }
        }
        Op::Unlink(i) => {
            m.files.remove(&fname(i));
        }
        Op::Rename(a, b) if a != b => {
            if let Some(c) = m.files.remove(&fname(a)) {
                m.files.insert(fname(b), c);
            }
        }
        _ => {}
    }
}

/// The error the model expects from `op` without any fault, if any.
fn expected_error(m: &Files, op: &Op) -> Option<FsError> {
    match *op {
        Op::Create(i) if m.files.contains_key(&fname(i)) => Some(FsError::EXIST),
        Op::Mkdir(i) if m.dirs.contains(format!("d{i}").as_bytes()) => Some(FsError::EXIST),
        Op::Unlink(i) | Op::Rename(i, _) if !m.files.contains_key(&fname(i)) => {
            Some(FsError::NOENT)
        }
        _ => None,
    }
}

/// Crash (every later store call fails, so nothing more is written; the
/// volume's close on drop cannot commit) and reopen on a fresh store.
fn crash_and_reopen(
    f: &Fixture,
    v: Arc<Volume>,
    ctl: &FaultControl,
) -> (Arc<Volume>, Arc<FaultControl>) {
    ctl.crash(libc::EIO);
    drop(v);
    f.open()
}

fn run_case(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let f = Fixture::new();
    let (mut v, mut ctl) = f.open();
    let mut m = Model::default();
    let mut faults = 0usize;
    let mut failed_ops = 0usize;
    for step in 0..steps {
        let mut armed = String::new();
        if !ctl.armed() && rng.chance(50) {
            armed = arm(&mut rng, &ctl);
            faults += 1;
        }
        let op = random_op(&mut rng);
        let what = format!("seed {seed} step {step} {op:?} (armed: {armed})");
        // (faults that fired while the last check read the volume were
        // absorbed: reads of chunks are retried)
        ctl.take_fired();
        let seq0 = v.committed_seq();
        let counts0 = ctl.counts();
        let r: Result<(), FsError> =
            match op {
                Op::Create(i) => v
                    .mknod(ROOT_INO, &fname(i), FileKind::File, 0o644, 0, 0, 0)
                    .map(|_| ()),
                Op::Mkdir(i) => v
                    .mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, 0)
                    .map(|_| ()),
                Op::Write(i, off, len, seed) => {
                    let ino = match v.lookup(ROOT_INO, &fname(i)) {
                        Ok(a) => Ok(a.ino),
                        Err(_) => {
                            // like open(O_CREAT): the create is one operation
                            let a = v
                                .mknod(ROOT_INO, &fname(i), FileKind::File, 0o644, 0, 0, 0)
                                .unwrap();
                            m.live.files.insert(fname(i), Vec::new());
                            Ok(a.ino)
                        }
                    };
                    ino.and_then(|ino| v.write(ino, off, &pattern(len, seed)).map(|_| ()))
                }
                Op::Truncate(i, size) => match v.lookup(ROOT_INO, &fname(i)) {
                    Ok(a) => v
                        .setattr(
                            a.ino,
                            &SetAttr {
                                size: Some(size),
                                ..Default::default()
                            },
                        )
                        .map(|_| ()),
                    Err(_) => Ok(()),
                },
                Op::Unlink(i) => v.unlink(ROOT_INO, &fname(i)),
                Op::Rename(a, b) => v.rename(ROOT_INO, &fname(a), ROOT_INO, &fname(b), 0),
                Op::Fsync => v.fsync(ROOT_INO),
                Op::SnapCreate(k) => v
                    .snapshot_create(&format!("s{k}"))
                    .map(|_| ())
                    .or_else(|e| match e {
                        SnapshotError::Exists(_) if m.snaps.contains_key(&format!("s{k}")) => {
                            Ok(())
                        }
                        e => Err(errno_of(&e)),
                    }),
                Op::SnapDelete(k) => v
                    .snapshot_delete(&format!("s{k}"))
                    .map(|_| ())
                    .or_else(|e| match e {
                        SnapshotError::Unknown(_) if !m.snaps.contains_key(&format!("s{k}")) => {
                            Ok(())
                        }
                        e => Err(errno_of(&e)),
                    }),
                Op::Remount { crash } => {
                    if crash {
                        (v, ctl) = crash_and_reopen(&f, v, &ctl);
                        m.live = m.committed.clone();
                    } else {
                        ctl.disarm();
                        v.close()
                            .unwrap_or_else(|e| panic!("{what}: clean close failed: {e}"));
                        m.committed = m.live.clone();
                        drop(v);
                        (v, ctl) = f.open();
                    }
                    check_live(&v, &m, &format!("{what}: after remount"));
                    check_snaps(&v, &mut m, true, &format!("{what}: after remount"));
                    continue;
                }
            };
        let fired = ctl.take_fired();
        let counts = ctl.counts();
        match r {
            Ok(()) => {
                if let Some(e) = expected_error(&m.live, &op) {
                    panic!("{what}: succeeded, the model expected {e}");
                }
                apply(&mut m.live, &op);
                match op {
                    Op::SnapCreate(k) => {
                        m.snaps
                            .entry(format!("s{k}"))
                            .or_insert_with(|| (m.live.clone(), true));
                    }
                    Op::SnapDelete(k) => {
                        m.snaps.remove(&format!("s{k}"));
                    }
                    Op::Fsync if fired.is_empty() => {
                        // one commit writes one metadata object durably,
                        // after one sync of the chunks before it
                        let commits = v.committed_seq() - seq0;
                        assert!(commits <= 1, "{what}: {commits} commits");
                        assert_eq!(
                            counts.durable_puts - counts0.durable_puts,
                            commits,
                            "{what}: durable puts of one commit"
                        );
                        assert_eq!(counts.syncs - counts0.syncs, commits, "{what}: syncs");
                    }
                    _ => {}
                }
            }
            Err(e) if Some(e) == expected_error(&m.live, &op) => {}
            Err(e) => {
                if fired.is_empty() {
                    assert_eq!(
                        Some(e),
                        expected_error(&m.live, &op),
                        "{what}: failed without an injected fault"
                    );
                } else {
                    failed_ops += 1;
                    assert!(
                        allowed(&fired).contains(&e),
                        "{what}: failed with {e} but the injected faults were {fired:?}"
                    );
                    if let Op::SnapDelete(k) = op {
                        // the manifest may be gone already (delete done,
                        // sync failed): either outcome is fine later
                        if let Some(s) = m.snaps.get_mut(&format!("s{k}")) {
                            s.1 = false;
                        }
                    }
                }
            }
        }
        // A commit that returned (also inside a snapshot or a failed
        // operation) covers everything the volume reported done before.
        if v.committed_seq() > seq0 {
            m.committed = m.live.clone();
        }
        check_live(&v, &m, &what);
    }
    // Final crash: exactly the last committed state survives.
    let (v2, ctl2) = crash_and_reopen(&f, v, &ctl);
    m.live = m.committed.clone();
    check_live(&v2, &m, &format!("seed {seed}: after the final crash"));
    check_snaps(
        &v2,
        &mut m,
        true,
        &format!("seed {seed}: after the final crash"),
    );
    ctl2.crash(libc::EIO);
    drop(v2);
    let rep = fsck::fsck(&f.store(), &f.ks, false, &mut |_, _| {}).unwrap();
    for p in &rep.problems {
        assert_eq!(
            p.kind,
            fsck::ProblemKind::Orphan,
            "seed {seed}: fsck: {}: {}",
            p.object,
            p.detail
        );
    }
    eprintln!(
        "seed {seed}: {steps} steps, {faults} faults armed, {failed_ops} operations failed, {} orphans",
        rep.problems.len()
    );
}

/// Cases and steps per case; `SEALFS_FAULT_CASES` runs more.
fn cases() -> u64 {
    std::env::var("SEALFS_FAULT_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

#[test]
fn volume_matches_model_under_faults() {
    let base = std::env::var("SEALFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_a1f5_u64);
    for case in 0..cases() {
        let seed = base.wrapping_add(case);
        run_case(seed, 120);
    }
}

#[test]
fn commit_counts_one_sync_and_one_durable_object() {
    let f = Fixture::new();
    let (v, ctl) = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    let c0 = ctl.counts();
    // 3 full chunks and a tail: 4 chunk objects, then one sync and one
    // journal record
    v.write(a.ino, 0, &pattern(3 * 4096 + 100, 1)).unwrap();
    v.fsync(a.ino).unwrap();
    let c = ctl.counts();
    assert_eq!(c.puts_of(Kind::Chunk) - c0.puts_of(Kind::Chunk), 4);
    assert_eq!(c.puts_of(Kind::Meta) - c0.puts_of(Kind::Meta), 1);
    assert_eq!(c.durable_puts - c0.durable_puts, 1);
    assert_eq!(c.syncs - c0.syncs, 1);
    // nothing changed: a commit writes nothing
    v.fsync(a.ino).unwrap();
    assert_eq!(ctl.counts(), c);
}

#[test]
fn sync_error_that_drops_unsynced_chunks_loses_nothing_acknowledged() {
    // A file system that reports a writeback error (fsync/syncfs fails)
    // may already have dropped the data it could not write. The commit
    // fails; a later commit that succeeds must not acknowledge chunks
    // written before the failed sync without writing them again.
    let f = Fixture::new();
    let (v, ctl) = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    let data = pattern(5 * 4096, 7);
    v.write(a.ino, 0, &data).unwrap();
    ctl.fail_sync_losing(1, libc::EIO);
    assert_eq!(v.fsync(a.ino), Err(FsError::IO));
    // the volume still reads the data (from memory or the store)
    assert!(read_all(&v, a.ino).unwrap() == data);
    // the retried commit succeeds: from now on the data must be durable
    v.fsync(a.ino).unwrap();
    let (v, _ctl) = crash_and_reopen(&f, v, &ctl);
    let a = v.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(a.size, data.len() as u64);
    let got = read_all(&v, a.ino);
    assert!(
        got.as_ref().is_ok_and(|g| *g == data),
        "fsync returned success, but after a crash the file reads {:?}",
        got.map(|g| g.len())
    );
}

/// A store that refuses every chunk write (full): writes stop being
/// buffered once the dirty data reaches twice the limit and fail with
/// ENOSPC, instead of holding everything in memory; once space is back,
/// writing and fsync work again.
#[test]
fn writes_fail_with_enospc_when_the_store_is_full() {
    let f = Fixture::new();
    let (v, ctl) = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    ctl.fail_always(SOp::Put, Some(Kind::Chunk), libc::ENOSPC);
    let block = pattern(4096, 3);
    let mut accepted = 0usize;
    let mut refused = None;
    for i in 0..2048u64 {
        match v.write(a.ino, i * 4096, &block) {
            Ok(n) => accepted += n,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused, Some(FsError::NOSPC), "after {accepted} bytes");
    // the limit is 1 MiB: at most about twice that is held
    assert!(accepted <= (2 << 20) + 4096, "{accepted} bytes buffered");
    assert_eq!(v.fsync(a.ino), Err(FsError::NOSPC));
    ctl.disarm();
    v.fsync(a.ino).unwrap();
    assert_eq!(v.read(a.ino, 0, 4096).unwrap(), block);
}
