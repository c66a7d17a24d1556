//! Ciphertext blobs: what `sealfs key encrypt`, `generate-data-key` and the
//! KMS API's `Encrypt`/`GenerateDataKey` return, and `decrypt` takes back.
//!
//! A blob names the master key and version that protect it, so `decrypt`
//! needs no key argument (as in AWS KMS). It is envelope-encrypted: a fresh
//! 32-byte *blob key* is wrapped by the master key exactly as a volume key
//! is (the encryption context bound as associated data, so HSM keys work
//! too), and the payload is sealed under the blob key with the blob's
//! header as associated data. The byte layout is in docs/FORMAT.md
//! ("Ciphertext blobs").
//!
//! Decrypt never returns the blob key itself: a wrapped volume key pasted
//! into a blob unwraps, but its payload does not authenticate, so the
//! volume key does not leave the keystore.

use zeroize::Zeroizing;

use super::{EncryptionContext, Keystore, KmsError, Result, WrappedKey};
use crate::crypto::{AeadKey, Key32};

/// First bytes of every blob.
pub const BLOB_MAGIC: &[u8; 4] = b"SKB\x01";
/// Blob format version.
pub const BLOB_VERSION: u8 = 1;
/// Largest plaintext Encrypt takes (AWS KMS: 4096 bytes).
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest blob decrypt looks at (a maximal plaintext plus headers).
pub const MAX_BLOB: usize = 6144;
/// Sealed blob key: nonce ‖ 32-byte key ‖ tag.
const WRAPPED_LEN: usize = 12 + 32 + 16;

/// A parsed blob (not yet authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub key: WrappedKey,
    /// `nonce ‖ ciphertext ‖ tag` of the payload.
    pub payload: Vec<u8>,
}

fn bad(why: &str) -> KmsError {
    KmsError::InvalidCiphertext(why.to_string())
}

impl Blob {
    /// The bytes before the payload (the payload's associated data).
    fn header(key: &WrappedKey) -> Vec<u8> {
        let mut h = Vec::with_capacity(4 + 1 + 1 + key.key_id.len() + 4 + 2 + WRAPPED_LEN);
        h.extend_from_slice(BLOB_MAGIC);
        h.push(BLOB_VERSION);
        h.push(key.key_id.len() as u8);
        h.extend_from_slice(key.key_id.as_bytes());
        h.extend_from_slice(&key.key_version.to_be_bytes());
        h.extend_from_slice(&(key.sealed.len() as u16).to_be_bytes());
        h.extend_from_slice(&key.sealed);
        h
    }

    /// Serialize.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Self::header(&self.key);
        b.extend_from_slice(&self.payload);
        b
    }

    /// Parse strictly: magic, version, lengths; every field checked.
    pub fn parse(b: &[u8]) -> Result<Blob> {
        if b.len() > MAX_BLOB {
            return Err(bad("longer than any blob sealfs makes"));
        }
        if b.len() < 6 || &b[..4] != BLOB_MAGIC {
            return Err(bad("not a sealfs ciphertext blob"));
        }
        if b[4] != BLOB_VERSION {
            return Err(bad(&format!(
                "blob format version {} is not supported (this sealfs reads version {BLOB_VERSION})",
                b[4]
            )));
        }
        let idl = b[5] as usize;
        let mut p = 6;
        let need = |p: usize, n: usize| {
            if b.len() < p + n {
                Err(bad("truncated"))
            } else {
                Ok(())
            }
        };
        need(p, idl)?;
        let id = std::str::from_utf8(&b[p..p + idl]).map_err(|_| bad("key id is not text"))?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(bad("key id is not a key id"));
        }
        p += idl;
        need(p, 6)?;
        let version = u32::from_be_bytes(b[p..p + 4].try_into().expect("4 bytes"));
        let wl = u16::from_be_bytes(b[p + 4..p + 6].try_into().expect("2 bytes")) as usize;
        p += 6;
        if wl != WRAPPED_LEN && wl > 512 {
            return Err(bad("wrapped key length out of range"));
        }
        need(p, wl)?;
        let sealed = b[p..p + wl].to_vec();
        p += wl;
        if b.len() - p < 12 + 16 {
            return Err(bad("truncated"));
        }
        Ok(Blob {
            key: WrappedKey {
                key_id: id.to_string(),
                key_version: version,
                sealed,
            },
            payload: b[p..].to_vec(),
        })
    }

    /// Seal `plaintext` under an already wrapped blob key `bk`.
    pub fn seal_with(key: WrappedKey, bk: &Key32, plaintext: &[u8]) -> Blob {
        let payload = AeadKey::new(bk).seal(&Self::header(&key), plaintext);
        Blob { key, payload }
    }

    /// Known-answer form of [`Blob::seal_with`] (test vectors).
    pub fn seal_with_nonce(
        key: WrappedKey,
        bk: &Key32,
        nonce: &[u8; 12],
        plaintext: &[u8],
    ) -> Blob {
        let payload = AeadKey::new(bk).seal_with_nonce(nonce, &Self::header(&key), plaintext);
        Blob { key, payload }
    }

    /// Open the payload with the unwrapped blob key.
    pub fn open_with(&self, bk: &Key32) -> Result<Zeroizing<Vec<u8>>> {
        AeadKey::new(bk)
            .open(&Self::header(&self.key), &self.payload)
            .map(Zeroizing::new)
            .map_err(|_| bad("the blob was modified, or it is not a blob (its payload does not authenticate)"))
    }
}

