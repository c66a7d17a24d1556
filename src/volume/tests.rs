//! Volume-layer tests without FUSE, including a model-based proptest.

use super::*;
use crate::kms::KeystoreSecret;
use proptest::prelude::*;
use std::collections::BTreeMap as Map;

struct Fixture {
    dir: tempfile::TempDir,
    ks: Keystore,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let secret = KeystoreSecret::KeyFile(Key32::random());
        let ks = Keystore::create(&dir.path().join("ks"), &secret).unwrap();
        Fixture { dir, ks }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn create(&self, chunk: u32, inline: u32) {
        let o = CreateOptions {
            chunk_size: chunk,
            inline_max: inline,
            ..Default::default()
        };
        Volume::create(&self.store(), &self.ks, &o).unwrap();
    }

    fn opts(&self) -> OpenOptions2 {
        OpenOptions2 {
            read_only: false,
            cache_bytes: 1 << 20,
            dirty_bytes: 1 << 20,
            state_dir: Some(self.dir.path().join("state")),
            snapshot: None,
            accept_rollback: false,
        }
    }

    fn open(&self) -> Arc<Volume> {
        Volume::open(&self.store(), &self.ks, &self.opts()).unwrap()
    }
}

fn read_all(v: &Volume, ino: u64) -> Vec<u8> {
    let size = v.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let d = v.read(ino, off, 100_000).unwrap();
        assert!(!d.is_empty());
        off += d.len() as u64;
        out.extend(d);
    }
    out
}

#[test]
fn create_open_roundtrip_and_in_use() {
    let f = Fixture::new();
    f.create(DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_MAX);
    let v = f.open();
    let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
    assert!(matches!(e, OpenError::InUse { .. }), "{e}");
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(a.ino, 0, b"hello").unwrap();
    v.close().unwrap();
    drop(v);
    let v = f.open();
    let a2 = v.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(a2.ino, a.ino);
    assert_eq!(read_all(&v, a.ino), b"hello");
}

#[test]
fn create_refuses_non_empty_and_bad_chunk_size() {
    let f = Fixture::new();
    std::fs::create_dir(f.store()).unwrap();
    std::fs::write(f.store().join("x"), b"x").unwrap();
    let o = CreateOptions::default();
    assert!(matches!(
        Volume::create(&f.store(), &f.ks, &o),
        Err(OpenError::NotEmpty(_))
    ));
    assert_eq!(std::fs::read(f.store().join("x")).unwrap(), b"x");
    let o = CreateOptions {
        chunk_size: 5000,
        ..Default::default()
    };
    let s2 = f.dir.path().join("s2");
    assert!(matches!(
        Volume::create(&s2, &f.ks, &o),
        Err(OpenError::BadChunkSize(5000))
    ));
    assert!(!s2.exists());
    let o = CreateOptions {
        kms_key: "alias/nope".into(),
        ..Default::default()
    };
    assert!(Volume::create(&s2, &f.ks, &o).is_err());
    assert!(!s2.exists(), "no half-made store is left behind");
}

#[test]
fn chunked_write_truncate_and_sparse() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    v.write(a.ino, 0, &data).unwrap();
    assert_eq!(read_all(&v, a.ino), data);
    v.commit(false).unwrap();
    // shrink into the middle of a chunk, then grow: the gap reads zeros
    v.setattr(
        a.ino,
        &SetAttr {
            size: Some(5000),
            ..Default::default()
        },
    )
    .unwrap();
    v.setattr(
        a.ino,
        &SetAttr {
            size: Some(9000),
            ..Default::default()
        },
    )
    .unwrap();
    let got = read_all(&v, a.ino);
    assert_eq!(&got[..5000], &data[..5000]);
    assert!(got[5000..].iter().all(|&b| b == 0));
    // sparse write far away
    v.write(a.ino, 10 << 20, b"tail").unwrap();
    assert_eq!(v.getattr(a.ino).unwrap().size, (10 << 20) + 4);
    assert_eq!(v.read(a.ino, 5 << 20, 8).unwrap(), vec![0u8; 8]);
    assert_eq!(v.lseek(a.ino, 9000, libc::SEEK_DATA).unwrap(), 10 << 20);
    // the data of chunk 0 ends at 5000 (truncated there, then grown)
    assert_eq!(v.lseek(a.ino, 0, libc::SEEK_HOLE).unwrap(), 5000);
    assert_eq!(v.lseek(a.ino, 4999, libc::SEEK_DATA).unwrap(), 4999);
    assert_eq!(v.lseek(a.ino, 5000, libc::SEEK_DATA).unwrap(), 10 << 20);
    assert!(v.getattr(a.ino).unwrap().blocks < 100);
    v.close().unwrap();
    drop(v);
    let v = f.open();
    let got = read_all(&v, a.ino);
    assert_eq!(&got[..5000], &data[..5000]);
    assert!(got[5000..10 << 20].iter().all(|&b| b == 0));
    assert_eq!(&got[10 << 20..], b"tail");
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.open_file(a.ino).unwrap();
    v.write(a.ino, 0, &vec![7u8; 10_000]).unwrap();
    v.commit(false).unwrap();
    v.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(v.lookup(ROOT_INO, b"f").unwrap_err(), FsError::NOENT);
    assert_eq!(read_all(&v, a.ino), vec![7u8; 10_000]);
    v.write(a.ino, 0, b"xyz").unwrap();
    v.commit(false).unwrap();
    v.release_file(a.ino);
    // releasing frees the objects at the next commit, even with no other change
    v.commit(false).unwrap();
    let store = LocalDirStore::open(&f.store()).unwrap();
    assert!(store.list(Kind::Chunk).unwrap().is_empty());
    assert_eq!(v.getattr(a.ino).unwrap_err(), FsError::NOENT);
    v.close().unwrap();
    drop(v);
    // all chunk objects were freed
    let store = LocalDirStore::open(&f.store()).unwrap();
    assert!(store.list(Kind::Chunk).unwrap().is_empty());
}

