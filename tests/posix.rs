//! POSIX behaviour of a mounted sealfs volume, exercised with ordinary
//! std::fs / rustix calls and standard tools, mostly checked again after an
//! unmount + remount.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, RenameFlags, XattrFlags, CWD};

/// The default chunk size of new stores (boundary tests depend on it).
const CHUNK: usize = 128 * 1024;
const INLINE: usize = 4096;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e:?}"))
}

fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want}, got Ok({v:?})"),
        Err(e) => assert_eq!(errno(&e), want, "{what}: got {e}"),
    }
}

fn assert_rerrno<T: std::fmt::Debug>(r: rustix::io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.raw_os_error(), want, "{what}: got {e}"),
    }
}

/// Compare large byte buffers without dumping them on failure.
#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: content differs: len got {} want {}, first difference at byte {first} \
             (got {:?}, want {:?})",
            got.len(),
            want.len(),
            got.get(first..(first + 16).min(got.len())),
            want.get(first..(first + 16).min(want.len())),
        );
    }
}

fn setup() -> (Env, PathBuf, Mount) {
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    (env, store, m)
}

fn remount(env: &Env, store: &Path, m: Mount) -> Mount {
    m.unmount();
    env.mount(store, "mnt", &[])
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn run(cmd: &mut Command) -> std::process::Output {
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

// ---------------------------------------------------------------------------
// Regular files, chunk boundaries, inline limit
// ---------------------------------------------------------------------------

#[test]
fn regular_file_create_write_overwrite_append() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let p = m.path("f.txt");
    fs::write(&p, b"hello world").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello world");
    assert_eq!(fs::metadata(&p).unwrap().len(), 11);
    assert!(fs::metadata(&p).unwrap().is_file());

    // Overwrite the middle.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"WORLD", 6).unwrap();
    f.write_all_at(b"-", 5).unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"hello-WORLD");

    // Append.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"!!").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"hello-WORLD!!");

    // Truncating rewrite through O_TRUNC.
    fs::write(m.path("g.txt"), b"a much longer original content").unwrap();
    fs::write(m.path("g.txt"), b"short").unwrap();
    assert_eq!(fs::read(m.path("g.txt")).unwrap(), b"short");

    // Read with a seek in the middle.
    let mut f = File::open(&p).unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "WORLD!!");
    drop(f);

    // Empty file.
    File::create(m.path("empty")).unwrap();
    assert_eq!(fs::metadata(m.path("empty")).unwrap().len(), 0);

    let m = remount(&env, &store, m);
    assert_eq!(fs::read(m.path("f.txt")).unwrap(), b"hello-WORLD!!");
    assert_eq!(
        String::from_utf8_lossy(&fs::read(m.path("g.txt")).unwrap()),
        "short",
        "O_TRUNC rewrite after remount"
    );
    assert_eq!(fs::read(m.path("empty")).unwrap(), b"");
    assert_eq!(names(&m.mountpoint), vec!["empty", "f.txt", "g.txt"]);
    m.unmount();
}

#[test]
fn open_o_trunc_survives_remount() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::write(m.path("emptied"), b"some content to be truncated away").unwrap();
    fs::write(m.path("shorter"), b"a much longer original content").unwrap();
    fs::write(m.path("big"), pattern(8, 3 * CHUNK + 5)).unwrap();
    let m = remount(&env, &store, m);
    // O_TRUNC with no write at all.
    drop(File::create(m.path("emptied")).unwrap());
    // O_TRUNC then a shorter write.
    fs::write(m.path("shorter"), b"short").unwrap();
    // O_TRUNC of a multi-chunk file, then a small write.
    fs::write(m.path("big"), b"tiny").unwrap();
    let check = |m: &Mount, when: &str| {
        assert_eq!(fs::metadata(m.path("emptied")).unwrap().len(), 0, "{when}");
        assert_eq!(
            String::from_utf8_lossy(&fs::read(m.path("shorter")).unwrap()),
            "short",
            "{when}"
        );
        assert_bytes(&fs::read(m.path("big")).unwrap(), b"tiny", when);
    };
    check(&m, "before remount");
    let m = remount(&env, &store, m);
    check(&m, "after remount");
    m.unmount();
}

#[test]
fn chunk_boundaries_and_inline_limit() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let sizes = [
        0,
        1,
        INLINE - 1,
        INLINE,
        INLINE + 1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        3 * CHUNK + 123,
    ];
    let mut want = BTreeMap::new();
    for (i, &sz) in sizes.iter().enumerate() {
        let data = pattern(i as u64 + 1, sz);
        let name = format!("f{sz}");
        fs::write(m.path(&name), &data).unwrap();
        assert_eq!(fs::metadata(m.path(&name)).unwrap().len(), sz as u64);
        assert_bytes(&fs::read(m.path(&name)).unwrap(), &data, &name);
        want.insert(name, data);
    }

    // Overwrite a range straddling the first chunk boundary.
    {
        let name = format!("f{}", 3 * CHUNK + 123);
        let d = want.get_mut(&name).unwrap();
        let patch = pattern(99, 100);
        let f = OpenOptions::new().write(true).open(m.path(&name)).unwrap();
        f.write_all_at(&patch, (CHUNK - 50) as u64).unwrap();
        d[CHUNK - 50..CHUNK + 50].copy_from_slice(&patch);
        // And one straddling two boundaries (covering a whole chunk).
        let patch = pattern(98, CHUNK + 20);
        f.write_all_at(&patch, (CHUNK - 10) as u64).unwrap();
        d[CHUNK - 10..2 * CHUNK + 10].copy_from_slice(&patch);
    }

    // Grow an inline file past the inline limit by appending one byte, and
    // a file of exactly 4096 by appending across the first chunk.
    {
        let name = format!("f{INLINE}");
        let d = want.get_mut(&name).unwrap();
        let mut f = OpenOptions::new().append(true).open(m.path(&name)).unwrap();
        f.write_all(b"Z").unwrap();
        d.push(b'Z');
        let name = format!("f{}", INLINE - 1);
        let d = want.get_mut(&name).unwrap();
        let extra = pattern(77, CHUNK + 5);
        let mut f = OpenOptions::new().append(true).open(m.path(&name)).unwrap();
        f.write_all(&extra).unwrap();
        d.extend_from_slice(&extra);
    }

    // Unaligned reads across a boundary.
    {
        let name = format!("f{}", 2 * CHUNK);
        let f = File::open(m.path(&name)).unwrap();
        let mut buf = vec![0u8; 1000];
        f.read_exact_at(&mut buf, (CHUNK - 500) as u64).unwrap();
        assert_bytes(
            &buf,
            &want[&name][CHUNK - 500..CHUNK + 500],
            "boundary read",
        );
        // Read at EOF returns 0 bytes.
        let n = f.read_at(&mut buf, (2 * CHUNK) as u64).unwrap();
        assert_eq!(n, 0);
        // Short read at the end.
        let n = f.read_at(&mut buf, (2 * CHUNK - 10) as u64).unwrap();
        assert_eq!(n, 10);
    }

    for (name, d) in &want {
        assert_bytes(&fs::read(m.path(name)).unwrap(), d, name);
    }
    let m = remount(&env, &store, m);
    for (name, d) in &want {
        assert_eq!(
            fs::metadata(m.path(name)).unwrap().len(),
            d.len() as u64,
            "{name}"
        );
        assert_bytes(&fs::read(m.path(name)).unwrap(), d, name);
    }
    m.unmount();
}

// ---------------------------------------------------------------------------
// Directories, symlinks, hard links
// ---------------------------------------------------------------------------

