mod common;
use common::*;

#[test]
fn mount_write_remount_read() {
    if !require_fuse() {
        return;
    }
    let env = Env::new();
    let store = env.create_store("store");
    let m = env.mount(&store, "mnt", &[]);
    std::fs::write(m.path("hello.txt"), b"hello sealfs").unwrap();
    m.unmount();
    let m = env.mount(&store, "mnt", &[]);
    assert_eq!(std::fs::read(m.path("hello.txt")).unwrap(), b"hello sealfs");
    m.unmount();
}