#[test]
fn overwritten_chunks_are_freed_after_commit() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(a.ino, 0, &vec![1u8; 4096 * 4]).unwrap();
    v.commit(false).unwrap();
    let store = LocalDirStore::open(&f.store()).unwrap();
    assert_eq!(store.list(Kind::Chunk).unwrap().len(), 4);
    v.write(a.ino, 0, &vec![2u8; 4096 * 2]).unwrap();
    v.commit(false).unwrap();
    assert_eq!(store.list(Kind::Chunk).unwrap().len(), 4);
}

#[test]
fn rename_semantics() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let d1 = v.mkdir(ROOT_INO, b"d1", 0o755, 0, 0).unwrap();
    let d2 = v.mkdir(d1.ino, b"d2", 0o755, 0, 0).unwrap();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    let b = v
        .mknod(ROOT_INO, b"b", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    // dir into its own subtree
    assert_eq!(
        v.rename(ROOT_INO, b"d1", d2.ino, b"x", 0).unwrap_err(),
        FsError::INVAL
    );
    // noreplace
    assert_eq!(
        v.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
            .unwrap_err(),
        FsError::EXIST
    );
    // exchange file and dir across directories
    v.rename(ROOT_INO, b"a", d1.ino, b"d2", RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(v.lookup(ROOT_INO, b"a").unwrap().ino, d2.ino);
    assert_eq!(v.lookup(d1.ino, b"d2").unwrap().ino, a.ino);
    assert_eq!(v.lookup(d2.ino, b"..").unwrap().ino, ROOT_INO);
    // replace file
    v.rename(d1.ino, b"d2", ROOT_INO, b"b", 0).unwrap();
    assert_eq!(v.lookup(ROOT_INO, b"b").unwrap().ino, a.ino);
    assert_eq!(v.getattr(b.ino).unwrap_err(), FsError::NOENT);
    // dir over non-empty dir
    v.mknod(d1.ino, b"inner", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    assert_eq!(
        v.rename(ROOT_INO, b"a", ROOT_INO, b"d1", 0).unwrap_err(),
        FsError::NOTEMPTY
    );
    assert_eq!(
        v.rename(ROOT_INO, b"b", ROOT_INO, b"d1", 0).unwrap_err(),
        FsError::ISDIR
    );
    assert_eq!(
        v.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0).unwrap_err(),
        FsError::NOTDIR
    );
    // nlink bookkeeping
    assert_eq!(v.getattr(ROOT_INO).unwrap().nlink, 4); // ., d1, a (dir)
    v.close().unwrap();
}

#[test]
fn xattr_semantics() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    assert_eq!(
        v.setxattr(a.ino, b"user.x", b"1", libc::XATTR_REPLACE)
            .unwrap_err(),
        FsError::NODATA
    );
    v.setxattr(a.ino, b"user.x", b"1", libc::XATTR_CREATE)
        .unwrap();
    assert_eq!(
        v.setxattr(a.ino, b"user.x", b"2", libc::XATTR_CREATE)
            .unwrap_err(),
        FsError::EXIST
    );
    v.setxattr(a.ino, b"user.x", b"2", libc::XATTR_REPLACE)
        .unwrap();
    v.setxattr(a.ino, b"user.y", b"", 0).unwrap();
    assert_eq!(v.getxattr(a.ino, b"user.x").unwrap(), b"2");
    assert_eq!(v.listxattr(a.ino).unwrap(), b"user.x\0user.y\0");
    v.removexattr(a.ino, b"user.y").unwrap();
    assert_eq!(
        v.removexattr(a.ino, b"user.y").unwrap_err(),
        FsError::NODATA
    );
    v.close().unwrap();
}

