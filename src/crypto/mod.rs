//! Cryptographic primitives: AEAD (AES-256-GCM-SIV), HKDF-SHA256 sub-keys,
//! HMAC, random identifiers and key types that wipe themselves on drop.
//!
//! Everything here is deliberately small and boring; the rest of sealfs only
//! talks to these functions, never to the RustCrypto crates directly.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of an AEAD nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext (nonce + tag).
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The AEAD refused to open a message: it was modified, truncated, sealed
/// under another key or bound to other associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed (wrong key, or the data was modified)")]
pub struct AuthError;

/// A 256-bit secret key. Wiped on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key32([u8; 32]);

impl Key32 {
    /// Wrap raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Key32(bytes)
    }

    /// Copy key bytes from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Key32(arr))
    }

    /// A fresh random key from the OS CSPRNG.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Key32(k)
    }

    /// The raw bytes; callers must not copy them into long-lived storage.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Key32) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Derive a purpose-specific sub-key with HKDF-SHA256 (no salt, `label` as info).
    pub fn derive(&self, label: &[u8]) -> Key32 {
        hkdf_sha256(None, &self.0, label)
    }
}

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

/// HKDF-SHA256 (RFC 5869) with a 32-byte output: one HMAC for the
/// extract step, one for the single expand block. Written out instead of
/// using `hkdf::Hkdf`, whose pseudorandom key lives in a struct that is
/// not wiped: here the PRK and the output block are wiped before return.
/// (The SHA-256 states inside `Hmac` are not wiped by the hash crates.)
pub fn hkdf_sha256(salt: Option<&[u8]>, ikm: &[u8], info: &[u8]) -> Key32 {
    // RFC 5869 2.2: a missing salt is HashLen zero bytes
    let zero = [0u8; 32];
    let mut ext = <Hmac<Sha256> as Mac>::new_from_slice(salt.unwrap_or(&zero))
        .expect("HMAC accepts any key length");
    ext.update(ikm);
    let mut prk: [u8; 32] = ext.finalize().into_bytes().into();
    let mut exp = <Hmac<Sha256> as Mac>::new_from_slice(&prk).expect("HMAC accepts any key length");
    prk.zeroize();
    exp.update(info);
    exp.update(&[1u8]);
    let mut t1: [u8; 32] = exp.finalize().into_bytes().into();
    let k = Key32(t1);
    t1.zeroize();
    k
}

/// Lock all of this process's memory in RAM, present and future pages as
/// they are touched (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`),
/// so that keys (and everything else a mount daemon holds, such as cached
/// plaintext) are never written to swap. Only attempted when it cannot
/// make later allocations fail: with CAP_IPC_LOCK (root) or an unlimited
/// locked-memory limit. Returns why it was not done otherwise.
pub fn lock_process_memory() -> Result<(), String> {
    use rustix::mm::{mlockall, MlockAllFlags};
    use rustix::process::{getrlimit, Resource};
    let cap = rustix::thread::capabilities(None)
        .map(|c| {
            c.effective
                .contains(rustix::thread::CapabilitySet::IPC_LOCK)
        })
        .unwrap_or(false);
    let limit = getrlimit(Resource::Memlock).current;
    if !cap && limit.is_some() {
        return Err(format!(
            "not permitted: no CAP_IPC_LOCK and a locked-memory limit of {} KiB (locking everything could make allocations fail); mount as root or set `ulimit -l unlimited`",
            limit.unwrap_or(0) / 1024
        ));
    }
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| format!("mlockall: {e}"))
}

/// An AEAD key ready for use (the expanded AES key schedule is kept so
/// per-chunk work does not re-expand it).
pub struct AeadKey {
    cipher: Aes256GcmSiv,
}

impl AeadKey {
    /// Build the cipher for `key`.
    pub fn new(key: &Key32) -> Self {
        AeadKey {
            cipher: Aes256GcmSiv::new(key.as_bytes().into()),
        }
    }

    /// Seal `plaintext` with a fresh random nonce. Output: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, ad, plaintext)
    }

    /// Seal with a caller-chosen nonce (used for known-answer tests only).
    pub fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let n = Nonce::try_from(&nonce[..]).expect("12-byte nonce");
        let ct = self
            .cipher
            .encrypt(
                &n,
                Payload {
                    msg: plaintext,
                    aad: ad,
                },
            )
            .expect("AES-GCM-SIV encryption cannot fail for in-range lengths");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open `nonce ‖ ciphertext ‖ tag`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let n = Nonce::try_from(nonce).map_err(|_| AuthError)?;
        self.cipher
            .decrypt(&n, Payload { msg: ct, aad: ad })
            .map_err(|_| AuthError)
    }
}

