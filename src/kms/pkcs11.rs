//! Custom key stores in a PKCS#11 token (SoftHSM2, a CloudHSM client, a
//! smart card): the master key material is generated in the token and never
//! leaves it; the token encrypts and decrypts volume data keys with
//! CKM_AES_GCM, the wrap's associated data (key id, version, encryption
//! context; see `wrap_ad`) as AAD.
//!
//! The module is loaded at run time through `cryptoki`. Each operation opens
//! a session, logs in with the PIN read from the key store's PIN file (mode
//! 0600 enforced, re-read every time so a changed PIN shows at once), and
//! closes it. The PIN never appears in an error or a log line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Size of the GCM nonce sealfs asks the token to use.
pub const GCM_IV_LEN: usize = 12;

/// A custom key store: a token reached through a PKCS#11 module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStore {
    pub name: String,
    pub module: PathBuf,
    pub token_label: String,
    pub pin_file: PathBuf,
    /// Connection state set by `key-store connect|disconnect`.
    pub connected: bool,
    pub created: u64,
}

/// A key version's object in a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmObject {
    pub key_id: String,
    pub version: u32,
    pub store: String,
    /// CKA_LABEL of the token object.
    pub label: String,
    /// CKA_ID of the token object (random, 16 bytes).
    pub id: Vec<u8>,
    /// Destroyed in the token (C_DestroyObject) when the key was deleted.
    pub destroyed: bool,
}

/// Held for the whole of every PKCS#11 operation: sessions never outlive
/// it, so a context dropped from the map (to re-initialise the module and
/// see a token that came back) is finalised with nothing in flight.
fn op_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forget the module's context (finalised once its last user is gone):
/// the next operation initialises it again and rescans its slots.
fn reset(module: &Path) {
    contexts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(module);
}

/// Process-wide PKCS#11 contexts, one per module: a module may be
/// initialised only once per process. Operations are serialised.
fn contexts() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static C: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

fn context(module: &Path) -> Result<Pkcs11, String> {
    let mut map = contexts().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    if !module.is_file() {
        return Err(format!(
            "PKCS#11 module {} does not exist (for SoftHSM2: /usr/lib/softhsm/libsofthsm2.so, package softhsm2)",
            module.display()
        ));
    }
    let c = Pkcs11::new(module)
        .map_err(|e| format!("cannot load PKCS#11 module {}: {e}", module.display()))?;
    match c.initialize(CInitializeArgs::OsThreads) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "PKCS#11 module {} failed to initialise ({e}); for SoftHSM2, check that its token directory exists",
                module.display()
            ))
        }
    }
    map.insert(module.to_path_buf(), c.clone());
    Ok(c)
}

/// Read a PIN file: a regular file that neither group nor others can
/// access, one line.
pub fn read_pin(path: &Path) -> Result<AuthPin, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("cannot read the PIN file {} ({e})", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot read the PIN file {} ({e})", path.display()))?;
    if !md.is_file() {
        return Err(format!(
            "the PIN file {} is not a regular file",
            path.display()
        ));
    }
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "the PIN file {} is accessible by group or others (mode {:04o}); fix it with `chmod 600 {}`",
            path.display(),
            md.mode() & 0o7777,
            path.display()
        ));
    }
    let mut data = Zeroizing::new(Vec::with_capacity(256));
    (&mut f)
        .take(256)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read the PIN file {} ({e})", path.display()))?;
    let mut n = data.len();
    while n > 0 && (data[n - 1] == b'\n' || data[n - 1] == b'\r') {
        n -= 1;
    }
    if n == 0 {
        return Err(format!("the PIN file {} is empty", path.display()));
    }
    let s = std::str::from_utf8(&data[..n])
        .map_err(|_| format!("the PIN file {} is not UTF-8 text", path.display()))?;
    Ok(AuthPin::new(s.to_string()))
}

fn ck(what: &str, store: &KeyStore, e: CkError) -> String {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => format!(
            "wrong PIN for token '{}' (PIN file {})",
            store.token_label,
            store.pin_file.display()
        ),
        CkError::Pkcs11(RvError::PinLocked, _) => {
            format!("the user PIN of token '{}' is locked", store.token_label)
        }
        CkError::Pkcs11(
            RvError::TokenNotPresent | RvError::DeviceRemoved | RvError::SessionHandleInvalid,
            _,
        ) => format!("token '{}' is not present", store.token_label),
        e => format!("{what} in token '{}' failed: {e}", store.token_label),
    }
}

/// A logged-in session on the key store's token (call with [`op_lock`]
/// held). On failure the module is re-initialised at the next use, so that
/// a token that was removed and came back is found again.
fn open(store: &KeyStore) -> Result<Session, String> {
    let r = open_inner(store);
    if r.is_err() {
        reset(&store.module);
    }
    r
}