#[test]
fn crash_state_reopens_with_committed_data() {
    // Copy the store while the volume is open (as a crash would leave it)
    // and open the copy: committed data is there, uncommitted is not.
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(a.ino, 0, &vec![3u8; 9000]).unwrap();
    v.fsync(a.ino).unwrap();
    let b = v
        .mknod(ROOT_INO, b"b", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(b.ino, 0, &vec![4u8; 9000]).unwrap();
    v.write(a.ino, 0, &[5u8; 100]).unwrap();
    let copy = f.dir.path().join("copy");
    copy_dir(&f.store(), &copy);
    std::fs::remove_file(copy.join(LOCK_FILE)).ok();
    let mut o = f.opts();
    o.state_dir = Some(f.dir.path().join("state-of-the-copy"));
    let v2 = Volume::open(&copy, &f.ks, &o).unwrap();
    assert_eq!(read_all(&v2, a.ino), vec![3u8; 9000]);
    assert_eq!(v2.lookup(ROOT_INO, b"b").unwrap_err(), FsError::NOENT);
    drop(v2);
    v.close().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn rollback_is_detected() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    v.close().unwrap();
    drop(v);
    let old = f.dir.path().join("old");
    copy_dir(&f.store(), &old);
    let v = f.open();
    v.mknod(ROOT_INO, b"new", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.close().unwrap();
    drop(v);
    std::fs::remove_dir_all(f.store()).unwrap();
    std::fs::rename(&old, f.store()).unwrap();
    let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
    assert!(matches!(e, OpenError::Rollback { .. }), "{e}");
    assert!(e.to_string().contains("--accept-rollback"), "{e}");
    // accepting it records the store as it is: the next open passes
    let mut o = f.opts();
    o.accept_rollback = true;
    Volume::open(&f.store(), &f.ks, &o)
        .unwrap()
        .close()
        .unwrap();
    // and it is in the audit log
    let log = std::fs::read_to_string(f.dir.path().join("ks.audit")).unwrap();
    assert!(log.contains("AcceptRollback"), "{log}");
    Volume::open(&f.store(), &f.ks, &f.opts())
        .unwrap()
        .close()
        .unwrap();
}

/// A store replaced by another copy whose history has as many commits
/// (or more), but not the ones this machine saw, is refused.
#[test]
fn diverged_history_is_refused() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    v.close().unwrap();
    drop(v);
    let fork = f.dir.path().join("fork");
    copy_dir(&f.store(), &fork);
    // history A, seen by this machine: one commit
    let v = f.open();
    v.mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.close().unwrap();
    drop(v);
    // history B, made elsewhere from the same origin: two commits
    let mut o = f.opts();
    o.state_dir = Some(f.dir.path().join("elsewhere"));
    let v = Volume::open(&fork, &f.ks, &o).unwrap();
    v.mknod(ROOT_INO, b"b", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.commit(false).unwrap();
    v.mknod(ROOT_INO, b"c", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.close().unwrap();
    drop(v);
    std::fs::remove_dir_all(f.store()).unwrap();
    std::fs::rename(&fork, f.store()).unwrap();
    let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
    assert!(matches!(e, OpenError::Diverged { .. }), "{e}");
}

/// A damaged record of the last commit seen refuses the open (instead of
/// skipping the check) until the store is accepted as it is.
#[test]
fn garbage_seen_state_is_refused() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let id = v.id();
    v.close().unwrap();
    drop(v);
    let sf = f.dir.path().join("state/volumes").join(format!("{id}.seq"));
    let text = std::fs::read_to_string(&sf).unwrap();
    assert!(text.starts_with("sealfs-seen 1\nseq "), "{text}");
    for bad in ["", "garbage\n", "sealfs-seen 1\nseq 1\ntag zz\n"] {
        std::fs::write(&sf, bad).unwrap();
        let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
        assert!(matches!(e, OpenError::BadSeenState { .. }), "{bad:?}: {e}");
        assert!(e.to_string().contains("--accept-rollback"), "{e}");
    }
    // the bare number of earlier versions still reads
    std::fs::write(&sf, "0\n").unwrap();
    Volume::open(&f.store(), &f.ks, &f.opts())
        .unwrap()
        .close()
        .unwrap();
}

/// The lease names the holder; with the lock file deleted under a live
/// writer, a second writer is still refused, naming the first.
#[test]
fn deleted_lock_file_does_not_let_a_second_writer_in() {
    let f = Fixture::new();
    f.create(4096, 1024);
    crate::store::set_lock_context("mount /mnt/test", false);
    let v = f.open();
    std::fs::remove_file(f.store().join(LOCK_FILE)).unwrap();
    let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
    assert!(matches!(e, OpenError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("mount /mnt/test"), "{e}");
    // the lease is renewed and still ours
    v.renew_lease();
    assert!(v.check_writable().is_ok());
    v.close().unwrap();
    drop(v);
    assert!(!f.store().join("lease").exists());
    Volume::open(&f.store(), &f.ks, &f.opts())
        .unwrap()
        .close()
        .unwrap();
}

/// A lease of this machine whose process is gone is taken over; one from
/// another machine needs --force-unlock; a writer whose lease was taken
/// over stops writing.
#[test]
fn stale_and_foreign_leases() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let mut h = crate::store::Holder::this_process("mount /gone");
    h.pid = u32::MAX - 1; // no such process
    let lease = f.store().join("lease");
    std::fs::write(&lease, serde_json::to_vec(&h).unwrap()).unwrap();
    Volume::open(&f.store(), &f.ks, &f.opts())
        .unwrap()
        .close()
        .unwrap();
    h.host_id = "another-machine".into();
    h.hostname = "elsewhere".into();
    std::fs::write(&lease, serde_json::to_vec(&h).unwrap()).unwrap();
    let e = Volume::open(&f.store(), &f.ks, &f.opts()).unwrap_err();
    assert!(matches!(e, OpenError::Lease(_)), "{e}");
    assert!(e.to_string().contains("--force-unlock"), "{e}");
    assert!(e.to_string().contains("elsewhere"), "{e}");
    crate::store::set_lock_context("test", true);
    let v = Volume::open(&f.store(), &f.ks, &f.opts());
    crate::store::set_lock_context("test", false);
    let v = v.unwrap();
    // now another machine takes it over from us
    std::fs::write(&lease, serde_json::to_vec(&h).unwrap()).unwrap();
    v.renew_lease();
    assert_eq!(v.check_writable().unwrap_err(), FsError::ROFS);
    assert_eq!(
        v.mknod(ROOT_INO, b"x", FileKind::File, 0o644, 0, 0, 0)
            .unwrap_err(),
        FsError::ROFS
    );
    drop(v);
    // (the other machine's lease is left alone)
    assert!(lease.exists());
}

#[test]
fn many_commits_trigger_checkpoint_and_compaction() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    for i in 0..(CHECKPOINT_RECORDS + 5) {
        v.write(a.ino, 0, &i.to_le_bytes()).unwrap();
        v.commit(false).unwrap();
    }
    let store = LocalDirStore::open(&f.store()).unwrap();
    let metas = store.list(Kind::Meta).unwrap();
    assert!(metas.len() < 10, "journal was compacted: {metas:?}");
    drop(v);
    let v = f.open();
    assert_eq!(
        read_all(&v, a.ino)[..8],
        (CHECKPOINT_RECORDS + 4).to_le_bytes()
    );
}

// ----- model-based test ------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Mkdir(u8),
    Write(u8, u32, u16, u8),
    Truncate(u8, u32),
    Punch(u8, u32, u16),
    Unlink(u8),
    Rename(u8, u8),
    Link(u8, u8),
    Fsync,
    Remount,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..5).prop_map(Op::Create),
        1 => (0u8..3).prop_map(Op::Mkdir),
        6 => (0u8..5, 0u32..40_000, 0u16..12_000, any::<u8>()).prop_map(|(f, o, l, s)| Op::Write(f, o, l, s)),
        2 => (0u8..5, 0u32..40_000).prop_map(|(f, s)| Op::Truncate(f, s)),
        1 => (0u8..5, 0u32..40_000, 1u16..12_000).prop_map(|(f, o, l)| Op::Punch(f, o, l)),
        1 => (0u8..5).prop_map(Op::Unlink),
        1 => (0u8..5, 0u8..5).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (0u8..5, 0u8..5).prop_map(|(a, b)| Op::Link(a, b)),
        1 => Just(Op::Fsync),
        1 => Just(Op::Remount),
    ]
}

