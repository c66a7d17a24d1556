//! POSIX ACLs through a real mount, with `setfacl`/`getfacl` (Debian
//! package `acl`), `cp -a` and `tar --acls`, acting as another user with
//! `setpriv`. Each scenario is also run on a directory of the host's
//! temporary file system when that one supports ACLs (ext4 here), and
//! `getfacl`'s output is compared; the expected text is checked as well.

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn setup() -> (Env, PathBuf, Mount) {
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &["allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    (env, store, m)
}

fn sh(script: &str) -> Output {
    Command::new("sh").arg("-c").arg(script).output().unwrap()
}

fn sh_ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}: {} {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Run a shell command as `uid:gid` without supplementary groups.
fn as_user(uid: u32, gid: u32, script: &str) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", script])
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux)")
}

/// `getfacl` of a path, without the `# file:` header (it names the path)
/// and with the tabs before `#effective:` (their count follows the line's
/// length) as one.
fn getfacl(p: &Path) -> String {
    let out = Command::new("getfacl")
        .arg("-p")
        .arg(p)
        .output()
        .expect("getfacl (package acl; scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "getfacl {}: {}",
        p.display(),
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .filter(|l| !l.starts_with("# file:"))
        .map(|l| match l.split_once('#') {
            Some((a, b)) if !a.is_empty() => format!("{}\t#{b}", a.trim_end()),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// A directory on the host's temporary file system if it supports ACLs
/// (ext4 does), to compare with.
fn reference_dir(env: &Env, name: &str) -> Option<PathBuf> {
    let d = env.path(name);
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let probe = d.join(".probe");
    fs::write(&probe, b"").unwrap();
    let ok = sh(&format!("setfacl -m u:1:r '{}'", probe.display()))
        .status
        .success();
    fs::remove_file(&probe).unwrap();
    if !ok {
        eprintln!(
            "the host's temporary file system has no ACLs: comparing with expected text only"
        );
    }
    ok.then_some(d)
}

/// Run `script` with `$D` set to `dir` in each of `dirs`.
fn in_each(dirs: &[&Path], script: &str) {
    for d in dirs {
        sh_ok(&format!("D='{}'; {script}", d.display()));
    }
}

/// `getfacl` of `rel` under each of `dirs` equals `expected`.
fn assert_acl(dirs: &[&Path], rel: &str, expected: &str) {
    for d in dirs {
        assert_eq!(
            getfacl(&d.join(rel)),
            expected.trim_end(),
            "getfacl {} under {}",
            rel,
            d.display()
        );
    }
}

fn dirs<'a>(m: &'a Mount, reference: &'a Option<PathBuf>) -> Vec<&'a Path> {
    let mut v = vec![m.mountpoint.as_path()];
    if let Some(r) = reference {
        v.push(r.as_path());
    }
    v
}

/// A mount, the test user and a reference directory on the host.
struct Scene {
    env: Env,
    store: PathBuf,
    m: Mount,
    reference: Option<PathBuf>,
    uid: u32,
    gid: u32,
    name: String,
}

impl Scene {
    fn new() -> Option<Scene> {
        if !require_fuse() {
            return None;
        }
        let (env, store, m) = setup();
        let (uid, gid, name) = test_user();
        let reference = reference_dir(&env, "ref");
        Some(Scene {
            env,
            store,
            m,
            reference,
            uid,
            gid,
            name,
        })
    }
}

#[test]
fn named_user_entry_grants_the_mask_limits_and_chmod_changes_the_mask() {
    let Some(sc) = Scene::new() else {
        return;
    };
    let (m, uid, gid, name) = (&sc.m, sc.uid, sc.gid, &sc.name);
    let all = dirs(m, &sc.reference);
    in_each(&all, "echo secret > $D/f; chmod 0600 $D/f");
    for d in &all {
        let f = d.join("f");
        let cat = format!("cat '{}'", f.display());
        assert!(
            !as_user(uid, gid, &cat).status.success(),
            "read without ACL"
        );
        sh_ok(&format!("setfacl -m u:{uid}:r '{}'", f.display()));
        let out = as_user(uid, gid, &cat);
        assert!(out.status.success(), "named user r: {}", stderr(&out));
        assert_eq!(stdout(&out), "secret\n");
        assert_eq!(mode_of(&f), 0o640, "the mask shows as group bits");
        // r only: writing is still denied
        let w = format!("echo x >> '{}'", f.display());
        assert!(!as_user(uid, gid, &w).status.success(), "write with r");
        // the mask limits the named entry
        sh_ok(&format!("setfacl -m m::- '{}'", f.display()));
        assert!(!as_user(uid, gid, &cat).status.success(), "read past mask");
        assert_eq!(mode_of(&f), 0o600);
        // chmod changes the mask
        sh_ok(&format!("chmod 0660 '{}'", f.display()));
        assert!(as_user(uid, gid, &cat).status.success(), "read after chmod");
        assert!(
            !as_user(uid, gid, &w).status.success(),
            "write: rw mask, r entry"
        );
    }
    // the entry was r: rw- beside it is the mask's, effective stays r--
    let expected = format!(
        "# owner: root\n# group: root\nuser::rw-\nuser:{name}:r--\ngroup::---\nmask::rw-\nother::---\n"
    );
    assert_acl(&all, "f", &expected);
    // removing all extended entries leaves the mode (stored as the mode)
    in_each(&all, "setfacl -b $D/f");
    assert_acl(
        &all,
        "f",
        "# owner: root\n# group: root\nuser::rw-\ngroup::---\nother::---\n",
    );
    let out = sh_ok(&format!("getfattr -m - -d '{}'", m.path("f").display()));
    assert!(
        !out.contains("posix_acl"),
        "a minimal ACL is stored as the mode: {out}"
    );
    sc.m.unmount();
}

#[test]
fn default_acl_is_inherited_and_replaces_the_umask() {
    let Some(sc) = Scene::new() else {
        return;
    };
    let (m, uid, gid, name) = (&sc.m, sc.uid, sc.gid, &sc.name);
    let all = dirs(m, &sc.reference);
    in_each(
        &all,
        &format!("mkdir -m 0750 $D/d && setfacl -d -m u:{uid}:rwx,o::r $D/d && setfacl -m u:{uid}:rx $D/d"),
    );
    in_each(
        &all,
        "umask 077; touch $D/d/f; mkdir $D/d/sub; mkfifo $D/d/p; ln -s f $D/d/l",
    );
    for d in &all {
        let f = d.join("d/f");
        // not 0600 (the umask): owner rw, mask rw, other r
        assert_eq!(mode_of(&f), 0o664, "{}", f.display());
        assert_eq!(mode_of(&d.join("d/sub")), 0o774);
        assert_eq!(mode_of(&d.join("d/p")), 0o664);
        let out = as_user(uid, gid, &format!("echo hi > '{}'", f.display()));
        assert!(out.status.success(), "inherited rwx: {}", stderr(&out));
    }
    let base = |mode: &str| {
        format!(
            "# owner: root\n# group: root\nuser::rw{mode}\nuser:{name}:rwx\t#effective:rw-\n\
             group::r-x\t#effective:r--\nmask::rw-\nother::r--\n"
        )
    };
    assert_acl(&all, "d/f", &base("-"));
    assert_acl(&all, "d/p", &base("-"));
    let sub = format!(
        "# owner: root\n# group: root\nuser::rwx\nuser:{name}:rwx\ngroup::r-x\nmask::rwx\nother::r--\n\
         default:user::rwx\ndefault:user:{name}:rwx\ndefault:group::r-x\ndefault:mask::rwx\ndefault:other::r--\n"
    );
    assert_acl(&all, "d/sub", &sub);
    // without a default ACL the umask applies as before
    in_each(&all, "umask 027; touch $D/g; mkdir $D/e");
    for d in &all {
        assert_eq!(mode_of(&d.join("g")), 0o640);
        assert_eq!(mode_of(&d.join("e")), 0o750);
    }
    // a default ACL only on directories
    let out = sh(&format!(
        "setfacl -d -m u:{uid}:r '{}'",
        m.path("g").display()
    ));
    assert!(!out.status.success(), "default ACL on a file");
    sc.m.unmount();
}

#[test]
fn cp_a_and_tar_acls_keep_acls_and_they_survive_a_remount() {
    let Some(Scene {
        env,
        store,
        m,
        uid,
        gid,
        name,
        ..
    }) = Scene::new()
    else {
        return;
    };
    let mp = m.mountpoint.clone();
    sh_ok(&format!(
        "cd '{}' && mkdir -p src/d && echo data > src/f && chmod 0640 src/f \
         && setfacl -m u:{uid}:rw src/f && setfacl -d -m g:{gid}:rx src/d",
        mp.display()
    ));
    let f_acl = getfacl(&mp.join("src/f"));
    let d_acl = getfacl(&mp.join("src/d"));
    assert!(f_acl.contains(&format!("user:{name}:rw-")), "{f_acl}");
    assert!(d_acl.contains("default:group:"), "{d_acl}");
    // cp -a within the mount, out to the host and back in
    let host = env.path("host");
    fs::create_dir(&host).unwrap();
    sh_ok(&format!(
        "cd '{}' && cp -a src cpa && cp -a src '{}' && cp -a '{}' back",
        mp.display(),
        host.display(),
        host.join("src").display()
    ));
    // tar --acls: create on the mount, extract on the mount
    sh_ok(&format!(
        "cd '{}' && tar --acls -cf '{}' src && mkdir untar && tar --acls -xpf '{}' -C untar",
        mp.display(),
        env.path("a.tar").display(),
        env.path("a.tar").display()
    ));
    for copy in ["cpa", "back", "untar/src"] {
        assert_eq!(getfacl(&mp.join(copy).join("f")), f_acl, "{copy}/f");
        assert_eq!(getfacl(&mp.join(copy).join("d")), d_acl, "{copy}/d");
    }
    // the ACLs survive unmount and mount, and are enforced after it
    m.unmount();
    let m = env.mount(&store, "mnt", &["allow_other"]);
    assert_eq!(getfacl(&mp.join("src/f")), f_acl);
    assert_eq!(getfacl(&mp.join("untar/src/d")), d_acl);
    let out = as_user(uid, gid, &format!("cat '{}'", mp.join("src/f").display()));
    assert!(out.status.success(), "after remount: {}", stderr(&out));
    assert_eq!(stdout(&out), "data\n");
    let out = as_user(
        uid + 1,
        gid + 1,
        &format!("cat '{}'", mp.join("src/f").display()),
    );
    assert!(!out.status.success(), "another user reads");
    m.unmount();
}

#[test]
fn malformed_acl_xattrs_are_refused_with_einval() {
    if !require_fuse() {
        return;
    }
    let (env, _store, m) = setup();
    let reference = reference_dir(&env, "ref");
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    // a version the kernel does not know: refused by the kernel itself
    let out = sh(&format!(
        "setfattr -n system.posix_acl_access -v 0x01000000010006000000000004000400ffffffff20000400ffffffff '{}'",
        f.display()
    ));
    assert!(
        stderr(&out).contains("Operation not supported"),
        "{}",
        stderr(&out)
    );
    for (what, hex) in [
        (
            "no other entry",
            "0x02000000010006000000000004000400ffffffff",
        ),
        (
            "perm 8",
            "0x02000000010008000000000004000400ffffffff20000400ffffffff",
        ),
        ("half an entry", "0x0200000001000600"),
        (
            "unsorted",
            "0x0200000004000400ffffffff01000600ffffffff20000400ffffffff",
        ),
    ] {
        let out = sh(&format!(
            "setfattr -n system.posix_acl_access -v {hex} '{}'",
            f.display()
        ));
        assert!(!out.status.success(), "{what} accepted");
        assert!(
            stderr(&out).contains("Invalid argument"),
            "{what}: {}",
            stderr(&out)
        );
        if let Some(r) = &reference {
            let g = r.join("g");
            fs::write(&g, b"x").unwrap();
            let out = sh(&format!(
                "setfattr -n system.posix_acl_access -v {hex} '{}'",
                g.display()
            ));
            assert!(
                stderr(&out).contains("Invalid argument"),
                "reference: {what}"
            );
        }
    }
    assert_eq!(mode_of(&f), 0o644, "nothing changed");
    let out = sh_ok(&format!("getfattr -m - -d '{}'", f.display()));
    assert!(!out.contains("posix_acl"), "{out}");
    m.unmount();
}

#[test]
fn setting_an_acl_outside_the_group_clears_setgid() {
    let Some(sc) = Scene::new() else {
        return;
    };
    let all = dirs(&sc.m, &sc.reference);
    let (uid, gid) = (sc.uid, sc.gid);
    in_each(
        &all,
        &format!("touch $D/s $D/t && chown {uid}:0 $D/s && chown {uid}:{gid} $D/t && chmod 2755 $D/s $D/t"),
    );
    for d in &all {
        for (f, kept) in [("s", false), ("t", true)] {
            let p = d.join(f);
            let out = as_user(uid, gid, &format!("setfacl -m u:0:r '{}'", p.display()));
            assert!(out.status.success(), "{}", stderr(&out));
            let want = if kept { 0o2755 } else { 0o755 };
            assert_eq!(mode_of(&p), want, "{}", p.display());
        }
    }
    sc.m.unmount();
}