/// The tag (last 16 bytes) of a sealed message.
pub fn tag_of(sealed: &[u8]) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    if sealed.len() >= TAG_LEN {
        t.copy_from_slice(&sealed[sealed.len() - TAG_LEN..]);
    }
    t
}

/// HMAC-SHA256 of `data` under `key`.
pub fn hmac(key: &Key32, data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Verify an HMAC-SHA256 in constant time.
pub fn hmac_verify(key: &Key32, data: &[u8], tag: &[u8]) -> bool {
    let expect = hmac(key, data);
    expect.ct_eq(tag).into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(data).into()
}

/// `n` random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// Constant-time byte-slice equality.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hkdf::Hkdf;

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let k = AeadKey::new(&Key32::random());
        let s = k.seal(b"ad", b"hello");
        assert_eq!(s.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(k.open(b"ad", &s).unwrap(), b"hello");
        assert_eq!(k.open(b"other", &s), Err(AuthError));
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(b"ad", &t), Err(AuthError), "flip at {i}");
        }
        assert_eq!(k.open(b"ad", &s[..s.len() - 1]), Err(AuthError));
        assert_eq!(k.open(b"ad", &[]), Err(AuthError));
    }

    #[test]
    fn wrong_key_fails() {
        let a = AeadKey::new(&Key32::random());
        let b = AeadKey::new(&Key32::random());
        assert!(b.open(b"", &a.seal(b"", b"x")).is_err());
    }

    #[test]
    fn fresh_nonces() {
        let k = AeadKey::new(&Key32::random());
        assert_ne!(k.seal(b"", b"same"), k.seal(b"", b"same"));
    }

    /// RFC 8452 Appendix C.2, AEAD_AES_256_GCM_SIV, first vector with
    /// empty plaintext and AD.
    #[test]
    fn aes_gcm_siv_known_answer() {
        let mut key = [0u8; 32];
        key[0] = 1;
        let mut nonce = [0u8; 12];
        nonce[0] = 3;
        let k = AeadKey::new(&Key32::from_bytes(key));
        let out = k.seal_with_nonce(&nonce, b"", b"");
        assert_eq!(
            hex::encode(&out[NONCE_LEN..]),
            "07f5f4169bbf55a8400cd47ea6fd400f"
        );
        // RFC 8452 C.2: plaintext 0100000000000000
        let pt = hex::decode("0100000000000000").unwrap();
        let out = k.seal_with_nonce(&nonce, b"", &pt);
        assert_eq!(
            hex::encode(&out[NONCE_LEN..]),
            "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28"
        );
    }

    /// RFC 5869 test case 1 uses a salt; with no salt we check test case 3.
    #[test]
    fn hkdf_known_answer_rfc5869_case3() {
        let ikm = [0x0bu8; 22];
        let hk = Hkdf::<Sha256>::new(None, &ikm);
        let mut okm = [0u8; 42];
        hk.expand(b"", &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn hkdf_matches_the_hkdf_crate() {
        // RFC 5869 A.3 (no salt, no info), first 32 bytes
        let k = hkdf_sha256(None, &[0x0bu8; 22], b"");
        assert_eq!(
            hex::encode(k.as_bytes()),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
        );
        for i in 0..50u8 {
            let ikm: [u8; 32] = random_bytes();
            let salt = [i; 16];
            let info = vec![i; i as usize];
            for salt in [None, Some(&salt[..])] {
                let hk = Hkdf::<Sha256>::new(salt, &ikm);
                let mut want = [0u8; 32];
                hk.expand(&info, &mut want).unwrap();
                assert_eq!(hkdf_sha256(salt, &ikm, &info).as_bytes(), &want);
            }
        }
    }

    #[test]
    fn derive_is_label_separated() {
        let k = Key32::random();
        assert!(!k.derive(b"a").ct_eq(&k.derive(b"b")));
        assert!(k.derive(b"a").ct_eq(&k.derive(b"a")));
    }

    #[test]
    fn hmac_verify_works() {
        let k = Key32::random();
        let t = hmac(&k, b"data");
        assert!(hmac_verify(&k, b"data", &t));
        assert!(!hmac_verify(&k, b"datb", &t));
        assert!(!hmac_verify(&k, b"data", &t[..31]));
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(format!("{:?}", Key32::random()), "Key32(<redacted>)");
    }
}