fn fname(i: u8) -> Vec<u8> {
    format!("f{i}").into_bytes()
}

/// Model: root-level files by name -> content id; contents by id (hard links
/// share an id); plus directory names.
#[derive(Default, Debug)]
struct Model {
    names: Map<Vec<u8>, usize>,
    contents: Vec<Vec<u8>>,
    dirs: std::collections::BTreeSet<Vec<u8>>,
}

fn check(v: &Volume, m: &Model) {
    let entries = v.readdir(ROOT_INO).unwrap();
    let mut files = Map::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (ino, kind, name) in entries.into_iter().skip(2) {
        match kind {
            FileKind::Dir => {
                dirs.insert(name);
            }
            _ => {
                files.insert(name, ino);
            }
        }
    }
    assert_eq!(dirs, m.dirs);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        m.names.keys().collect::<Vec<_>>()
    );
    for (name, ino) in &files {
        let want = &m.contents[m.names[name]];
        assert_eq!(
            v.getattr(*ino).unwrap().size,
            want.len() as u64,
            "size of {name:?}"
        );
        assert!(read_all(v, *ino) == *want, "content of {name:?}");
    }
}

fn run_model(ops: Vec<Op>) {
    let f = Fixture::new();
    f.create(4096, 1024);
    let mut v = f.open();
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Create(i) => {
                let r = v.mknod(ROOT_INO, &fname(i), FileKind::File, 0o644, 0, 0, 0);
                if m.names.contains_key(&fname(i)) {
                    assert_eq!(r.unwrap_err(), FsError::EXIST);
                } else {
                    r.unwrap();
                    m.contents.push(Vec::new());
                    m.names.insert(fname(i), m.contents.len() - 1);
                }
            }
            Op::Mkdir(i) => {
                let n = format!("d{i}").into_bytes();
                let r = v.mkdir(ROOT_INO, &n, 0o755, 0, 0);
                if m.dirs.contains(&n) {
                    assert_eq!(r.unwrap_err(), FsError::EXIST);
                } else {
                    r.unwrap();
                    m.dirs.insert(n);
                }
            }
            Op::Write(i, off, len, seed) => {
                if !m.names.contains_key(&fname(i)) {
                    // like open(O_CREAT) + write
                    v.mknod(ROOT_INO, &fname(i), FileKind::File, 0o644, 0, 0, 0)
                        .unwrap();
                    m.contents.push(Vec::new());
                    m.names.insert(fname(i), m.contents.len() - 1);
                }
                if let Some(&c) = m.names.get(&fname(i)) {
                    let ino = v.lookup(ROOT_INO, &fname(i)).unwrap().ino;
                    let data: Vec<u8> = (0..len as u32)
                        .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed))
                        .collect();
                    v.write(ino, off as u64, &data).unwrap();
                    let mc = &mut m.contents[c];
                    let end = off as usize + data.len();
                    if !data.is_empty() {
                        if mc.len() < end {
                            mc.resize(end, 0);
                        }
                        mc[off as usize..end].copy_from_slice(&data);
                    }
                }
            }
            Op::Truncate(i, size) => {
                if let Some(&c) = m.names.get(&fname(i)) {
                    let ino = v.lookup(ROOT_INO, &fname(i)).unwrap().ino;
                    v.setattr(
                        ino,
                        &SetAttr {
                            size: Some(size as u64),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    m.contents[c].resize(size as usize, 0);
                }
            }
            Op::Punch(i, off, len) => {
                if let Some(&c) = m.names.get(&fname(i)) {
                    let ino = v.lookup(ROOT_INO, &fname(i)).unwrap().ino;
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    v.fallocate(ino, off as u64, len as u64, mode).unwrap();
                    let mc = &mut m.contents[c];
                    let end = (off as usize + len as usize).min(mc.len());
                    if (off as usize) < end {
                        mc[off as usize..end].fill(0);
                    }
                }
            }
            Op::Unlink(i) => {
                let r = v.unlink(ROOT_INO, &fname(i));
                if m.names.remove(&fname(i)).is_some() {
                    r.unwrap();
                } else {
                    assert_eq!(r.unwrap_err(), FsError::NOENT);
                }
            }
            Op::Rename(a, b) => {
                let r = v.rename(ROOT_INO, &fname(a), ROOT_INO, &fname(b), 0);
                match m.names.get(&fname(a)).copied() {
                    Some(c) => {
                        r.unwrap();
                        if a != b && m.names.get(&fname(b)) != Some(&c) {
                            m.names.remove(&fname(a));
                            m.names.insert(fname(b), c);
                        } else if a != b {
                            // same inode under both names: POSIX says nothing happens
                        }
                    }
                    None => assert_eq!(r.unwrap_err(), FsError::NOENT),
                }
            }
            Op::Link(a, b) => {
                if let Some(c) = m.names.get(&fname(a)).copied() {
                    let ino = v.lookup(ROOT_INO, &fname(a)).unwrap().ino;
                    let r = v.link(ino, ROOT_INO, &fname(b));
                    match m.names.entry(fname(b)) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            assert_eq!(r.unwrap_err(), FsError::EXIST)
                        }
                        std::collections::btree_map::Entry::Vacant(e) => {
                            r.unwrap();
                            e.insert(c);
                        }
                    }
                }
            }
            Op::Fsync => v.fsync(ROOT_INO).unwrap(),
            Op::Remount => {
                v.close().unwrap();
                drop(v);
                v = f.open();
            }
        }
        check(&v, &m);
    }
    v.close().unwrap();
    drop(v);
    let v = f.open();
    check(&v, &m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn volume_matches_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        run_model(ops);
    }
}

