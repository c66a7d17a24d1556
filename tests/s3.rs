//! Stores on S3-compatible object storage (issue 12). The S3 backend is
//! not implemented yet: what is tested here is that an `s3://` store URL is
//! refused clearly by every command that takes a store, and that nothing is
//! created on the local disk in its place (before this, `sealfs create
//! s3://b/p` made a local directory named `s3:`).

mod common;
use common::*;

#[test]
fn store_urls_are_refused_without_touching_disk() {
    let env = Env::new();
    let cwd = env.path("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let mp = env.path("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let mp = mp.to_str().unwrap();
    let local = env.create_store("local.store");
    let local = local.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "s3://bucket/vol1", "--kms-key", "alias/test"],
        vec!["mount", "s3://bucket/vol1", mp],
        vec!["mount", "-f", "s3://bucket/vol1", mp],
        vec!["info", "s3://bucket/vol1"],
        vec!["fsck", "s3://bucket/vol1"],
        vec!["gc", "s3://bucket/vol1"],
        vec!["rewrap", "s3://bucket/vol1"],
        vec!["rekey", "s3://bucket/vol1"],
        vec!["clone", "s3://bucket/vol1@snap", "copy.store"],
        vec!["clone", local, "s3://bucket/copy"],
    ];
    for args in &cases {
        let out = env.cmd().current_dir(&cwd).args(args).output().unwrap();
        assert_failed(
            &out,
            &["s3://bucket/", "S3 stores are not supported"],
            &args.join(" "),
        );
        assert!(!is_mounted(std::path::Path::new(mp)), "{args:?} mounted");
    }
    let out = env
        .cmd()
        .current_dir(&cwd)
        .args(["create", "gs://bucket/vol1", "--kms-key", "alias/test"])
        .output()
        .unwrap();
    assert_failed(&out, &["unknown store URL scheme \"gs\""], "create gs://");
    let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().collect();
    assert!(
        left.is_empty(),
        "files created in the working directory: {left:?}"
    );
    // A local directory whose name starts with "s3:" is still reachable.
    std::fs::create_dir_all(cwd.join("s3:/bucket")).unwrap();
    let out = env
        .cmd()
        .current_dir(&cwd)
        .args(["create", "./s3://bucket/vol1", "--kms-key", "alias/test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "create ./s3://...: {}", stderr(&out));
    assert!(cwd.join("s3:/bucket/vol1").is_dir());
}