fn open_inner(store: &KeyStore) -> Result<Session, String> {
    let c = context(&store.module)?;
    let slots = c
        .get_slots_with_token()
        .map_err(|e| ck("listing slots", store, e))?;
    let mut found = None;
    for s in slots {
        if let Ok(info) = c.get_token_info(s) {
            if info.label().trim_end() == store.token_label {
                found = Some(s);
                break;
            }
        }
    }
    let slot = found.ok_or_else(|| {
        format!(
            "no token labelled '{}' in PKCS#11 module {} (token missing or not initialised)",
            store.token_label,
            store.module.display()
        )
    })?;
    let pin = read_pin(&store.pin_file)?;
    let session = c
        .open_rw_session(slot)
        .map_err(|e| ck("opening a session", store, e))?;
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(ck("login", store, e)),
    }
}

/// Check that the token can be opened and logged into now. The module is
/// initialised afresh first: SoftHSM2 reads its tokens (and their PINs) at
/// C_Initialize, so only a fresh context sees a token removed, returned or
/// re-PINned by another process.
pub fn probe(store: &KeyStore) -> Result<(), String> {
    let _l = op_lock();
    reset(&store.module);
    open(store).map(|_| ())
}

/// [`probe`], but a result at most one second old is reused (mount daemons
/// poll their key's state every second).
pub fn probe_cached(store: &KeyStore) -> Result<(), String> {
    type Cache = Mutex<HashMap<String, (Instant, KeyStore, Result<(), String>)>>;
    static C: OnceLock<Cache> = OnceLock::new();
    let cache = C.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some((t, s, r)) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&store.name)
    {
        if t.elapsed() < Duration::from_millis(900) && s == store {
            return r.clone();
        }
    }
    let r = probe(store);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
        store.name.clone(),
        (Instant::now(), store.clone(), r.clone()),
    );
    r
}

fn find(session: &Session, store: &KeyStore, obj: &HsmObject) -> Result<ObjectHandle, String> {
    let h = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(obj.id.clone()),
        ])
        .map_err(|e| ck("finding the key object", store, e))?;
    h.first().copied().ok_or_else(|| {
        format!(
            "token object '{}' is missing from token '{}'",
            obj.label, store.token_label
        )
    })
}

/// Generate a sensitive, non-extractable AES-256 token object; returns its
/// CKA_ID.
pub fn generate(store: &KeyStore, label: &str) -> Result<Vec<u8>, String> {
    let _l = op_lock();
    let session = open(store)?;
    let id: [u8; 16] = crate::crypto::random_bytes();
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::from(32)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| ck("generating an AES-256 key", store, e))?;
    Ok(id.to_vec())
}

/// Encrypt `plain` in the token with AES-GCM, `aad` bound:
/// returns `iv ‖ ciphertext ‖ tag`.
pub fn seal(
    store: &KeyStore,
    obj: &HsmObject,
    aad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, String> {
    let _l = op_lock();
    let session = open(store)?;
    let key = find(&session, store, obj)?;
    let mut iv: [u8; GCM_IV_LEN] = crate::crypto::random_bytes();
    let iv_copy = iv;
    let params = GcmParams::new(&mut iv, aad, Ulong::from(128))
        .map_err(|e| format!("AES-GCM parameters: {e}"))?;
    let ct = session
        .encrypt(&Mechanism::AesGcm(params), key, plain)
        .map_err(|e| ck("AES-GCM encryption", store, e))?;
    let mut out = iv_copy.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypt what [`seal`] made. `Ok(None)`: the token refused it (tag
/// mismatch: modified, or another context).
pub fn open_sealed(
    store: &KeyStore,
    obj: &HsmObject,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    if sealed.len() < GCM_IV_LEN + 16 {
        return Ok(None);
    }
    let _l = op_lock();
    let session = open(store)?;
    let key = find(&session, store, obj)?;
    let mut iv = [0u8; GCM_IV_LEN];
    iv.copy_from_slice(&sealed[..GCM_IV_LEN]);
    let params = GcmParams::new(&mut iv, aad, Ulong::from(128))
        .map_err(|e| format!("AES-GCM parameters: {e}"))?;
    match session.decrypt(&Mechanism::AesGcm(params), key, &sealed[GCM_IV_LEN..]) {
        Ok(p) => Ok(Some(Zeroizing::new(p))),
        // The session is open, logged in and the key found: a refusal of
        // the data is a tag mismatch. SoftHSM2 reports that as
        // CKR_GENERAL_ERROR, the standard says CKR_ENCRYPTED_DATA_INVALID.
        Err(CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError
            | RvError::FunctionFailed,
            _,
        )) => Ok(None),
        Err(e) => Err(ck("AES-GCM decryption", store, e)),
    }
}

/// Destroy a token object (C_DestroyObject). An object already gone is
/// not an error.
pub fn destroy(store: &KeyStore, obj: &HsmObject) -> Result<(), String> {
    let _l = op_lock();
    let session = open(store)?;
    match find(&session, store, obj) {
        Ok(h) => session
            .destroy_object(h)
            .map_err(|e| ck("destroying the key object", store, e)),
        Err(_) => Ok(()),
    }
}