#[test]
fn concurrent_writers_and_commits_keep_every_byte() {
    // Four threads write random pieces into their own (unaligned) regions
    // of one file while another thread commits; chunk flushes run outside
    // the lock and must never lose or misplace a write.
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    const REGION: usize = 50_000;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let expected: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let committer = sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                v.commit(false).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let v = &v;
                sc.spawn(move || {
                    let mut mine = vec![0u8; REGION];
                    let mut x = t * 7919 + 1;
                    for _ in 0..400 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % REGION as u64) as usize;
                        let len = ((x >> 20) % 9000) as usize + 1;
                        let len = len.min(REGION - off);
                        let byte = (x >> 40) as u8;
                        let data = vec![byte; len];
                        v.write(a.ino, t * REGION as u64 + off as u64, &data)
                            .unwrap();
                        mine[off..off + len].copy_from_slice(&data);
                    }
                    mine
                })
            })
            .collect();
        let r = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        committer.join().unwrap();
        r
    });
    let want: Vec<u8> = expected.concat();
    let got = read_all(&v, a.ino);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "content after concurrent writes");
    v.close().unwrap();
    drop(v);
    let v = f.open();
    assert!(read_all(&v, a.ino) == want, "content after remount");
    // no chunk object is leaked or missing: stored objects == referenced
    let store = LocalDirStore::open(&f.store()).unwrap();
    let objs = store.list(Kind::Chunk).unwrap().len();
    assert_eq!(objs, (want.len() as u64).div_ceil(4096) as usize);
}

#[test]
fn damaged_chunk_fails_partial_updates_without_changing_the_file() {
    let f = Fixture::new();
    f.create(4096, 1024);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(a.ino, 0, &[9u8; 12288]).unwrap();
    v.close().unwrap();
    drop(v);
    // damage every chunk object
    let store = LocalDirStore::open(&f.store()).unwrap();
    for n in store.list(Kind::Chunk).unwrap() {
        let p = f.store().join("chunks").join(&n[..2]).join(&n);
        let mut d = std::fs::read(&p).unwrap();
        let last = d.len() - 1;
        d[last] ^= 1;
        std::fs::write(&p, d).unwrap();
    }
    let v = f.open();
    let trunc = SetAttr {
        size: Some(5000),
        ..Default::default()
    };
    assert_eq!(v.setattr(a.ino, &trunc).unwrap_err(), FsError::IO);
    assert_eq!(v.write(a.ino, 4000, &[1u8; 200]).unwrap_err(), FsError::IO);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        v.fallocate(a.ino, 100, 200, punch).unwrap_err(),
        FsError::IO
    );
    assert_eq!(v.getattr(a.ino).unwrap().size, 12288);
    v.close().unwrap();
    drop(v);
    // nothing was committed by the failed operations
    let v = f.open();
    assert_eq!(v.getattr(a.ino).unwrap().size, 12288);
    assert_eq!(store.list(Kind::Chunk).unwrap().len(), 3);
}