#[test]
fn directories_mkdir_rmdir_nlink() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let root_nlink = fs::metadata(&m.mountpoint).unwrap().nlink();
    assert_eq!(root_nlink, 2, "empty root dir nlink");
    fs::create_dir(m.path("a")).unwrap();
    assert!(fs::metadata(m.path("a")).unwrap().is_dir());
    assert_eq!(fs::metadata(m.path("a")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(&m.mountpoint).unwrap().nlink(), 3);
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::create_dir(m.path("a/b2")).unwrap();
    assert_eq!(fs::metadata(m.path("a")).unwrap().nlink(), 4);
    assert_eq!(fs::metadata(m.path("a/b")).unwrap().nlink(), 3);
    fs::write(m.path("a/b/c/file"), b"x").unwrap();
    // Files do not count in a directory's link count.
    assert_eq!(fs::metadata(m.path("a/b/c")).unwrap().nlink(), 2);

    assert_errno(fs::create_dir(m.path("a")), libc::EEXIST, "mkdir existing");
    assert_errno(
        fs::create_dir(m.path("nope/x")),
        libc::ENOENT,
        "mkdir in missing parent",
    );
    assert_errno(
        fs::remove_dir(m.path("a/b/c")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    assert_errno(
        fs::remove_dir(m.path("a/b/c/file")),
        libc::ENOTDIR,
        "rmdir on a file",
    );
    assert_errno(
        fs::remove_file(m.path("a/b")),
        libc::EISDIR,
        "unlink on a dir",
    );
    fs::remove_dir(m.path("a/b2")).unwrap();
    assert_eq!(fs::metadata(m.path("a")).unwrap().nlink(), 3);
    assert_errno(fs::metadata(m.path("a/b2")), libc::ENOENT, "removed dir");
    assert_eq!(names(&m.path("a")), vec!["b"]);

    let m = remount(&env, &store, m);
    assert_eq!(names(&m.mountpoint), vec!["a"]);
    assert_eq!(names(&m.path("a")), vec!["b"]);
    assert_eq!(fs::metadata(&m.mountpoint).unwrap().nlink(), 3);
    assert_eq!(fs::metadata(m.path("a")).unwrap().nlink(), 3);
    assert_eq!(fs::metadata(m.path("a/b")).unwrap().nlink(), 3);
    assert_eq!(fs::read(m.path("a/b/c/file")).unwrap(), b"x");
    fs::remove_file(m.path("a/b/c/file")).unwrap();
    fs::remove_dir(m.path("a/b/c")).unwrap();
    assert_eq!(fs::metadata(m.path("a/b")).unwrap().nlink(), 2);
    let m = remount(&env, &store, m);
    assert_eq!(names(&m.path("a/b")), Vec::<String>::new());
    assert_eq!(fs::metadata(m.path("a/b")).unwrap().nlink(), 2);
    m.unmount();
}

#[test]
fn symlinks_readlink_and_dangling() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/target"), b"target data").unwrap();
    std::os::unix::fs::symlink("dir/target", m.path("rel")).unwrap();
    std::os::unix::fs::symlink(m.path("dir/target"), m.path("abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", m.path("dangling")).unwrap();
    std::os::unix::fs::symlink("dir", m.path("dirlink")).unwrap();
    let long_target = "x/".repeat(1000) + "end";
    std::os::unix::fs::symlink(&long_target, m.path("long")).unwrap();

    let check = |m: &Mount| {
        assert_eq!(
            fs::read_link(m.path("rel")).unwrap(),
            PathBuf::from("dir/target")
        );
        assert_eq!(fs::read_link(m.path("abs")).unwrap(), m.path("dir/target"));
        assert_eq!(
            fs::read_link(m.path("dangling")).unwrap(),
            PathBuf::from("does/not/exist")
        );
        assert_eq!(
            fs::read_link(m.path("long")).unwrap(),
            PathBuf::from(&long_target)
        );
        assert_eq!(fs::read(m.path("rel")).unwrap(), b"target data");
        assert_eq!(fs::read(m.path("abs")).unwrap(), b"target data");
        assert_eq!(fs::read(m.path("dirlink/target")).unwrap(), b"target data");
        let lm = fs::symlink_metadata(m.path("rel")).unwrap();
        assert!(lm.file_type().is_symlink());
        assert_eq!(lm.len(), "dir/target".len() as u64);
        assert!(fs::symlink_metadata(m.path("dangling"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_errno(
            fs::metadata(m.path("dangling")),
            libc::ENOENT,
            "stat dangling",
        );
        assert_errno(
            fs::read_link(m.path("dir/target")),
            libc::EINVAL,
            "readlink on a file",
        );
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    // Removing the symlink leaves the target.
    fs::remove_file(m.path("rel")).unwrap();
    assert_eq!(fs::read(m.path("dir/target")).unwrap(), b"target data");
    m.unmount();
}

#[test]
fn hard_links_share_content_and_count() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("a"), b"original").unwrap();
    fs::hard_link(m.path("a"), m.path("b")).unwrap();
    fs::hard_link(m.path("a"), m.path("d/c")).unwrap();
    let ma = fs::metadata(m.path("a")).unwrap();
    assert_eq!(ma.nlink(), 3);
    assert_eq!(fs::metadata(m.path("b")).unwrap().ino(), ma.ino());
    assert_eq!(fs::metadata(m.path("d/c")).unwrap().ino(), ma.ino());
    // Write through one name, read through the others.
    let f = OpenOptions::new().write(true).open(m.path("b")).unwrap();
    f.write_all_at(b"ORIG", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("a")).unwrap(), b"ORIGinal");
    assert_eq!(fs::read(m.path("d/c")).unwrap(), b"ORIGinal");
    assert_errno(
        fs::hard_link(m.path("a"), m.path("b")),
        libc::EEXIST,
        "link over existing",
    );
    assert_errno(
        fs::hard_link(m.path("d"), m.path("dlink")),
        libc::EPERM,
        "hard link to a directory",
    );

    let m = remount(&env, &store, m);
    let ma = fs::metadata(m.path("a")).unwrap();
    assert_eq!(ma.nlink(), 3);
    assert_eq!(fs::metadata(m.path("b")).unwrap().ino(), ma.ino());
    assert_eq!(fs::metadata(m.path("d/c")).unwrap().ino(), ma.ino());
    assert_eq!(fs::read(m.path("d/c")).unwrap(), b"ORIGinal");
    fs::remove_file(m.path("a")).unwrap();
    assert_eq!(fs::metadata(m.path("b")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"ORIGinal");
    // Appending through a link after removing the first name.
    let mut f = OpenOptions::new().append(true).open(m.path("d/c")).unwrap();
    f.write_all(b"+").unwrap();
    drop(f);

    let m = remount(&env, &store, m);
    assert_errno(fs::metadata(m.path("a")), libc::ENOENT, "removed link");
    assert_eq!(fs::metadata(m.path("b")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"ORIGinal+");
    fs::remove_file(m.path("b")).unwrap();
    assert_eq!(fs::metadata(m.path("d/c")).unwrap().nlink(), 1);
    let m = remount(&env, &store, m);
    assert_eq!(fs::metadata(m.path("d/c")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("d/c")).unwrap(), b"ORIGinal+");
    m.unmount();
}

// ---------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------

#[test]
fn rename_plain_overwrite_cross_dir_and_dirs() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::create_dir_all(m.path("d1/sub")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::write(m.path("a"), b"AAA").unwrap();
    fs::write(m.path("b"), b"BBB-old-target").unwrap();
    fs::hard_link(m.path("b"), m.path("b_link")).unwrap();
    fs::write(m.path("d1/sub/inner"), b"inner").unwrap();
    let big = pattern(5, 3 * CHUNK + 7);
    fs::write(m.path("d1/big"), &big).unwrap();

    // Plain rename.
    fs::rename(m.path("a"), m.path("a2")).unwrap();
    assert_errno(fs::metadata(m.path("a")), libc::ENOENT, "old name");
    assert_eq!(fs::read(m.path("a2")).unwrap(), b"AAA");

    // Over an existing file: the old target's content is gone from that
    // name, but its other hard link still holds it.
    let ino_a2 = fs::metadata(m.path("a2")).unwrap().ino();
    fs::rename(m.path("a2"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"AAA");
    assert_eq!(fs::metadata(m.path("b")).unwrap().ino(), ino_a2);
    assert_errno(fs::metadata(m.path("a2")), libc::ENOENT, "source gone");
    assert_eq!(fs::read(m.path("b_link")).unwrap(), b"BBB-old-target");
    assert_eq!(fs::metadata(m.path("b_link")).unwrap().nlink(), 1);

    // Across directories.
    fs::rename(m.path("d1/big"), m.path("d2/big")).unwrap();
    assert_bytes(&fs::read(m.path("d2/big")).unwrap(), &big, "moved big");
    assert_errno(fs::metadata(m.path("d1/big")), libc::ENOENT, "moved away");

    // Directory rename across parents (nlink of both parents changes).
    assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 3);
    assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 2);
    fs::rename(m.path("d1/sub"), m.path("d2/sub2")).unwrap();
    assert_eq!(fs::read(m.path("d2/sub2/inner")).unwrap(), b"inner");
    assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 3);

    // Directory into its own subdirectory.
    assert_errno(
        fs::rename(m.path("d2"), m.path("d2/sub2/x")),
        libc::EINVAL,
        "dir into own subdir",
    );
    assert_errno(
        fs::rename(m.path("d2"), m.path("d2/x")),
        libc::EINVAL,
        "dir into itself",
    );

    // Dir over empty dir succeeds; over a non-empty dir fails.
    fs::create_dir(m.path("empty")).unwrap();
    fs::create_dir(m.path("full")).unwrap();
    fs::write(m.path("full/f"), b"f").unwrap();
    fs::create_dir(m.path("mover")).unwrap();
    fs::write(m.path("mover/m"), b"m").unwrap();
    let r = fs::rename(m.path("mover"), m.path("full"));
    match r {
        Err(e) if errno(&e) == libc::ENOTEMPTY || errno(&e) == libc::EEXIST => {}
        other => panic!("dir over non-empty dir: {other:?}"),
    }
    fs::rename(m.path("mover"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/m")).unwrap(), b"m");
    assert_errno(fs::metadata(m.path("mover")), libc::ENOENT, "mover gone");

    // Type mismatches.
    assert_errno(
        fs::rename(m.path("empty"), m.path("b")),
        libc::ENOTDIR,
        "dir over file",
    );
    assert_errno(
        fs::rename(m.path("b"), m.path("full")),
        libc::EISDIR,
        "file over dir",
    );
    assert_errno(
        fs::rename(m.path("missing"), m.path("x")),
        libc::ENOENT,
        "missing source",
    );

    let check = |m: &Mount| {
        assert_eq!(
            names(&m.mountpoint),
            vec!["b", "b_link", "d1", "d2", "empty", "full"]
        );
        assert_eq!(fs::read(m.path("b")).unwrap(), b"AAA");
        assert_eq!(fs::read(m.path("b_link")).unwrap(), b"BBB-old-target");
        assert_eq!(fs::metadata(m.path("b_link")).unwrap().nlink(), 1);
        assert_eq!(names(&m.path("d1")), Vec::<String>::new());
        assert_eq!(names(&m.path("d2")), vec!["big", "sub2"]);
        assert_bytes(&fs::read(m.path("d2/big")).unwrap(), &big, "big");
        assert_eq!(fs::read(m.path("d2/sub2/inner")).unwrap(), b"inner");
        assert_eq!(fs::read(m.path("empty/m")).unwrap(), b"m");
        assert_eq!(fs::read(m.path("full/f")).unwrap(), b"f");
        assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 2);
        assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 3);
        assert_eq!(fs::metadata(&m.mountpoint).unwrap().nlink(), 6);
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

#[test]
fn rename_noreplace_and_exchange() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::create_dir(m.path("d1")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::write(m.path("d1/f"), b"file f").unwrap();
    fs::write(m.path("d1/other"), b"other").unwrap();
    fs::create_dir(m.path("d2/g")).unwrap();
    fs::write(m.path("d2/g/inside"), b"inside g").unwrap();

    // NOREPLACE onto an existing name.
    assert_rerrno(
        rustix::fs::renameat_with(
            CWD,
            m.path("d1/f"),
            CWD,
            m.path("d1/other"),
            RenameFlags::NOREPLACE,
        ),
        libc::EEXIST,
        "RENAME_NOREPLACE over existing",
    );
    assert_eq!(fs::read(m.path("d1/f")).unwrap(), b"file f");
    assert_eq!(fs::read(m.path("d1/other")).unwrap(), b"other");
    // NOREPLACE onto a free name works.
    rustix::fs::renameat_with(
        CWD,
        m.path("d1/other"),
        CWD,
        m.path("d2/other2"),
        RenameFlags::NOREPLACE,
    )
    .unwrap();
    assert_eq!(fs::read(m.path("d2/other2")).unwrap(), b"other");
    assert_errno(fs::metadata(m.path("d1/other")), libc::ENOENT, "moved");

    // EXCHANGE a file and a directory across directories.
    let ino_f = fs::metadata(m.path("d1/f")).unwrap().ino();
    let ino_g = fs::metadata(m.path("d2/g")).unwrap().ino();
    assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 3);
    rustix::fs::renameat_with(
        CWD,
        m.path("d1/f"),
        CWD,
        m.path("d2/g"),
        RenameFlags::EXCHANGE,
    )
    .unwrap();
    let check = |m: &Mount| {
        let a = fs::symlink_metadata(m.path("d1/f")).unwrap();
        let b = fs::symlink_metadata(m.path("d2/g")).unwrap();
        assert!(a.is_dir(), "d1/f must now be the directory");
        assert!(b.is_file(), "d2/g must now be the file");
        assert_eq!(a.ino(), ino_g);
        assert_eq!(b.ino(), ino_f);
        assert_eq!(fs::read(m.path("d1/f/inside")).unwrap(), b"inside g");
        assert_eq!(fs::read(m.path("d2/g")).unwrap(), b"file f");
        // The directory moved from d2 to d1: parents' link counts follow.
        assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 3, "d1 nlink");
        assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 2, "d2 nlink");
        assert_eq!(names(&m.path("d1")), vec!["f"]);
        assert_eq!(names(&m.path("d2")), vec!["g", "other2"]);
    };
    check(&m);
    // EXCHANGE with a missing target fails.
    assert_rerrno(
        rustix::fs::renameat_with(
            CWD,
            m.path("d2/g"),
            CWD,
            m.path("d2/missing"),
            RenameFlags::EXCHANGE,
        ),
        libc::ENOENT,
        "RENAME_EXCHANGE with missing target",
    );
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

// ---------------------------------------------------------------------------
// Unlink while open
// ---------------------------------------------------------------------------

/// `sync -f` (syncfs) after removing files written through the kernel's
/// writeback cache: the kernel writes back the removed files' times, which
/// must not fail the sync.
#[test]
fn syncfs_after_removing_freshly_written_files() {
    if !require_fuse() {
        return;
    }
    let (_env, _store, m) = setup();
    fs::write(m.path("keep"), b"kept").unwrap();
    for i in 0..20 {
        let p = m.path(&format!("tmp{i}"));
        fs::write(&p, pattern(i, 10_000 + 5_000 * i as usize)).unwrap();
        fs::remove_file(&p).unwrap();
    }
    run(Command::new("sync").arg("-f").arg(m.path("keep")));
    run(Command::new("sync").arg("-f").arg(&m.mountpoint));
    assert_eq!(names(&m.mountpoint), vec!["keep".to_string()]);
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"kept");
}

#[test]
fn unlink_open_file_keeps_data_until_close() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let p = m.path("victim");
    let data = pattern(3, CHUNK + 100);
    fs::write(&p, &data).unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert_errno(fs::metadata(&p), libc::ENOENT, "name gone");
    assert!(!names(&m.mountpoint).contains(&"victim".to_string()));
    assert_eq!(f.metadata().unwrap().nlink(), 0);

    // Still readable.
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_bytes(&got, &data, "read after unlink");
    // Still writable, including growing it.
    f.write_all_at(b"NEW", 10).unwrap();
    f.write_all_at(b"TAIL", (CHUNK + 100) as u64).unwrap();
    f.sync_all().unwrap();
    let mut buf = vec![0u8; CHUNK + 104];
    f.read_exact_at(&mut buf, 0).unwrap();
    let mut want = data.clone();
    want[10..13].copy_from_slice(b"NEW");
    want.extend_from_slice(b"TAIL");
    assert_bytes(&buf, &want, "read back writes after unlink");
    assert_eq!(f.metadata().unwrap().len(), (CHUNK + 104) as u64);

    // A new file with the same name is independent.
    fs::write(&p, b"replacement").unwrap();
    f.read_exact_at(&mut buf[..3], 10).unwrap();
    assert_eq!(&buf[..3], b"NEW");
    assert_eq!(fs::read(&p).unwrap(), b"replacement");
    drop(f);

    let m = remount(&env, &store, m);
    assert_eq!(names(&m.mountpoint), vec!["victim"]);
    assert_eq!(fs::read(m.path("victim")).unwrap(), b"replacement");
    fs::remove_file(m.path("victim")).unwrap();
    let m = remount(&env, &store, m);
    assert_eq!(names(&m.mountpoint), Vec::<String>::new());
    m.unmount();
}

// ---------------------------------------------------------------------------
// chmod / chown / utimensat
// ---------------------------------------------------------------------------

#[test]
fn chmod_chown_utimensat_nanoseconds() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    std::os::unix::fs::symlink("f", m.path("l")).unwrap();

    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(m.path("f"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(m.path("d"), Some(42), Some(43)).unwrap();
    std::os::unix::fs::lchown(m.path("l"), Some(7), Some(8)).unwrap();
    // setuid/setgid/sticky bits.
    fs::write(m.path("s"), b"s").unwrap();
    fs::set_permissions(m.path("s"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::create_dir(m.path("sticky")).unwrap();
    fs::set_permissions(m.path("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();

    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    rustix::fs::utimensat(
        CWD,
        m.path("f"),
        &rustix::fs::Timestamps {
            last_access: ts(1_600_000_000, 123_456_789),
            last_modification: ts(1_500_000_000, 987_654_321),
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    rustix::fs::utimensat(
        CWD,
        m.path("d"),
        &rustix::fs::Timestamps {
            last_access: ts(1_000_000_001, 1),
            last_modification: ts(1_000_000_002, 999_999_999),
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();

    let check = |m: &Mount| {
        let f = fs::symlink_metadata(m.path("f")).unwrap();
        assert_eq!(f.mode() & 0o7777, 0o640);
        assert_eq!((f.uid(), f.gid()), (1234, 5678));
        assert_eq!((f.atime(), f.atime_nsec()), (1_600_000_000, 123_456_789));
        assert_eq!((f.mtime(), f.mtime_nsec()), (1_500_000_000, 987_654_321));
        let d = fs::symlink_metadata(m.path("d")).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o711);
        assert_eq!((d.uid(), d.gid()), (42, 43));
        assert_eq!((d.atime(), d.atime_nsec()), (1_000_000_001, 1));
        assert_eq!((d.mtime(), d.mtime_nsec()), (1_000_000_002, 999_999_999));
        let l = fs::symlink_metadata(m.path("l")).unwrap();
        assert_eq!((l.uid(), l.gid()), (7, 8));
        assert_eq!(fs::metadata(m.path("l")).unwrap().uid(), 1234);
        let s = fs::symlink_metadata(m.path("s")).unwrap();
        assert_eq!(s.mode() & 0o7777, 0o6755);
        let st = fs::symlink_metadata(m.path("sticky")).unwrap();
        assert_eq!(st.mode() & 0o7777, 0o1777);
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);

    // ctime moves on chmod; UTIME_NOW sets a current time.
    let before = fs::metadata(m.path("f")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    let after = fs::metadata(m.path("f")).unwrap();
    assert!(
        (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "ctime must advance on chmod"
    );
    assert_eq!(after.mtime(), 1_500_000_000, "chmod must not touch mtime");
    m.unmount();
}

#[test]
fn utimensat_pre_1970_nanoseconds() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::write(m.path("old"), b"x").unwrap();
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    rustix::fs::utimensat(
        CWD,
        m.path("old"),
        &rustix::fs::Timestamps {
            last_access: ts(-86_400, 500),
            last_modification: ts(-1, 250_000_000),
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    let check = |m: &Mount| {
        let s = fs::symlink_metadata(m.path("old")).unwrap();
        assert_eq!((s.atime(), s.atime_nsec()), (-86_400, 500), "atime");
        assert_eq!((s.mtime(), s.mtime_nsec()), (-1, 250_000_000), "mtime");
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

// ---------------------------------------------------------------------------
// truncate
// ---------------------------------------------------------------------------

#[test]
fn truncate_up_and_down_reads_zeros() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let mut want: BTreeMap<&str, Vec<u8>> = BTreeMap::new();

    // Grow an empty file: all zeros.
    let f = File::create(m.path("grow")).unwrap();
    f.set_len(100_000).unwrap();
    drop(f);
    want.insert("grow", vec![0u8; 100_000]);
    assert_bytes(&fs::read(m.path("grow")).unwrap(), &want["grow"], "grow");

    // Shrink inside a chunk, then extend: the gap is zeros.
    let mut d = pattern(11, 200_000);
    fs::write(m.path("small"), &d).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("small"))
        .unwrap();
    f.set_len(100).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 100);
    f.set_len(200_000).unwrap();
    drop(f);
    d[100..].fill(0);
    assert_bytes(&fs::read(m.path("small")).unwrap(), &d, "small");
    want.insert("small", d);

    // Shrink to just past a chunk boundary, extend across several chunks.
    let mut d = pattern(12, 3 * CHUNK);
    fs::write(m.path("chunks"), &d).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("chunks"))
        .unwrap();
    f.set_len((CHUNK + 10) as u64).unwrap();
    f.set_len((3 * CHUNK) as u64).unwrap();
    drop(f);
    d[CHUNK + 10..].fill(0);
    assert_bytes(&fs::read(m.path("chunks")).unwrap(), &d, "chunks");
    want.insert("chunks", d);

    // Shrink to exactly a chunk boundary, then extend by writing past EOF.
    let mut d = pattern(13, 2 * CHUNK + 500);
    fs::write(m.path("boundary"), &d).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("boundary"))
        .unwrap();
    f.set_len(CHUNK as u64).unwrap();
    f.write_all_at(b"end", (2 * CHUNK + 497) as u64).unwrap();
    drop(f);
    d[CHUNK..].fill(0);
    d[2 * CHUNK + 497..].copy_from_slice(b"end");
    assert_bytes(&fs::read(m.path("boundary")).unwrap(), &d, "boundary");
    want.insert("boundary", d);

    // From above the inline limit to below it, then back up.
    let mut d = pattern(14, 10_000);
    fs::write(m.path("inline"), &d).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("inline"))
        .unwrap();
    f.set_len(3000).unwrap();
    f.set_len(8000).unwrap();
    drop(f);
    d.truncate(3000);
    d.resize(8000, 0);
    assert_bytes(&fs::read(m.path("inline")).unwrap(), &d, "inline");
    want.insert("inline", d);

    // Inline file shrunk, then extended by a write past EOF (not truncate).
    let mut d = pattern(15, 4000);
    fs::write(m.path("inline2"), &d).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("inline2"))
        .unwrap();
    f.set_len(10).unwrap();
    f.write_all_at(b"xyz", 5000).unwrap();
    drop(f);
    d.truncate(10);
    d.resize(5000, 0);
    d.extend_from_slice(b"xyz");
    assert_bytes(&fs::read(m.path("inline2")).unwrap(), &d, "inline2");
    want.insert("inline2", d);

    // Path-based truncate via the truncate(1) tool.
    let mut d = pattern(16, 70_000);
    fs::write(m.path("tool"), &d).unwrap();
    run(Command::new("truncate")
        .arg("-s")
        .arg("5")
        .arg(m.path("tool")));
    run(Command::new("truncate")
        .arg("-s")
        .arg("70000")
        .arg(m.path("tool")));
    d[5..].fill(0);
    assert_bytes(&fs::read(m.path("tool")).unwrap(), &d, "tool");
    want.insert("tool", d);

    // Truncate to zero.
    fs::write(m.path("zero"), pattern(17, 50_000)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(m.path("zero"))
        .unwrap()
        .set_len(0)
        .unwrap();
    want.insert("zero", Vec::new());

    let m = remount(&env, &store, m);
    for (name, d) in &want {
        assert_eq!(
            fs::metadata(m.path(name)).unwrap().len(),
            d.len() as u64,
            "{name}"
        );
        assert_bytes(&fs::read(m.path(name)).unwrap(), d, name);
    }
    m.unmount();
}

// ---------------------------------------------------------------------------
// Sparse files, SEEK_DATA / SEEK_HOLE, > 4 GiB
// ---------------------------------------------------------------------------

#[test]
fn sparse_file_blocks_and_seek_data_hole() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let off: u64 = 10 << 20;
    let p = m.path("sparse");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"data at ten MiB", off).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let size = off + 15;

    let check = |m: &Mount| {
        let p = m.path("sparse");
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.len(), size);
        assert!(
            md.blocks() * 512 < size / 8,
            "st_blocks {} ({} bytes) not much smaller than size {size}",
            md.blocks(),
            md.blocks() * 512
        );
        assert!(md.blocks() > 0, "st_blocks must count the data chunk");
        let f = File::open(&p).unwrap();
        let mut buf = vec![0xAAu8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "hole at 0 must read zeros");
        f.read_exact_at(&mut buf[..4096], off - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        let mut tail = [0u8; 15];
        f.read_exact_at(&mut tail, off).unwrap();
        assert_eq!(&tail, b"data at ten MiB");

        let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)).unwrap();
        assert!(
            data <= off && data > off - CHUNK as u64,
            "SEEK_DATA(0) = {data}, expected the written chunk near {off}"
        );
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap();
        assert_eq!(hole, 0, "SEEK_HOLE(0)");
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(off)).unwrap();
        assert!(
            hole >= size,
            "SEEK_HOLE({off}) = {hole}, must be at/after the end of the data"
        );
        let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(off + 3)).unwrap();
        assert_eq!(data, off + 3, "SEEK_DATA inside data");
        assert_rerrno(
            rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(size)),
            libc::ENXIO,
            "SEEK_DATA at EOF",
        );
        assert_rerrno(
            rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(size + 1)),
            libc::ENXIO,
            "SEEK_HOLE past EOF",
        );
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

#[test]
fn file_over_4gib() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let off: u64 = 5 << 30;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.path("huge"))
        .unwrap();
    f.write_all_at(b"far away", off).unwrap();
    // Also a write just around the 4 GiB mark.
    f.write_all_at(b"4G", (4 << 30) - 1).unwrap();
    drop(f);
    let check = |m: &Mount| {
        let f = File::open(m.path("huge")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), off + 8);
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        assert_eq!(&b, b"far away");
        let mut b = [0xFFu8; 4];
        f.read_exact_at(&mut b, (4 << 30) - 2).unwrap();
        assert_eq!(&b, b"\x004G\x00");
        let mut z = vec![0xFFu8; 8192];
        f.read_exact_at(&mut z, 3 << 30).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        f.read_exact_at(&mut z, off - 8192).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        assert!(f.metadata().unwrap().blocks() * 512 < (1 << 20));
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

// ---------------------------------------------------------------------------
// O_APPEND, fallocate
// ---------------------------------------------------------------------------

#[test]
fn o_append_from_two_opens() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let p = m.path("log");
    fs::write(&p, b"start;").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"a1;").unwrap();
    b.write_all(b"b1;").unwrap();
    a.write_all(b"a2;").unwrap();
    b.write_all(b"b2;").unwrap();
    // A non-append writer in between, at offset 0.
    let c = OpenOptions::new().write(true).open(&p).unwrap();
    c.write_all_at(b"S", 0).unwrap();
    a.write_all(b"a3;").unwrap();
    drop((a, b, c));
    let want = b"Start;a1;b1;a2;b2;a3;";
    assert_eq!(fs::read(&p).unwrap(), want);

    // Appends crossing a chunk boundary from two opens.
    let big = pattern(21, CHUNK - 3);
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(&big).unwrap();
    b.write_all(b"crossing").unwrap();
    drop((a, b));
    let mut full = want.to_vec();
    full.extend_from_slice(&big);
    full.extend_from_slice(b"crossing");
    assert_bytes(&fs::read(&p).unwrap(), &full, "appended");

    let m = remount(&env, &store, m);
    assert_bytes(&fs::read(m.path("log")).unwrap(), &full, "after remount");
    m.unmount();
}

