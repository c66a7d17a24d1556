//! Client-side encryption with keystore keys (issue 14): `sealfs key
//! generate-data-key | encrypt | decrypt | re-encrypt`, encryption
//! contexts as associated data and in the audit log, the ciphertext blob
//! format (committed test vectors in tests/fixtures/kms-blob-v1.json).

mod common;
use common::*;

use base64::Engine;
use serde_json::Value;

fn b64d(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn audit_lines(env: &Env) -> Vec<Value> {
    let out = env.sealfs(&["key", "audit", "--json"]);
    ok(&out, "audit")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn encrypt_decrypt_with_context_and_audit() {
    let env = Env::new();
    let msg = env.path("msg.txt");
    std::fs::write(&msg, b"the launch codes").unwrap();
    let blob = env.path("msg.kms");
    ok(
        &env.sealfs(&[
            "key",
            "encrypt",
            "alias/test",
            "--in",
            s(&msg),
            "--out",
            s(&blob),
            "--context",
            "app=billing",
            "--context",
            "tenant=7",
        ]),
        "encrypt",
    );
    let bytes = std::fs::read(&blob).unwrap();
    assert_eq!(&bytes[..4], b"SKB\x01", "blob magic");
    assert!(
        !bytes.windows(16).any(|w| w == b"the launch codes"),
        "plaintext visible in the blob"
    );

    // the right context decrypts (the blob names its key: no key argument)
    let out1 = env.path("out1.txt");
    ok(
        &env.sealfs(&[
            "key",
            "decrypt",
            "--in",
            s(&blob),
            "--out",
            s(&out1),
            "--context",
            "tenant=7",
            "--context",
            "app=billing",
        ]),
        "decrypt",
    );
    assert_eq!(std::fs::read(&out1).unwrap(), b"the launch codes");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out1).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // a missing or different context is refused, nothing written
    for ctx in [
        vec![],
        vec!["--context", "app=billing"],
        vec!["--context", "app=x", "--context", "tenant=7"],
    ] {
        let o = env.path("bad.txt");
        let mut a = vec!["key", "decrypt", "--in", s(&blob), "--out", s(&o)];
        a.extend(ctx);
        let out = env.sealfs(&a);
        assert_failed(
            &out,
            &["ciphertext is not valid", "encryption context"],
            "wrong context",
        );
        assert!(!o.exists(), "a refused decrypt wrote its output");
    }

    // the audit log has the Encrypt and Decrypt entries with the context
    let log = audit_lines(&env);
    let enc = log
        .iter()
        .find(|e| e["op"] == "Encrypt")
        .expect("Encrypt audited");
    assert_eq!(enc["context"]["app"], "billing");
    assert_eq!(enc["context"]["tenant"], "7");
    assert!(log
        .iter()
        .any(|e| e["op"] == "Decrypt" && e["result"] == "ok" && e["context"]["app"] == "billing"));
    assert!(log
        .iter()
        .any(|e| e["op"] == "Decrypt" && e["result"] != "ok"));

    // a tampered blob is refused
    for i in [5usize, 20, 50, bytes.len() - 1] {
        let mut t = bytes.clone();
        t[i] ^= 0x40;
        let tb = env.path(&format!("t{i}.kms"));
        std::fs::write(&tb, &t).unwrap();
        let o = env.path(&format!("t{i}.txt"));
        let out = env.sealfs(&[
            "key",
            "decrypt",
            "--in",
            s(&tb),
            "--out",
            s(&o),
            "--context",
            "app=billing",
            "--context",
            "tenant=7",
        ]);
        assert!(!out.status.success(), "tampered byte {i} decrypted");
        assert!(!o.exists());
    }

    // disabled key: refused; enabled: works again
    ok(&env.sealfs(&["key", "disable", "alias/test"]), "disable");
    let o = env.path("out2.txt");
    let out = env.sealfs(&[
        "key",
        "decrypt",
        "--in",
        s(&blob),
        "--out",
        s(&o),
        "--context",
        "app=billing",
        "--context",
        "tenant=7",
    ]);
    assert_failed(&out, &["Disabled"], "decrypt with a disabled key");
    ok(&env.sealfs(&["key", "enable", "alias/test"]), "enable");
    ok(
        &env.sealfs(&[
            "key",
            "decrypt",
            "--in",
            s(&blob),
            "--out",
            s(&o),
            "--context",
            "app=billing",
            "--context",
            "tenant=7",
        ]),
        "decrypt after enable",
    );

    // over 4096 bytes: refused
    let big = env.path("big");
    std::fs::write(&big, vec![0u8; 4097]).unwrap();
    let out = env.sealfs(&[
        "key",
        "encrypt",
        "test",
        "--in",
        s(&big),
        "--out",
        s(&env.path("big.kms")),
    ]);
    assert_failed(&out, &["4096"], "oversized encrypt");
}

#[test]
fn data_keys_rotation_and_re_encrypt() {
    let env = Env::new();
    let out = env.sealfs(&[
        "key",
        "generate-data-key",
        "alias/test",
        "--context",
        "f=1",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&ok(&out, "generate-data-key")).unwrap();
    let pt = b64d(v["Plaintext"].as_str().unwrap());
    assert_eq!(pt.len(), 32);
    let blob = env.path("dk.kms");
    std::fs::write(&blob, b64d(v["CiphertextBlob"].as_str().unwrap())).unwrap();

    let out = env.sealfs(&[
        "key",
        "generate-data-key",
        "test",
        "--key-spec",
        "AES_128",
        "--json",
    ]);
    let v2: Value = serde_json::from_str(&ok(&out, "AES_128")).unwrap();
    assert_eq!(b64d(v2["Plaintext"].as_str().unwrap()).len(), 16);

    // rotate: the old blob still decrypts (it names v1)
    ok(&env.sealfs(&["key", "rotate", "test"]), "rotate");
    let o = env.path("dk.bin");
    ok(
        &env.sealfs(&[
            "key",
            "decrypt",
            "--in",
            s(&blob),
            "--out",
            s(&o),
            "--context",
            "f=1",
        ]),
        "decrypt v1 blob",
    );
    assert_eq!(std::fs::read(&o).unwrap(), pt);

    // re-encrypt to another key with another context
    let other = ok(
        &env.sealfs(&["key", "create", "--alias", "other"]),
        "create",
    )
    .trim()
    .to_string();
    let b2 = env.path("dk2.kms");
    let out = env.sealfs(&[
        "key",
        "re-encrypt",
        "--in",
        s(&blob),
        "--context",
        "f=1",
        "--to",
        "alias/other",
        "--out",
        s(&b2),
        "--to-context",
        "f=2",
    ]);
    assert!(ok(&out, "re-encrypt").contains(&other));
    // --key must match the blob's key
    let o2 = env.path("dk2.bin");
    let out = env.sealfs(&[
        "key",
        "decrypt",
        "--in",
        s(&b2),
        "--out",
        s(&o2),
        "--context",
        "f=2",
        "--key",
        "alias/test",
    ]);
    assert_failed(
        &out,
        &["not with the given key"],
        "decrypt with --key of another key",
    );
    ok(
        &env.sealfs(&[
            "key",
            "decrypt",
            "--in",
            s(&b2),
            "--out",
            s(&o2),
            "--context",
            "f=2",
            "--key",
            "other",
        ]),
        "decrypt re-encrypted",
    );
    assert_eq!(std::fs::read(&o2).unwrap(), pt);
    assert!(audit_lines(&env)
        .iter()
        .any(|e| e["op"] == "ReEncrypt" && e["key_id"] == other.as_str()));

    // deleting the key crypto-shreds the blob
    ok(
        &env.sealfs(&["key", "schedule-deletion", "other", "--pending-days", "7"]),
        "schedule",
    );
    let later = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 8 * 86_400)
        .to_string();
    let o3 = env.path("dk3.bin");
    let out = env
        .cmd()
        .env("SEALFS_KMS_NOW", &later)
        .args([
            "key",
            "decrypt",
            "--in",
            s(&b2),
            "--out",
            s(&o3),
            "--context",
            "f=2",
        ])
        .output()
        .unwrap();
    assert_failed(
        &out,
        &["deleted", "crypto-shredded"],
        "decrypt after deletion",
    );
}

/// The committed test vectors (docs/FORMAT.md, "Ciphertext blobs") decode
/// with the stated master key material to the stated plaintext, and
/// sealing again with the stated nonces gives the same bytes.
#[test]
fn blob_test_vectors() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kms-blob-v1.json"
    ))
    .unwrap();
    let vectors: Value = serde_json::from_str(&text).unwrap();
    let vectors = vectors.as_array().unwrap();
    assert!(vectors.len() >= 2);
    for v in vectors {
        let blob = hex::decode(v["blob"].as_str().unwrap()).unwrap();
        let parsed = sealfs::kms::blob::Blob::parse(&blob).unwrap();
        assert_eq!(parsed.key.key_id, v["key_id"].as_str().unwrap());
        assert_eq!(
            parsed.key.key_version as u64,
            v["key_version"].as_u64().unwrap()
        );
        let ctx: sealfs::kms::EncryptionContext =
            serde_json::from_value(v["context"].clone()).unwrap();
        let material: [u8; 32] = hex::decode(v["master_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let plain = sealfs::kms::blob::open_with_material(&parsed, &material, &ctx).unwrap();
        assert_eq!(hex::encode(&plain[..]), v["plaintext"].as_str().unwrap());
        // re-sealing with the stated nonces gives the same bytes
        let again = sealfs::kms::blob::seal_with_material(
            &parsed.key.key_id,
            parsed.key.key_version,
            &material,
            &ctx,
            &hex::decode(v["blob_key"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
            &hex::decode(v["wrap_nonce"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
            &hex::decode(v["payload_nonce"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
            &plain,
        );
        assert_eq!(hex::encode(again.to_bytes()), v["blob"].as_str().unwrap());
        // a wrong context fails
        let mut wrong = ctx.clone();
        wrong.insert("x".into(), "y".into());
        assert!(sealfs::kms::blob::open_with_material(&parsed, &material, &wrong).is_err());
    }
}