/// Encrypt `plaintext` (at most [`MAX_PLAINTEXT`] bytes) under the newest
/// version of master key `name`, binding `ctx`; audited as `op`
/// (Encrypt, GenerateDataKey, ReEncrypt, GenerateDataKeyPair).
pub fn encrypt(
    ks: &Keystore,
    op: &str,
    name: &str,
    ctx: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Blob> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(KmsError::Refused(format!(
            "plaintext is {} bytes; encrypt takes at most {MAX_PLAINTEXT} (encrypt a data key, not the data: `sealfs key generate-data-key`)",
            plaintext.len()
        )));
    }
    let bk = Key32::random();
    let w = ks.wrap_op(op, name, ctx, &bk)?;
    Ok(Blob::seal_with(w, &bk, plaintext))
}

/// Decrypt a blob (audited as Decrypt with the blob's key and context).
/// `expect_key`, when given, must name the blob's key
/// ([`KmsError::IncorrectKey`] otherwise).
pub fn decrypt(
    ks: &Keystore,
    blob: &[u8],
    ctx: &EncryptionContext,
    expect_key: Option<&str>,
) -> Result<(Blob, Zeroizing<Vec<u8>>)> {
    let b = Blob::parse(blob)?;
    if let Some(name) = expect_key {
        let k = ks.resolve(name)?;
        if k.id != b.key.key_id {
            return Err(KmsError::IncorrectKey {
                blob_key: b.key.key_id.clone(),
                given: k.id.clone(),
            });
        }
    }
    let bk = ks.unwrap(&b.key, ctx).map_err(|e| match e {
        KmsError::UnwrapFailed { .. } => bad(
            "it was modified, its encryption context differs from the one it was made with, or another keystore made it",
        ),
        e => e,
    })?;
    let plain = b.open_with(&bk)?;
    Ok((b, plain))
}

/// Decrypt and encrypt again under `to` with context `to_ctx` (audited as
/// Decrypt and ReEncrypt). The plaintext never leaves this function.
pub fn re_encrypt(
    ks: &Keystore,
    blob: &[u8],
    from_ctx: &EncryptionContext,
    to: &str,
    to_ctx: &EncryptionContext,
) -> Result<(Blob, Blob)> {
    let (old, plain) = decrypt(ks, blob, from_ctx, None)?;
    let new = encrypt(ks, "ReEncrypt", to, to_ctx, &plain)?;
    Ok((old, new))
}