#[test]
fn fallocate_extend_and_punch_hole() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    // Mode 0 extends the size; new range reads zeros.
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.path("alloc"))
        .unwrap();
    f.write_all_at(b"0123456789", 0).unwrap();
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 200_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 200_000);
    // Mode 0 inside the file does not change size or content.
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 5, 10).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 200_000);
    // KEEP_SIZE beyond EOF does not change size.
    rustix::fs::fallocate(&f, FallocateFlags::KEEP_SIZE, 200_000, 100_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 200_000);
    drop(f);
    let mut alloc = vec![0u8; 200_000];
    alloc[..10].copy_from_slice(b"0123456789");
    assert_bytes(&fs::read(m.path("alloc")).unwrap(), &alloc, "alloc");

    // PUNCH_HOLE | KEEP_SIZE zeros a range across chunk boundaries.
    let mut d = pattern(31, 3 * CHUNK + 1000);
    fs::write(m.path("punch"), &d).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("punch"))
        .unwrap();
    let (po, pl) = (1000u64, (2 * CHUNK) as u64);
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        po,
        pl,
    )
    .unwrap();
    d[po as usize..(po + pl) as usize].fill(0);
    // A small hole inside a single chunk, and one inside an inline file.
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        (3 * CHUNK + 10) as u64,
        20,
    )
    .unwrap();
    d[3 * CHUNK + 10..3 * CHUNK + 30].fill(0);
    assert_eq!(f.metadata().unwrap().len(), d.len() as u64);
    let mut got = vec![0u8; d.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_bytes(&got, &d, "punched (same fd)");
    drop(f);
    assert_bytes(&fs::read(m.path("punch")).unwrap(), &d, "punched");

    let mut small = pattern(32, 3000);
    fs::write(m.path("small"), &small).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("small"))
        .unwrap();
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        100,
        200,
    )
    .unwrap();
    drop(f);
    small[100..300].fill(0);
    assert_bytes(&fs::read(m.path("small")).unwrap(), &small, "small punched");

    let m = remount(&env, &store, m);
    assert_bytes(&fs::read(m.path("alloc")).unwrap(), &alloc, "alloc remount");
    assert_bytes(&fs::read(m.path("punch")).unwrap(), &d, "punch remount");
    assert_bytes(&fs::read(m.path("small")).unwrap(), &small, "small remount");
    m.unmount();
}