/// A new empty regular file in the root.
fn new_file(v: &Volume, name: &[u8]) -> Attr {
    v.mknod(ROOT_INO, name, FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
}

fn chunk_objects(store: &Path) -> std::collections::BTreeSet<String> {
    LocalDirStore::open(store)
        .unwrap()
        .list(Kind::Chunk)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn snapshots_are_copy_on_write_and_survive_reopen() {
    let f = Fixture::new();
    f.create(4096, 0);
    let v = f.open();
    let a = new_file(&v, b"a");
    let old: Vec<u8> = (0..5 * 4096).map(|i| (i % 251) as u8).collect();
    v.write(a.ino, 0, &old).unwrap();
    v.snapshot_create("s1").unwrap();
    assert!(matches!(
        v.snapshot_create("s1"),
        Err(SnapshotError::Exists(_))
    ));
    let held = chunk_objects(&f.store());
    assert_eq!(held.len(), 5);
    // overwrite two chunks and commit: the old ones stay for the snapshot
    v.write(a.ino, 0, &[7u8; 8192]).unwrap();
    v.commit(false).unwrap();
    assert_eq!(chunk_objects(&f.store()).len(), 7);
    let snap = v.virt_lookup(SNAPDIR_INO, b"s1").unwrap().unwrap();
    let sa = v.lookup(snap.ino, b"a").unwrap();
    assert!(is_virtual(sa.ino));
    assert_eq!(read_all(&v, sa.ino), old);
    assert_eq!(v.write(sa.ino, 0, b"x"), Err(FsError::ROFS));
    assert_eq!(v.unlink(snap.ino, b"a"), Err(FsError::ROFS));
    // not listed in the root, reachable by name
    assert!(!v
        .readdir(ROOT_INO)
        .unwrap()
        .iter()
        .any(|(_, _, n)| n == SNAPDIR_NAME));
    assert_eq!(v.lookup(ROOT_INO, SNAPDIR_NAME).unwrap().ino, SNAPDIR_INO);
    let list = v.snapshot_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].exclusive, 2 * (4096 + 38));
    v.close().unwrap();
    drop(v);
    // after reopen: still there; deleting frees exactly the two chunks
    let v = f.open();
    let snap = v.lookup(SNAPDIR_INO, b"s1").unwrap();
    assert_eq!(read_all(&v, v.lookup(snap.ino, b"a").unwrap().ino), old);
    assert_eq!(v.snapshot_delete("s1").unwrap().0, 2);
    assert!(matches!(
        v.snapshot_delete("s1"),
        Err(SnapshotError::Unknown(_))
    ));
    let now = chunk_objects(&f.store());
    assert_eq!(now.len(), 5);
    assert!(held.iter().filter(|c| !now.contains(*c)).count() == 2);
    let mut expect = old.clone();
    expect[..8192].fill(7);
    assert_eq!(read_all(&v, a.ino), expect);
}

#[test]
fn gc_removes_only_unreferenced_objects() {
    let f = Fixture::new();
    f.create(4096, 0);
    let v = f.open();
    let a = new_file(&v, b"a");
    v.write(a.ino, 0, &[1u8; 3 * 4096]).unwrap();
    v.snapshot_create("s").unwrap();
    v.write(a.ino, 0, &[2u8; 4096]).unwrap();
    // an orphan, as a crash between writing a chunk and its commit leaves
    let store = LocalDirStore::open(&f.store()).unwrap();
    store
        .put(Kind::Chunk, &hex::encode([9u8; 16]), b"junk", false)
        .unwrap();
    let r = v.gc(&mut |_, _| {}).unwrap();
    assert_eq!(r.chunks_removed, 1);
    // live (4 chunks incl. the one in memory, flushed by gc's wait or not)
    // and snapshot-held chunks remain
    v.commit(false).unwrap();
    assert_eq!(chunk_objects(&f.store()).len(), 4);
    assert_eq!(read_all(&v, a.ino)[..4096], [2u8; 4096]);
    v.close().unwrap();
    drop(v);
    let mut p = |_, _| {};
    let r = fsck::fsck(&f.store(), &f.ks, false, &mut p).unwrap();
    assert!(r.clean(), "{:?}", r.problems);
    assert_eq!(r.states, 2);
}

#[test]
fn clone_shares_chunks_and_reencrypt_copies() {
    let f = Fixture::new();
    f.create(4096, 4096);
    let v = f.open();
    let a = new_file(&v, b"a");
    let data: Vec<u8> = (0..20000).map(|i| (i % 13) as u8).collect();
    v.write(a.ino, 0, &data).unwrap();
    let b = new_file(&v, b"small");
    v.write(b.ino, 0, b"inline").unwrap();
    v.snapshot_create("s").unwrap();
    v.close().unwrap();
    drop(v);
    for reencrypt in [false, true] {
        let dest = f.dir.path().join(format!("clone-{reencrypt}"));
        let o = clone::CloneOptions {
            snapshot: Some("s".into()),
            kms_key: None,
            reencrypt,
        };
        let r = clone::clone_store(&f.store(), &dest, &f.ks, &o, &mut |_, _| {}).unwrap();
        assert_eq!(r.chunks, 5);
        assert_eq!(r.linked, if reencrypt { 0 } else { 5 });
        let c = Volume::open(&dest, &f.ks, &f.opts()).unwrap();
        assert_ne!(c.id(), peek_store_id(&f.store()).unwrap());
        let ca = c.lookup(ROOT_INO, b"a").unwrap();
        assert_eq!(read_all(&c, ca.ino), data);
        let cb = c.lookup(ROOT_INO, b"small").unwrap();
        assert_eq!(read_all(&c, cb.ino), b"inline");
        // the clone writes and deletes on its own
        c.write(ca.ino, 0, b"changed").unwrap();
        c.close().unwrap();
        // into a non-empty target: refused, nothing written
        assert!(matches!(
            clone::clone_store(&f.store(), &dest, &f.ks, &o, &mut |_, _| {}),
            Err(OpenError::NotEmpty(_))
        ));
    }
    // the origin is unchanged
    let v = f.open();
    assert_eq!(read_all(&v, v.lookup(ROOT_INO, b"a").unwrap().ino), data);
}