/// Open a blob with the raw material of its master key version, as the
/// keystore does for a software key (test vectors, docs/FORMAT.md).
pub fn open_with_material(
    b: &Blob,
    material: &[u8; 32],
    ctx: &EncryptionContext,
) -> Result<Zeroizing<Vec<u8>>> {
    let ad = super::wrap_ad(&b.key.key_id, b.key.key_version, ctx);
    let bk = AeadKey::new(&Key32::from_bytes(*material))
        .open(&ad, &b.key.sealed)
        .map_err(|_| bad("the blob key does not unwrap"))?;
    let bk = Key32::from_slice(&Zeroizing::new(bk)).ok_or_else(|| bad("blob key length"))?;
    b.open_with(&bk)
}

/// Build a blob from raw material and explicit nonces (test vectors only).
#[allow(clippy::too_many_arguments)]
pub fn seal_with_material(
    key_id: &str,
    version: u32,
    material: &[u8; 32],
    ctx: &EncryptionContext,
    blob_key: &[u8; 32],
    wrap_nonce: &[u8; 12],
    payload_nonce: &[u8; 12],
    plaintext: &[u8],
) -> Blob {
    let ad = super::wrap_ad(key_id, version, ctx);
    let sealed =
        AeadKey::new(&Key32::from_bytes(*material)).seal_with_nonce(wrap_nonce, &ad, blob_key);
    let w = WrappedKey {
        key_id: key_id.to_string(),
        key_version: version,
        sealed,
    };
    Blob::seal_with_nonce(w, &Key32::from_bytes(*blob_key), payload_nonce, plaintext)
}

/// Write the committed test vectors (run by hand:
/// `cargo test --lib kms::blob::tests::print_vectors -- --ignored --nocapture`).
#[cfg(test)]
mod tests {
    #[test]
    #[ignore]
    fn print_vectors() {
        let mut out = Vec::new();
        for (i, (id, ver, ctx, plain)) in [
            (
                "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718",
                1u32,
                vec![],
                b"hello, sealfs".to_vec(),
            ),
            (
                "00112233-4455-6677-8899-aabbccddeeff",
                3,
                vec![("app", "billing"), ("tenant", "7")],
                (0u8..32).collect(),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let ctx: EncryptionContext = ctx
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let m = [0x40 + i as u8; 32];
            let bk = [0x80 + i as u8; 32];
            let wn = [0x10 + i as u8; 12];
            let pn = [0x20 + i as u8; 12];
            let b = seal_with_material(id, ver, &m, &ctx, &bk, &wn, &pn, &plain);
            out.push(serde_json::json!({
                "key_id": id, "key_version": ver, "context": ctx,
                "master_key": hex::encode(m), "blob_key": hex::encode(bk),
                "wrap_nonce": hex::encode(wn), "payload_nonce": hex::encode(pn),
                "plaintext": hex::encode(&plain), "blob": hex::encode(b.to_bytes()),
            }));
        }
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    }
    use super::*;
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    fn sample() -> Blob {
        let bk = Key32::from_bytes([7; 32]);
        let w = WrappedKey {
            key_id: "0123abcd-0000-1111-2222-333344445555".into(),
            key_version: 3,
            sealed: vec![9; WRAPPED_LEN],
        };
        Blob::seal_with_nonce(w, &bk, &[1; 12], b"hello")
    }

    #[test]
    fn roundtrip_and_strict_parse() {
        let b = sample();
        let bytes = b.to_bytes();
        assert_eq!(Blob::parse(&bytes).unwrap(), b);
        let plain = b.open_with(&Key32::from_bytes([7; 32])).unwrap();
        assert_eq!(&plain[..], b"hello");
        // every truncation is an error, never a panic
        for n in 0..bytes.len() {
            if let Ok(p) = Blob::parse(&bytes[..n]) {
                assert!(p.open_with(&Key32::from_bytes([7; 32])).is_err());
            }
        }
        // a flipped bit anywhere fails to parse or to authenticate
        for i in 0..bytes.len() {
            let mut c = bytes.clone();
            c[i] ^= 1;
            if let Ok(p) = Blob::parse(&c) {
                assert!(
                    p.open_with(&Key32::from_bytes([7; 32])).is_err(),
                    "bit flip at {i} went unnoticed"
                );
            }
        }
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(Blob::parse(&v2)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
    }
}
