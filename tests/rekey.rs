//! `sealfs rekey`: a fresh content key, every chunk and inline file
//! re-encrypted, resumable after being killed at any point.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Content-key generation of every chunk object (bytes 6..10 of its header).
fn chunk_gens(store: &Path) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for d in std::fs::read_dir(store.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let b = std::fs::read(f.path()).unwrap();
            if b.len() >= 10 {
                let g = u32::from_le_bytes(b[6..10].try_into().unwrap());
                *out.entry(g).or_default() += 1;
            }
        }
    }
    out
}

/// Write a tree with inline files, a multi-chunk file and subdirectories;
/// returns path -> content.
fn populate(m: &Mount, big_mib: usize, rng: &mut Rng) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    std::fs::create_dir_all(m.path("docs/deep")).unwrap();
    for i in 0..20 {
        let p = PathBuf::from(format!("docs/small-{i}.txt"));
        let len = rng.below(3000) as usize;
        files.insert(p, rng.bytes(len));
    }
    files.insert(PathBuf::from("docs/deep/mid.bin"), rng.bytes(300_000));
    files.insert(PathBuf::from("big.bin"), rng.bytes(big_mib << 20));
    for (p, data) in &files {
        std::fs::write(m.mountpoint.join(p), data).unwrap();
    }
    files
}

fn verify(m: &Mount, files: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, data) in files {
        let got = std::fs::read(m.mountpoint.join(p))
            .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        assert!(got == *data, "{} differs after re-key", p.display());
    }
}

fn info_json(env: &Env, store: &Path) -> serde_json::Value {
    let out = env.sealfs(&["info", "--json", store.to_str().unwrap()]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn rekey_reencrypts_everything_and_the_old_key_is_not_needed() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let out = env.sealfs(&["key", "create", "--alias", "other"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    let files = populate(&m, 8, &mut rng);
    m.unmount();
    assert_eq!(info_json(&env, &store)["content_key_generation"], 1);
    let before = chunk_gens(&store);
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), vec![1]);

    let out = env.sealfs(&["rekey", store.to_str().unwrap(), "--kms-key", "alias/other"]);
    assert!(out.status.success(), "rekey: {}", stderr(&out));
    assert!(stdout(&out).contains("re-keyed"), "{}", stdout(&out));

    // Every chunk object is now under generation 2; none under 1.
    let after = chunk_gens(&store);
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "chunk generations after re-key: {after:?}"
    );
    let info = info_json(&env, &store);
    assert_eq!(info["content_key_generation"], 2);
    let other = env.sealfs(&["key", "describe", "--json", "alias/other"]);
    let other: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(info["content_key"]["id"], other["id"]);

    // The previous master key is not needed any more: disable it.
    let out = env.sealfs(&["key", "disable", "alias/test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = env.mount(&store, "mnt", &[]);
    verify(&m, &files);
    m.unmount();

    // A re-key without --kms-key stays under the same master key.
    let out = env.sealfs(&["rekey", store.to_str().unwrap()]);
    assert!(out.status.success(), "second rekey: {}", stderr(&out));
    assert_eq!(info_json(&env, &store)["content_key_generation"], 3);
    assert_eq!(
        chunk_gens(&store).keys().copied().collect::<Vec<_>>(),
        vec![3]
    );
    let m = env.mount(&store, "mnt", &[]);
    verify(&m, &files);
    m.unmount();
}

#[test]
fn rekey_killed_at_any_point_loses_nothing_and_resumes() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let mut rng = Rng::seeded();
    let m = env.mount(&store, "mnt", &[]);
    let files = populate(&m, 96, &mut rng);
    m.unmount();
    let total: usize = chunk_gens(&store).values().sum();

    // Kill the re-key at different points: right away, and after some of
    // the chunks were re-encrypted (polled from the store itself).
    let mut killed_midway = false;
    for (round, wait_for) in [0usize, total / 4, total / 2].into_iter().enumerate() {
        let mut child = env
            .cmd()
            .args(["rekey", store.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            let gens = chunk_gens(&store);
            let newest = gens.keys().max().copied().unwrap_or(0);
            let done = gens.get(&newest).copied().unwrap_or(0);
            if child.try_wait().unwrap().is_some() {
                break; // finished before we could kill it
            }
            if (round == 0 || (gens.len() > 1 && done >= wait_for))
                || start.elapsed() > Duration::from_secs(60)
            {
                child.kill().unwrap();
                if gens.len() > 1 {
                    killed_midway = true;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
        // Whatever state it was killed in, the volume mounts and is intact.
        let m = env.mount(&store, "mnt", &[]);
        verify(&m, &files);
        m.unmount();
    }
    assert!(
        killed_midway,
        "no kill landed while chunks of two generations existed"
    );

    // Running it again finishes the job.
    let out = env.sealfs(&["rekey", store.to_str().unwrap()]);
    assert!(out.status.success(), "resumed rekey: {}", stderr(&out));
    let gens = chunk_gens(&store);
    assert_eq!(gens.len(), 1, "chunk generations after resuming: {gens:?}");
    let info = info_json(&env, &store);
    assert_eq!(
        info["content_key_generation"].as_u64().unwrap() as u32,
        *gens.keys().next().unwrap()
    );
    let m = env.mount(&store, "mnt", &[]);
    verify(&m, &files);
    m.unmount();
}

#[test]
fn rekey_of_a_mounted_store_is_refused() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    let out = env.sealfs(&["rekey", store.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    let out = env.sealfs(&["rekey", store.to_str().unwrap(), "--kms-key", "alias/nope"]);
    assert!(!out.status.success());
    m.unmount();
    // Unknown key: refused, nothing changed.
    let before = snapshot_store(&store);
    let out = env.sealfs(&["rekey", store.to_str().unwrap(), "--kms-key", "alias/nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no key matches"), "{}", stderr(&out));
    assert!(snapshot_store(&store) == before, "store changed");
}