// ---------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------

fn list_xattrs(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::listxattr(p, &mut buf[..]).unwrap();
    let mut v: Vec<String> = buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .filter(|s| s.starts_with("user."))
        .collect();
    v.sort();
    v
}

fn get_xattr(p: &Path, name: &str) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::getxattr(p, name, &mut buf[..])?;
    buf.truncate(n);
    Ok(buf)
}

#[test]
fn xattrs_syscalls() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let f = m.path("f");
    fs::write(&f, b"content").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    let d = m.path("d");

    rustix::fs::setxattr(&f, "user.a", b"alpha", XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(&f, "user.b", b"", XattrFlags::empty()).unwrap();
    let bin: Vec<u8> = (0..=255u8).collect();
    rustix::fs::setxattr(&f, "user.bin", &bin, XattrFlags::CREATE).unwrap();
    let large = pattern(41, 4000);
    rustix::fs::setxattr(&f, "user.large", &large, XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(&d, "user.dirattr", b"on a dir", XattrFlags::empty()).unwrap();

    assert_eq!(get_xattr(&f, "user.a").unwrap(), b"alpha");
    assert_eq!(get_xattr(&f, "user.b").unwrap(), b"");
    assert_eq!(get_xattr(&f, "user.bin").unwrap(), bin);
    assert_eq!(get_xattr(&f, "user.large").unwrap(), large);
    assert_eq!(get_xattr(&d, "user.dirattr").unwrap(), b"on a dir");
    assert_eq!(
        rustix::fs::getxattr_query(&f, "user.large").unwrap(),
        large.len()
    );
    // Too-small buffer: ERANGE.
    let mut tiny = [0u8; 2];
    assert_rerrno(
        rustix::fs::getxattr(&f, "user.a", &mut tiny[..]),
        libc::ERANGE,
        "getxattr small buffer",
    );
    assert_eq!(
        list_xattrs(&f),
        vec!["user.a", "user.b", "user.bin", "user.large"]
    );

    // Flags.
    assert_rerrno(
        rustix::fs::setxattr(&f, "user.a", b"x", XattrFlags::CREATE),
        libc::EEXIST,
        "XATTR_CREATE on existing",
    );
    assert_rerrno(
        rustix::fs::setxattr(&f, "user.missing", b"x", XattrFlags::REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on missing",
    );
    assert_rerrno(
        rustix::fs::removexattr(&f, "user.missing"),
        libc::ENODATA,
        "removexattr missing",
    );
    assert_rerrno(
        get_xattr(&f, "user.missing"),
        libc::ENODATA,
        "getxattr missing",
    );
    rustix::fs::setxattr(&f, "user.a", b"ALPHA2", XattrFlags::REPLACE).unwrap();
    assert_eq!(get_xattr(&f, "user.a").unwrap(), b"ALPHA2");
    rustix::fs::removexattr(&f, "user.b").unwrap();
    assert_rerrno(get_xattr(&f, "user.b"), libc::ENODATA, "removed xattr");
    assert_eq!(list_xattrs(&f), vec!["user.a", "user.bin", "user.large"]);

    let check = |m: &Mount| {
        let f = m.path("f");
        assert_eq!(list_xattrs(&f), vec!["user.a", "user.bin", "user.large"]);
        assert_eq!(get_xattr(&f, "user.a").unwrap(), b"ALPHA2");
        assert_eq!(get_xattr(&f, "user.bin").unwrap(), bin);
        assert_eq!(get_xattr(&f, "user.large").unwrap(), large);
        assert_rerrno(get_xattr(&f, "user.b"), libc::ENODATA, "removed xattr");
        assert_eq!(
            get_xattr(&m.path("d"), "user.dirattr").unwrap(),
            b"on a dir"
        );
        assert_eq!(fs::read(&f).unwrap(), b"content");
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    // Xattrs follow the inode through rename and hard links.
    fs::rename(m.path("f"), m.path("g")).unwrap();
    fs::hard_link(m.path("g"), m.path("h")).unwrap();
    assert_eq!(get_xattr(&m.path("h"), "user.a").unwrap(), b"ALPHA2");
    m.unmount();
}

#[test]
fn xattrs_getfattr_setfattr_tools() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let f = m.path("file");
    fs::write(&f, b"x").unwrap();
    run(Command::new("setfattr")
        .args(["-n", "user.color", "-v", "blue"])
        .arg(&f));
    run(Command::new("setfattr")
        .args(["-n", "user.hex", "-v", "0x00ff10"])
        .arg(&f));
    run(Command::new("setfattr")
        .args(["-n", "user.gone", "-v", "soon"])
        .arg(&f));
    run(Command::new("setfattr").args(["-x", "user.gone"]).arg(&f));
    let out = Command::new("setfattr")
        .args(["-x", "user.never"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success(), "removing a missing xattr must fail");
    assert!(
        stderr(&out).contains("No such attribute"),
        "stderr: {}",
        stderr(&out)
    );

    let dump = |m: &Mount| {
        let out = run(Command::new("getfattr")
            .args(["-d", "-e", "hex", "--absolute-names"])
            .arg(m.path("file")));
        stdout(&out)
    };
    let check = |m: &Mount| {
        let s = dump(m);
        assert!(s.contains("user.color=0x626c7565"), "{s}");
        assert!(s.contains("user.hex=0x00ff10"), "{s}");
        assert!(!s.contains("user.gone"), "{s}");
        let out = run(Command::new("getfattr")
            .args(["--only-values", "-n", "user.color"])
            .arg(m.path("file")));
        assert_eq!(out.stdout, b"blue");
        assert_eq!(
            get_xattr(&m.path("file"), "user.hex").unwrap(),
            [0, 0xff, 0x10]
        );
        let out = Command::new("getfattr")
            .args(["-n", "user.gone"])
            .arg(m.path("file"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("No such attribute"),
            "{}",
            stderr(&out)
        );
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    m.unmount();
}

// ---------------------------------------------------------------------------
// mknod, statfs, names
// ---------------------------------------------------------------------------

#[test]
fn mknod_fifo_and_char_device() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    rustix::fs::mknodat(
        CWD,
        m.path("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let dev_small = rustix::fs::makedev(1, 3);
    let dev_big = rustix::fs::makedev(259, 300);
    rustix::fs::mknodat(
        CWD,
        m.path("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        dev_small,
    )
    .unwrap();
    rustix::fs::mknodat(
        CWD,
        m.path("chr"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        dev_big,
    )
    .unwrap();
    rustix::fs::mknodat(
        CWD,
        m.path("blk"),
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(8, 1),
    )
    .unwrap();
    // Also through mkfifo(1).
    run(Command::new("mkfifo").arg(m.path("fifo2")));
    // mknod applies the umask; set the exact modes explicitly.
    for (n, mode) in [
        ("fifo", 0o640),
        ("null", 0o666),
        ("chr", 0o600),
        ("blk", 0o600),
    ] {
        fs::set_permissions(m.path(n), fs::Permissions::from_mode(mode)).unwrap();
    }

    let check = |m: &Mount| {
        let f = fs::symlink_metadata(m.path("fifo")).unwrap();
        assert!(f.file_type().is_fifo());
        assert_eq!(f.mode() & 0o7777, 0o640);
        assert!(fs::symlink_metadata(m.path("fifo2"))
            .unwrap()
            .file_type()
            .is_fifo());
        let c = fs::symlink_metadata(m.path("null")).unwrap();
        assert!(c.file_type().is_char_device());
        assert_eq!(c.rdev(), dev_small);
        assert_eq!(c.mode() & 0o7777, 0o666);
        let c = fs::symlink_metadata(m.path("chr")).unwrap();
        assert!(c.file_type().is_char_device());
        assert_eq!(c.rdev(), dev_big);
        let b = fs::symlink_metadata(m.path("blk")).unwrap();
        assert!(b.file_type().is_block_device());
        assert_eq!(b.rdev(), rustix::fs::makedev(8, 1));
        let out = run(Command::new("stat")
            .args(["-c", "%F %t %T"])
            .arg(m.path("chr")));
        assert_eq!(stdout(&out).trim(), "character special file 103 12c");
        let out = run(Command::new("stat").args(["-c", "%F"]).arg(m.path("fifo")));
        assert_eq!(stdout(&out).trim(), "fifo");
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);

    // The FIFO works as a pipe inside the mount.
    let fifo = m.path("fifo");
    let writer = std::thread::spawn(move || {
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"through the fifo").unwrap();
    });
    let mut got = String::new();
    File::open(m.path("fifo"))
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    writer.join().unwrap();
    assert_eq!(got, "through the fifo");
    // And the char device 1:3 behaves like /dev/null.
    fs::write(m.path("null"), b"discarded").unwrap();
    assert_eq!(fs::read(m.path("null")).unwrap(), b"");
    m.unmount();
}

#[test]
fn statfs_and_df() {
    if !require_fuse() {
        return;
    }
    let (_env, _store, m) = setup();
    fs::write(m.path("f"), pattern(51, 300_000)).unwrap();
    let s = rustix::fs::statvfs(&m.mountpoint).unwrap();
    assert!(s.f_blocks > 0, "f_blocks = {}", s.f_blocks);
    assert!(s.f_bsize > 0, "f_bsize = {}", s.f_bsize);
    assert!(s.f_bfree <= s.f_blocks);
    assert!(s.f_bavail <= s.f_blocks);
    assert_eq!(s.f_namemax, 255);
    let s2 = rustix::fs::statvfs(m.path("f")).unwrap();
    assert_eq!(s2.f_namemax, 255);
    let out = run(Command::new("df").arg(&m.mountpoint));
    let text = stdout(&out);
    assert!(
        text.contains(m.mountpoint.to_str().unwrap()),
        "df output: {text}"
    );
    let out = run(Command::new("df").arg("-i").arg(&m.mountpoint));
    assert!(stdout(&out).contains(m.mountpoint.to_str().unwrap()));
    m.unmount();
}

#[test]
fn name_length_limits() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let n255 = "n".repeat(255);
    let d255 = "d".repeat(255);
    let n256 = "x".repeat(256);
    fs::write(m.path(&n255), b"long name").unwrap();
    fs::create_dir(m.path(&d255)).unwrap();
    fs::write(m.path(&format!("{d255}/{n255}")), b"nested").unwrap();
    std::os::unix::fs::symlink(&n255, m.path(&format!("s{}", "s".repeat(254)))).unwrap();
    // A 255-byte name made of multi-byte UTF-8 characters (85 x 3 bytes).
    let utf = "€".repeat(85);
    assert_eq!(utf.len(), 255);
    fs::write(m.path(&utf), b"utf").unwrap();

    assert_errno(
        fs::write(m.path(&n256), b"x"),
        libc::ENAMETOOLONG,
        "create 256",
    );
    assert_errno(
        fs::create_dir(m.path(&n256)),
        libc::ENAMETOOLONG,
        "mkdir 256",
    );
    assert_errno(
        std::os::unix::fs::symlink("t", m.path(&n256)),
        libc::ENAMETOOLONG,
        "symlink 256",
    );
    assert_errno(
        fs::rename(m.path(&n255), m.path(&n256)),
        libc::ENAMETOOLONG,
        "rename to 256",
    );
    assert_errno(
        fs::hard_link(m.path(&n255), m.path(&n256)),
        libc::ENAMETOOLONG,
        "link to 256",
    );
    assert_errno(
        fs::metadata(m.path(&n256)),
        libc::ENAMETOOLONG,
        "lookup 256",
    );
    assert_eq!(fs::read(m.path(&n255)).unwrap(), b"long name");

    let m = remount(&env, &store, m);
    let mut want = vec![
        d255.clone(),
        n255.clone(),
        format!("s{}", "s".repeat(254)),
        utf.clone(),
    ];
    want.sort();
    assert_eq!(names(&m.mountpoint), want);
    assert_eq!(fs::read(m.path(&n255)).unwrap(), b"long name");
    assert_eq!(fs::read(m.path(&utf)).unwrap(), b"utf");
    assert_eq!(
        fs::read(m.path(&format!("{d255}/{n255}"))).unwrap(),
        b"nested"
    );
    assert_eq!(
        fs::read(m.path(&format!("s{}", "s".repeat(254)))).unwrap(),
        b"long name"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------
// Permissions (default_permissions)
// ---------------------------------------------------------------------------

/// Run `sh -c script` as uid/gid 65534 (nobody).
fn as_nobody(script: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .current_dir("/")
        .output()
        .unwrap()
}

#[test]
fn permission_checks_default_permissions() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = env.create_store("store");
    // allow_other, so that uid 65534 reaches the file system at all and the
    // kernel's default_permissions checks are what decide.
    let m = env.mount(&store, "mnt", &["allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.path("secret"), b"top secret").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("public"), b"public data").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    fs::set_permissions(m.path("dir"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.path("closed")).unwrap();
    fs::set_permissions(m.path("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.path("closed/inner"), b"inner").unwrap();

    let q = |p: PathBuf| format!("'{}'", p.display());

    let check = |m: &Mount| {
        let out = as_nobody(&format!("cat {}", q(m.path("public"))));
        assert!(out.status.success(), "reading 0644: {}", stderr(&out));
        assert_eq!(out.stdout, b"public data");

        let out = as_nobody(&format!("cat {}", q(m.path("secret"))));
        assert!(!out.status.success(), "reading 0600 as nobody must fail");
        assert!(
            stderr(&out).contains("Permission denied"),
            "stderr: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty());

        let out = as_nobody(&format!("echo x >> {}", q(m.path("public"))));
        assert!(!out.status.success(), "writing 0644 as nobody must fail");
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );

        let out = as_nobody(&format!("touch {}", q(m.path("dir/new"))));
        assert!(!out.status.success(), "creating in 0755 dir must fail");
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );
        assert_errno(fs::metadata(m.path("dir/new")), libc::ENOENT, "not created");

        let out = as_nobody(&format!("mkdir {}", q(m.path("dir/sub"))));
        assert!(!out.status.success(), "mkdir in 0755 dir must fail");
        let out = as_nobody(&format!("rm -f {}", q(m.path("public"))));
        assert!(!out.status.success(), "unlink in 0755 root must fail");
        assert!(m.path("public").exists());
        let out = as_nobody(&format!("ls {}", q(m.path("dir"))));
        assert!(out.status.success(), "listing 0755 dir: {}", stderr(&out));
        let out = as_nobody(&format!("cat {}", q(m.path("closed/inner"))));
        assert!(!out.status.success(), "traversing 0700 dir must fail");
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );
        let out = as_nobody(&format!("chmod 777 {}", q(m.path("public"))));
        assert!(!out.status.success(), "chmod of a root file must fail");
        assert_eq!(
            fs::metadata(m.path("public")).unwrap().mode() & 0o777,
            0o644
        );
    };
    check(&m);
    m.unmount();
    let m = env.mount(&store, "mnt", &["allow_other"]);
    check(&m);

    // Once the directory is made world-writable, nobody can create in it and
    // the new file belongs to nobody.
    fs::set_permissions(m.path("dir"), fs::Permissions::from_mode(0o777)).unwrap();
    let out = as_nobody(&format!("echo mine > {}", q(m.path("dir/new"))));
    assert!(out.status.success(), "create in 0777 dir: {}", stderr(&out));
    let md = fs::metadata(m.path("dir/new")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert_eq!(fs::read(m.path("dir/new")).unwrap(), b"mine\n");
    m.unmount();
}

// ---------------------------------------------------------------------------
// mmap through python3
// ---------------------------------------------------------------------------

#[test]
fn mmap_read_write_msync() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let p = m.path("mapped");
    let mut d = pattern(61, 128 * 1024); // sizes below are spelled out in the script
    d[..5].copy_from_slice(b"hello");
    fs::write(&p, &d).unwrap();
    let script = r#"
import mmap, sys
p = sys.argv[1]
with open(p, 'r+b') as f:
    m = mmap.mmap(f.fileno(), 0)
    assert len(m) == 131072, len(m)
    assert m[:5] == b'hello', m[:5]
    m[0:5] = b'HELLO'
    m[65534:65538] = b'MMAP'
    m[131068:131072] = b'END!'
    m.flush()
    m.close()
with open(p, 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert m[65534:65538] == b'MMAP', m[65534:65538]
    sys.stdout.write(m[0:5].decode())
    m.close()
"#;
    let out = run(Command::new("python3").arg("-c").arg(script).arg(&p));
    assert_eq!(stdout(&out), "HELLO");
    d[..5].copy_from_slice(b"HELLO");
    d[65534..65538].copy_from_slice(b"MMAP");
    d[131068..].copy_from_slice(b"END!");
    assert_bytes(&fs::read(&p).unwrap(), &d, "read after mmap write");

    // A write through write(2) is visible through a new map.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"viaWrite", 1000).unwrap();
    drop(f);
    d[1000..1008].copy_from_slice(b"viaWrite");
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import mmap,sys\nf=open(sys.argv[1],'rb')\n\
             m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n\
             sys.stdout.write(m[1000:1008].decode())",
        )
        .arg(&p));
    assert_eq!(stdout(&out), "viaWrite");

    let m = remount(&env, &store, m);
    assert_bytes(&fs::read(m.path("mapped")).unwrap(), &d, "after remount");
    m.unmount();
}

// ---------------------------------------------------------------------------
// cp -a, tar, ls -lR
// ---------------------------------------------------------------------------

fn build_source_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty_dir")).unwrap();
    fs::write(root.join("top.txt"), b"top level\n").unwrap();
    fs::write(root.join("a/one"), pattern(71, 5000)).unwrap();
    fs::write(root.join("a/b/two"), pattern(72, 3 * CHUNK + 17)).unwrap();
    fs::write(root.join("a/b/c/three"), b"").unwrap();
    fs::write(root.join("a/exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("a/exec.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("a/one"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a/one", root.join("link_rel")).unwrap();
    std::os::unix::fs::symlink("../nowhere", root.join("a/dangling")).unwrap();
    std::os::unix::fs::symlink("b", root.join("a/dirlink")).unwrap();
    fs::hard_link(root.join("a/one"), root.join("a/one_hard")).unwrap();
    let sparse = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(root.join("sparse"))
        .unwrap();
    sparse.write_all_at(b"end", 3 << 20).unwrap();
    drop(sparse);
    std::os::unix::fs::chown(root.join("top.txt"), Some(1000), Some(1000)).unwrap();
    rustix::fs::setxattr(
        root.join("top.txt"),
        "user.note",
        b"copied",
        XattrFlags::empty(),
    )
    .ok(); // the temp fs may not support user xattrs; checked below if set
    let t = filetime(1_234_567_890, 123_456_789);
    rustix::fs::utimensat(CWD, root.join("a/b/two"), &t, rustix::fs::AtFlags::empty()).unwrap();
}

fn filetime(s: i64, ns: i64) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

/// Compare two trees: names, kinds, modes, uid/gid, mtimes (files, dirs),
/// symlink targets and content.
fn compare_trees(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff -r {} {}: {}{}",
        a.display(),
        b.display(),
        stdout(&out),
        stderr(&out)
    );
    fn walk(a: &Path, b: &Path) {
        let na = names(a);
        let nb = names(b);
        assert_eq!(na, nb, "entries of {} vs {}", a.display(), b.display());
        for n in na {
            let (pa, pb) = (a.join(&n), b.join(&n));
            let ma = fs::symlink_metadata(&pa).unwrap();
            let mb = fs::symlink_metadata(&pb).unwrap();
            assert_eq!(ma.mode(), mb.mode(), "mode of {}", pb.display());
            assert_eq!(
                (ma.uid(), ma.gid()),
                (mb.uid(), mb.gid()),
                "owner of {}",
                pb.display()
            );
            assert_eq!(ma.len(), mb.len(), "size of {}", pb.display());
            if !ma.file_type().is_symlink() {
                assert_eq!(
                    (ma.mtime(), ma.mtime_nsec()),
                    (mb.mtime(), mb.mtime_nsec()),
                    "mtime of {}",
                    pb.display()
                );
            }
            if ma.file_type().is_symlink() {
                assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
            } else if ma.is_dir() {
                walk(&pa, &pb);
            } else {
                assert_bytes(
                    &fs::read(&pb).unwrap(),
                    &fs::read(&pa).unwrap(),
                    &pb.display().to_string(),
                );
            }
        }
    }
    walk(a, b);
}

#[test]
fn cp_a_tree_into_mount() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let src = env.path("src");
    build_source_tree(&src);
    let src_has_xattr = get_xattr(&src.join("top.txt"), "user.note").is_ok();

    run(Command::new("cp").arg("-a").arg(&src).arg(&m.mountpoint));
    let check = |m: &Mount| {
        compare_trees(&src, &m.path("src"));
        // cp -a keeps hard links together.
        assert_eq!(
            fs::metadata(m.path("src/a/one")).unwrap().ino(),
            fs::metadata(m.path("src/a/one_hard")).unwrap().ino()
        );
        assert_eq!(fs::metadata(m.path("src/a/one")).unwrap().nlink(), 2);
        if src_has_xattr {
            assert_eq!(
                get_xattr(&m.path("src/top.txt"), "user.note").unwrap(),
                b"copied"
            );
        }
    };
    check(&m);
    let m = remount(&env, &store, m);
    check(&m);
    // Copy back out of the mount after remount.
    let back = env.path("back");
    run(Command::new("cp").arg("-a").arg(m.path("src")).arg(&back));
    compare_trees(&src, &back);
    m.unmount();
}

#[test]
fn tar_round_trip_and_ls_lr() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let src = env.path("src");
    build_source_tree(&src);

    // tar c | tar x into the mount.
    fs::create_dir(m.path("viatar")).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "tar --format=posix -C '{}' -cf - . | tar -C '{}' -xpf -",
        src.display(),
        m.path("viatar").display()
    )));
    compare_trees(&src, &m.path("viatar"));

    let out = run(Command::new("ls").arg("-lR").arg(&m.mountpoint));
    let text = stdout(&out);
    for n in [
        "top.txt",
        "exec.sh",
        "dangling -> ../nowhere",
        "three",
        "two",
    ] {
        assert!(text.contains(n), "ls -lR lacks {n}: {text}");
    }

    let m = remount(&env, &store, m);
    compare_trees(&src, &m.path("viatar"));
    run(Command::new("ls").arg("-lR").arg(&m.mountpoint));

    // tar out of the mount and extract elsewhere.
    let tarball = env.path("out.tar");
    // (POSIX format keeps nanosecond mtimes.)
    run(Command::new("tar")
        .arg("--format=posix")
        .arg("-C")
        .arg(m.path("viatar"))
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    let ex = env.path("extract");
    fs::create_dir(&ex).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&ex)
        .arg("-xpf")
        .arg(&tarball));
    compare_trees(&src, &ex);
    m.unmount();
}

// ---------------------------------------------------------------------------
// Second mount of a store in use
// ---------------------------------------------------------------------------

#[test]
fn second_mount_of_store_in_use_is_refused() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    fs::write(m.path("f"), b"still here").unwrap();
    let mp2 = env.path("mnt2");
    fs::create_dir(&mp2).unwrap();
    let mut c = env.cmd();
    c.arg("mount").arg("-f").arg(&store).arg(&mp2);
    let start = Instant::now();
    let out = run_expect_exit(c, &mp2);
    let took = start.elapsed();
    assert!(!out.status.success(), "second mount must fail");
    let msg = format!("{}{}", stderr(&out), stdout(&out));
    assert!(msg.contains("in use"), "message: {msg}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!is_mounted(&mp2));
    // The first mount is unaffected.
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still here");
    fs::write(m.path("g"), b"more").unwrap();
    let m = remount(&env, &store, m);
    assert_eq!(fs::read(m.path("g")).unwrap(), b"more");
    m.unmount();
}

// ---------------------------------------------------------------------------
// Persistence of a larger tree
// ---------------------------------------------------------------------------

#[test]
fn persistence_of_300_random_files() {
    if !require_fuse() {
        return;
    }
    let (env, store, m) = setup();
    let mut rng = Rng::new(0x005E_A1F5);
    let dirs: Vec<String> = (0..12)
        .map(|i| {
            if i % 4 == 3 {
                format!("d{}/sub{i}", i - 1)
            } else {
                format!("d{i}")
            }
        })
        .collect();
    for d in &dirs {
        fs::create_dir_all(m.path(d)).unwrap();
    }
    let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..300 {
        let dir = &dirs[rng.below(dirs.len() as u64) as usize];
        let size = match rng.below(10) {
            0 => 0,
            1 => rng.below(4097) as usize,
            2 => INLINE + rng.below(3) as usize - 1,
            3 => CHUNK * (1 + rng.below(3) as usize),
            _ => rng.below(300 * 1024) as usize,
        };
        let data = rng.bytes(size);
        let name = format!("{dir}/file{i:03}");
        fs::write(m.path(&name), &data).unwrap();
        want.insert(name, data);
    }
    // Some overwrites of existing files in place, after the fact.
    let keys: Vec<String> = want.keys().cloned().collect();
    for k in keys.iter().step_by(17) {
        let d = want.get_mut(k).unwrap();
        if d.is_empty() {
            continue;
        }
        let at = rng.below(d.len() as u64) as usize;
        let patch = rng.bytes((d.len() - at).min(5000));
        let f = OpenOptions::new().write(true).open(m.path(k)).unwrap();
        f.write_all_at(&patch, at as u64).unwrap();
        d[at..at + patch.len()].copy_from_slice(&patch);
    }

    fn collect(root: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                collect(root, &r, out);
            } else {
                out.insert(r.clone(), fs::read(root.join(&r)).unwrap());
            }
        }
    }
    let verify = |m: &Mount, when: &str| {
        let mut got = BTreeMap::new();
        collect(&m.mountpoint, "", &mut got);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{when}: file set"
        );
        for (k, v) in &want {
            assert_bytes(&got[k], v, &format!("{when}: {k}"));
        }
    };
    verify(&m, "before remount");
    let m = remount(&env, &store, m);
    verify(&m, "after remount");
    let m = remount(&env, &store, m);
    verify(&m, "after second remount");
    m.unmount();
}