#[test]
fn format_2_stores_are_read_and_upgraded_by_a_read_write_open() {
    let f = Fixture::new();
    f.create(4096, 4096);
    let v = f.open();
    let a = new_file(&v, b"a");
    v.write(a.ino, 0, &[4u8; 10000]).unwrap();
    v.close().unwrap();
    drop(v);
    // rewrite the header as format 2: the body without the data id
    let hp = f.store().join(HEADER_FILE);
    let (hdr, vmk, _) = read_header(&open_store(&f.store()).unwrap(), &f.ks).unwrap();
    let mac_key = vmk.derive(LABEL_HEADER_MAC);
    let v3 = encode_header(&hdr, &mac_key);
    let len = u32::from_le_bytes(v3[10..14].try_into().unwrap()) as usize;
    let mut v2 = b"SEALFSV\0\x02\x00".to_vec();
    v2.extend_from_slice(&((len - 16) as u32).to_le_bytes());
    v2.extend_from_slice(&v3[14..14 + len - 16]);
    let mac = crypto::hmac(&mac_key, &v2);
    v2.extend_from_slice(&mac);
    std::fs::write(&hp, &v2).unwrap();
    // read-only: read as it is, left as it is
    let mut ro = f.opts();
    ro.read_only = true;
    let v = Volume::open(&f.store(), &f.ks, &ro).unwrap();
    assert_eq!(read_all(&v, a.ino), vec![4u8; 10000]);
    drop(v);
    assert_eq!(header_version(&std::fs::read(&hp).unwrap()), 2);
    assert_eq!(Volume::info(&f.store(), &f.ks).unwrap().format_version, 2);
    // read-write: upgraded to the current format, data id = store id
    let v = f.open();
    assert_eq!(read_all(&v, a.ino), vec![4u8; 10000]);
    drop(v);
    let now = std::fs::read(&hp).unwrap();
    assert_eq!(header_version(&now), FORMAT_VERSION);
    let h = decode_header(&now).unwrap();
    assert_eq!(h.data_id, h.store_id);
    assert_eq!(
        Volume::info(&f.store(), &f.ks).unwrap().format_version,
        FORMAT_VERSION
    );
}

#[test]
fn a_deleted_snapshot_put_back_is_ignored_and_collected() {
    let f = Fixture::new();
    f.create(4096, 0);
    let v = f.open();
    let a = new_file(&v, b"a");
    v.write(a.ino, 0, &[1u8; 4096]).unwrap();
    let info = v.snapshot_create("old").unwrap();
    let name = format!("snapshot-{}", info.id);
    let path = f.store().join("meta").join(&name);
    let saved = std::fs::read(&path).unwrap();
    v.write(a.ino, 0, &[2u8; 4096]).unwrap();
    v.snapshot_delete("old").unwrap();
    v.close().unwrap();
    drop(v);
    // an attacker (or a restore) puts the manifest back
    std::fs::write(&path, &saved).unwrap();
    // it is not found by a snapshot mount either
    let mut o = f.opts();
    o.snapshot = Some("old".into());
    let e = Volume::open(&f.store(), &f.ks, &o).unwrap_err();
    assert!(matches!(e, OpenError::UnknownSnapshot { .. }), "{e}");
    let v = f.open();
    assert!(v.snapshot_list().is_empty());
    assert!(v.lookup(SNAPDIR_INO, b"old").is_err());
    let r = v.gc(&mut |_, _| {}).unwrap();
    assert_eq!(r.meta_removed, 1);
    assert!(!path.exists());
}

/// The manifest file of the only snapshot.
fn only_manifest(f: &Fixture) -> PathBuf {
    std::fs::read_dir(f.store().join("meta"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snapshot-")
        })
        .expect("a snapshot manifest")
}

#[test]
fn unreadable_manifest_keeps_freed_chunks() {
    let old: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
    let (f, v, a) = volume_with_file_a(&old);
    v.snapshot_create("s1").unwrap();
    let man = only_manifest(&f);
    v.snapshot_create("s2").unwrap();
    v.close().unwrap();
    drop(v);
    // s1's manifest cannot be read at the next open (EISDIR stands in for a
    // transient I/O error)
    let aside = f.dir.path().join("aside");
    std::fs::rename(&man, &aside).unwrap();
    std::fs::create_dir(&man).unwrap();
    let v = f.open();
    // neither the live volume nor deleting s2 may free what s1 holds
    v.write(a.ino, 0, &[9u8; 3 * 4096]).unwrap();
    v.commit(false).unwrap();
    v.snapshot_delete("s2").unwrap();
    v.close().unwrap();
    drop(v);
    std::fs::remove_dir(&man).unwrap();
    std::fs::rename(&aside, &man).unwrap();
    let v = f.open();
    let snap = v.lookup(snapshot::SNAPDIR_INO, b"s1").unwrap();
    let sa = v.lookup(snap.ino, b"a").unwrap();
    assert_eq!(v.read(sa.ino, 0, 3 * 4096).unwrap(), old);
    assert_eq!(v.read(a.ino, 0, 3 * 4096).unwrap(), vec![9u8; 3 * 4096]);
}

/// Open the fixture's store with another local state directory (as
/// another machine would).
fn open_with_state(f: &Fixture, state: &str) -> Arc<Volume> {
    let o = OpenOptions2 {
        state_dir: Some(f.dir.path().join(state)),
        ..f.opts()
    };
    Volume::open(&f.store(), &f.ks, &o).unwrap()
}

#[test]
fn manifests_with_one_name_are_both_refused() {
    let (f, v, a) = volume_with_file_a(&[1u8; 8192]);
    v.snapshot_create("s").unwrap();
    v.close().unwrap();
    drop(v);
    // an old copy of the manifest kept aside; the snapshot deleted and
    // taken again under the same name
    let copy = std::fs::read(only_manifest(&f)).unwrap();
    let copy_name = only_manifest(&f).file_name().unwrap().to_owned();
    // another machine: no record of deleted snapshots
    let v = open_with_state(&f, "state2");
    v.snapshot_delete("s").unwrap();
    v.write(a.ino, 0, &[2u8; 8192]).unwrap();
    v.snapshot_create("s").unwrap();
    v.close().unwrap();
    drop(v);
    std::fs::write(f.store().join("meta").join(copy_name), copy).unwrap();
    let v = open_with_state(&f, "state3");
    assert_eq!(
        v.snapshot_count(),
        0,
        "neither manifest named \"s\" is used"
    );
    assert!(v.lookup(snapshot::SNAPDIR_INO, b"s").is_err());
    let e = v.gc(&mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("damaged"), "{e}");
    v.close().unwrap();
    drop(v);
    // nor by a snapshot mount or a clone
    let o = OpenOptions2 {
        snapshot: Some("s".into()),
        read_only: true,
        ..f.opts()
    };
    let e = Volume::open(&f.store(), &f.ks, &o).unwrap_err().to_string();
    assert!(e.contains("both named"), "{e}");
    let o = clone::CloneOptions {
        snapshot: Some("s".into()),
        ..Default::default()
    };
    let dest = f.dir.path().join("clone");
    let e = clone::clone_store(&f.store(), &dest, &f.ks, &o, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("both named"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn cloning_the_live_state_holds_the_store_lock() {
    let (f, v, _) = volume_with_file_a(&[1u8; 64 * 4096]);
    v.close().unwrap();
    drop(v);
    let dest = f.dir.path().join("clone");
    let mut tried = None;
    let (store, ks, opts) = (f.store(), &f.ks, f.opts());
    clone::clone_store(&store, &dest, ks, &Default::default(), &mut |_, _| {
        if tried.is_none() {
            tried = Some(matches!(
                Volume::open(&store, ks, &opts),
                Err(OpenError::InUse { .. })
            ));
        }
    })
    .unwrap();
    assert_eq!(
        tried,
        Some(true),
        "the origin opened read-write during the clone"
    );
    let c = Volume::open(&dest, ks, &opts).unwrap();
    let ca = c.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(c.read(ca.ino, 0, 64 * 4096).unwrap(), vec![1u8; 64 * 4096]);
}

#[test]
fn setattr_of_a_removed_inode_is_accepted_and_changes_nothing() {
    let (_f, v, a) = volume_with_file_a(&[5u8; 9000]);
    v.unlink(ROOT_INO, b"a").unwrap();
    v.commit(false).unwrap();
    // the kernel writing back times of the removed file (syncfs)
    let s = SetAttr {
        mtime: Some(SetTime::Now),
        ..Default::default()
    };
    let got = v.setattr(a.ino, &s).unwrap();
    assert_eq!((got.ino, got.nlink), (a.ino, 0));
    assert_eq!(v.getattr(a.ino).unwrap_err(), FsError::NOENT);
    assert_eq!(v.lookup(ROOT_INO, b"a").unwrap_err(), FsError::NOENT);
    // an inode that never existed is still ENOENT
    assert_eq!(v.setattr(999_999, &s).unwrap_err(), FsError::NOENT);
    v.close().unwrap();
}

/// A fresh 4 KiB-chunk volume (no inline files) with file "a" holding `data`.
fn volume_with_file_a(data: &[u8]) -> (Fixture, Arc<Volume>, Attr) {
    let f = Fixture::new();
    f.create(4096, 0);
    let v = f.open();
    let a = v
        .mknod(ROOT_INO, b"a", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    v.write(a.ino, 0, data).unwrap();
    (f, v, a)
}

/// `rekey` trusts only authenticated data to decide that a chunk is done: a
/// chunk whose (unauthenticated) generation field was changed to the new
/// generation is not skipped and kept under the old key (it would be lost
/// when the old key is dropped); the re-key stops with EIO instead.
#[test]
fn rekey_does_not_trust_a_forged_generation() {
    let (f, v, _a) = volume_with_file_a(&[5u8; 3 * 4096]);
    v.close().unwrap();
    drop(v);
    assert!(!Volume::rekey_begin(&f.store(), &f.ks, None).unwrap());
    // forge: every chunk claims the new generation
    for n in chunk_objects(&f.store()) {
        let p = f.store().join("chunks").join(&n[..2]).join(&n);
        let mut d = std::fs::read(&p).unwrap();
        let g = u32::from_le_bytes(d[6..10].try_into().unwrap());
        d[6..10].copy_from_slice(&(g + 1).to_le_bytes());
        std::fs::write(&p, d).unwrap();
    }
    let v = f.open();
    assert_eq!(v.rekey_content(&mut |_, _| {}).unwrap_err(), FsError::IO);
}

proptest! {
    /// The local record of the last commit seen: any text is an answer or
    /// an error, never a panic; what `encode_seen` writes reads back.
    #[test]
    fn seen_state_decoder_never_panics(text in ".{0,300}", seq in any::<u64>(), tag in any::<[u8; 16]>()) {
        let _ = decode_seen(&text);
        prop_assert_eq!(decode_seen(&encode_seen(seq, &tag)), Ok((seq, Some(tag))));
        let mut t = encode_seen(seq, &tag);
        t.push_str(&text);
        let _ = decode_seen(&t);
    }
}
