//! The local key-management service ("keystore").
//!
//! A single AEAD-sealed file holds every master key and its versions. It is
//! unlocked by a passphrase (Argon2id) or a 32-byte key file. Master keys wrap
//! per-volume data keys (envelope encryption) with an *encryption context*
//! bound as associated data, like AWS KMS.
//!
//! File layout (see docs/FORMAT.md, "Keystore file"):
//! `magic(8) ‖ version(u16) ‖ kdf(u8) ‖ salt(16) ‖ m_cost(u32) ‖ t_cost(u32) ‖ p_cost(u32) ‖ sealed body`

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{self, AeadKey, Key32};

pub mod audit;
pub mod blob;
pub mod keystore_store;
pub mod pkcs11;
pub mod seen;

/// Magic bytes at the start of a keystore file.
pub const KEYSTORE_MAGIC: &[u8; 8] = b"SEALFSKS";
/// Current keystore file format version.
pub const KEYSTORE_FORMAT_VERSION: u16 = 4;
/// Length of the fixed keystore header (before the sealed body).
pub const KEYSTORE_HEADER_LEN: usize = 8 + 2 + 1 + 16 + 12;

/// Alias of the service key that seals volume metadata.
pub const SERVICE_KEY_ALIAS: &str = "alias/sealfs/service";
/// Alias of the service-managed default content key.
pub const DEFAULT_CONTENT_KEY_ALIAS: &str = "alias/sealfs/default";

const KDF_ARGON2ID: u8 = 1;
const KDF_KEYFILE: u8 = 2;

/// Argon2id parameters used for new passphrase-protected keystores.
pub const ARGON2_M_COST_KIB: u32 = 64 * 1024;
/// Argon2id iterations.
pub const ARGON2_T_COST: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_P_COST: u32 = 1;

/// Errors from the keystore. Messages say what happened and what to do, and
/// never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error(
        "keystore {0} does not exist; create it with `sealfs init` (or any `sealfs key create`)"
    )]
    NotFound(PathBuf),
    #[error("keystore {0} already exists")]
    AlreadyExists(PathBuf),
    #[error("cannot unlock keystore {0}: wrong passphrase or key file")]
    WrongSecret(PathBuf),
    #[error("keystore {path} is not a sealfs keystore or is damaged: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("keystore {path} has format version {found}, this sealfs supports version {supported}; upgrade sealfs")]
    UnsupportedVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("keystore {path} is protected by a {needs}, but a {given} was given; pass {flag}")]
    SecretKindMismatch {
        path: PathBuf,
        needs: &'static str,
        given: &'static str,
        flag: &'static str,
    },
    #[error("no key matches '{0}'; list keys with `sealfs key list`")]
    UnknownKey(String),
    #[error("'{name}' is ambiguous: it is the id of key {id_match} and an alias of key {alias_match}; use the full id or alias/NAME")]
    Ambiguous {
        name: String,
        id_match: String,
        alias_match: String,
    },
    #[error("key {id} was deleted on {}: its material is destroyed, and what it protected is permanently unreadable (crypto-shredded)", fmt_date(*when))]
    KeyDeleted { id: String, when: u64 },
    #[error("key material {path}: {why}")]
    BadMaterial { path: PathBuf, why: String },
    #[error("cannot write the audit log: {0}; the operation was not performed")]
    Audit(#[from] audit::AuditError),
    #[error("alias '{0}' is already in use; choose another name")]
    AliasInUse(String),
    #[error("invalid alias '{0}': use 1-250 characters from A-Z a-z 0-9 / _ - (the name must not start with 'sealfs/', which is reserved)")]
    BadAlias(String),
    #[error("key {id} is {state}: {hint}")]
    KeyNotUsable {
        id: String,
        state: KeyState,
        hint: String,
    },
    #[error("key {id} has no version {version}; the wrapped key was made by another keystore")]
    NoSuchVersion { id: String, version: u32 },
    #[error("the material of key {id} version {version} was deleted; import it again with `sealfs key import {id} --material FILE`")]
    MaterialDeleted { id: String, version: u32 },
    #[error("cannot unwrap the {purpose} key with key {id} v{version}: the wrapped key or its encryption context was modified, or it belongs to another keystore")]
    UnwrapFailed {
        id: String,
        version: u32,
        purpose: String,
    },
    #[error("key file {path}: {why}")]
    BadKeyFile { path: PathBuf, why: String },
    #[error("{0}")]
    Refused(String),
    #[error("{CLOCK_ENV}={given} ({}) is earlier than the clock of keystore {path}, which has reached {last} ({}): the keystore clock only moves forward, so that a deletion waiting period cannot be shortened nor an audit entry backdated; unset {CLOCK_ENV} or set it to {last} or later", fmt_date(*given), fmt_date(*last), path = path.display())]
    ClockBackwards {
        path: PathBuf,
        given: u64,
        last: u64,
    },
    #[error("keystore {path} is revision {found}, but this machine has already seen revision {seen}: it was replaced by an older copy (for example KEYSTORE.bak copied over it), which could undo a disable, a deletion or a rotation; refused. To go back to the backup use `sealfs key restore-backup`; if you really want this older copy, accept it with `sealfs key accept-keystore` (audited)", path = path.display())]
    Rollback {
        path: PathBuf,
        found: u64,
        seen: u64,
    },
    #[error("{0}")]
    State(String),
    // --- KMS API / ciphertext blobs (issue 14) ---
    #[error("the ciphertext is not valid: {0}")]
    InvalidCiphertext(String),
    #[error("the ciphertext was made with key {blob_key}, not with the given key {given}")]
    IncorrectKey { blob_key: String, given: String },
    #[error("key {id} is Unavailable: its key store {store} {reason}")]
    Unavailable {
        id: String,
        store: String,
        reason: String,
    },
    #[error("no key store '{0}'; list key stores with `sealfs key-store list`")]
    UnknownKeyStore(String),
    #[error("keystore {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, KmsError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KmsError + '_ {
    move |source| KmsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the keystore is unlocked.
pub enum KeystoreSecret {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
    /// A 32-byte key file, for unattended mounts.
    KeyFile(Key32),
}

impl KeystoreSecret {
    /// Read a key file: exactly 32 raw bytes, readable only by its owner.
    pub fn from_key_file(path: &Path) -> Result<Self> {
        let data = read_private(path, "key file", 64).map_err(|why| KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why,
        })?;
        Key32::from_slice(&data)
            .map(KeystoreSecret::KeyFile)
            .ok_or_else(|| KmsError::BadKeyFile {
                path: path.to_path_buf(),
                why: format!(
                    "must hold exactly 32 raw bytes, found {}{}; make a new one with `sealfs init --key-file PATH --generate-key-file` (or `sealfs key change-passphrase --new-key-file PATH --generate`)",
                    data.len(),
                    if data.len() >= 64 { " or more" } else { "" }
                ),
            })
    }

    /// Read a passphrase from a file (first line, without the newline);
    /// the file must be readable only by its owner.
    pub fn from_passphrase_file(path: &Path) -> Result<Self> {
        let bad = |why: String| KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why,
        };
        let data = read_private(path, "passphrase file", 64 * 1024).map_err(bad)?;
        let text = std::str::from_utf8(&data)
            .map_err(|_| bad("passphrase file is not UTF-8 text".into()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(bad("passphrase file is empty".into()));
        }
        Ok(KeystoreSecret::Passphrase(Zeroizing::new(line.to_string())))
    }

    fn kind_name(&self) -> &'static str {
        match self {
            KeystoreSecret::Passphrase(_) => "passphrase",
            KeystoreSecret::KeyFile(_) => "key file",
        }
    }
}

/// Read a secret-bearing file through one handle: it must be a regular
/// file that neither group nor others can access (as ssh insists for
/// private keys), of at most `max` bytes. Errors are sentences that say
/// how to fix it.
fn read_private(
    path: &Path,
    what: &str,
    max: u64,
) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read the {what} ({e}); check the path given"))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot read the {what} ({e})"))?;
    if !md.is_file() {
        return Err(format!("the {what} is not a regular file"));
    }
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "the {what} is accessible by group or others (mode {:04o}): it unlocks the keystore, so sealfs refuses to use it; fix it with `chmod 600 {}`",
            md.mode() & 0o7777,
            path.display()
        ));
    }
    let mut data = Zeroizing::new(Vec::with_capacity(max as usize + 1));
    f.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read the {what} ({e})"))?;
    Ok(data)
}

/// Write a new random key file (mode 0600). Refuses to overwrite.
pub fn generate_key_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why: format!("cannot create it ({e})"),
        })?;
    let k = Key32::random();
    f.write_all(k.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Lifecycle state of a master key (as in AWS KMS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    /// Usable for wrapping and unwrapping.
    Enabled,
    /// Refuses every use until enabled again.
    Disabled,
    /// External key without (all of) its material: import it.
    PendingImport,
    /// Scheduled for deletion; refuses every use; can be cancelled.
    PendingDeletion,
    /// Deleted: its material is destroyed. Kept as a record so that volumes
    /// it protected can say why their content is gone.
    Deleted,
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Where the key material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOrigin {
    /// Generated by sealfs.
    Generated,
    /// Imported by the user (bring your own key).
    External,
    /// Generated inside a PKCS#11 token (custom key store); the material
    /// never leaves the token.
    Hsm,
}

/// Who manages the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyManager {
    /// Created and controlled by the user.
    Customer,
    /// Managed by sealfs itself (service key, default content key).
    Service,
}

/// One version of a master key's material.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyVersion {
    #[zeroize(skip)]
    pub version: u32,
    #[zeroize(skip)]
    pub created: u64,
    /// None once deleted (imported material deleted, or key destroyed).
    material: Option<[u8; 32]>,
    /// SHA-256 over a label, the key id and the material: lets an import
    /// check "same material" after the material itself was deleted.
    #[zeroize(skip)]
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyVersion(v{}, created {}, material {})",
            self.version,
            self.created,
            if self.material.is_some() {
                "present"
            } else {
                "deleted"
            }
        )
    }
}

impl KeyVersion {
    fn new(key_id: &str, version: u32, created: u64, material: [u8; 32]) -> KeyVersion {
        KeyVersion {
            version,
            created,
            fingerprint: fingerprint(key_id, &material),
            material: Some(material),
        }
    }

    /// A version whose material lives in a token: the keystore keeps only
    /// a fingerprint of the token object's identity.
    fn in_token(version: u32, created: u64, fingerprint: [u8; 32]) -> KeyVersion {
        KeyVersion {
            version,
            created,
            material: None,
            fingerprint,
        }
    }

    /// Whether this version's material is present.
    pub fn has_material(&self) -> bool {
        self.material.is_some()
    }
}

fn fingerprint(key_id: &str, material: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"sealfs-key-fingerprint-v1\0");
    h.update(key_id.as_bytes());
    h.update([0]);
    h.update(material);
    h.finalize().into()
}

/// A master key with all of its versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterKey {
    pub id: String,
    pub aliases: Vec<String>,
    pub description: String,
    pub state: KeyState,
    pub origin: KeyOrigin,
    pub manager: KeyManager,
    pub created: u64,
    pub versions: Vec<KeyVersion>,
    /// Automatic rotation period in days (generated keys only).
    pub rotation_days: Option<u32>,
    /// When a PendingDeletion key will be destroyed.
    pub deletion_date: Option<u64>,
    /// When the key was destroyed (state Deleted).
    pub deleted: Option<u64>,
}

impl MasterKey {
    /// Newest version number.
    pub fn current_version(&self) -> u32 {
        self.versions.last().map(|v| v.version).unwrap_or(0)
    }

    /// The aliases, or the aliases the key had before it was deleted.
    pub fn label(&self) -> String {
        if self.aliases.is_empty() {
            self.id.clone()
        } else {
            format!("{} ({})", self.id, self.aliases.join(","))
        }
    }

    /// Why the key cannot be used, as the error a user sees.
    fn unusable(&self) -> KmsError {
        match self.state {
            KeyState::Deleted => KmsError::KeyDeleted {
                id: self.id.clone(),
                when: self.deleted.unwrap_or(0),
            },
            state => KmsError::KeyNotUsable {
                id: self.id.clone(),
                state,
                hint: state_hint(self),
            },
        }
    }

    /// When the newest version was made (the rotation clock).
    fn last_rotated(&self) -> u64 {
        self.versions
            .last()
            .map(|v| v.created)
            .unwrap_or(self.created)
    }
}

fn state_hint(k: &MasterKey) -> String {
    match k.state {
        KeyState::Disabled => format!("enable it with `sealfs key enable {}`", k.id),
        KeyState::PendingImport => format!(
            "import its material with `sealfs key import {} --material FILE`",
            k.id
        ),
        KeyState::PendingDeletion => format!(
            "it will be destroyed on {}; `sealfs key cancel-deletion {}` stops that",
            fmt_date(k.deletion_date.unwrap_or(0)),
            k.id
        ),
        KeyState::Deleted => "its material is destroyed".into(),
        KeyState::Enabled => "it is usable".into(),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
pub fn fmt_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The decrypted body of the keystore (format version 4).
#[derive(Clone, Serialize, Deserialize)]
pub struct KeystoreBody {
    /// Incremented on every change.
    pub revision: u64,
    pub keys: Vec<MasterKey>,
    /// MAC key of the audit log chain (see [`audit`]).
    audit_key: [u8; 32],
    /// The newest audit entry (seq, mac) when the keystore was last saved.
    audit_head: Option<(u64, [u8; 32])>,
    /// The keystore clock's high-water mark: the latest time (seconds since
    /// the epoch) this keystore has used. The clock never goes below it.
    clock: u64,
    /// The audit log has a head file (`<keystore>.audit-head`): every
    /// append since `audit_head` was recorded wrote it, so its absence is
    /// tampering, not an old log.
    audit_head_file: bool,
    /// Custom key stores (PKCS#11 tokens). Format 4.
    pub key_stores: Vec<pkcs11::KeyStore>,
    /// Token objects of the versions of HSM keys. Format 4.
    pub hsm_objects: Vec<pkcs11::HsmObject>,
}

impl std::fmt::Debug for KeystoreBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeystoreBody")
            .field("revision", &self.revision)
            .field("keys", &self.keys)
            .field("audit_key", &"[redacted]")
            .field("audit_head", &self.audit_head.map(|h| h.0))
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for KeystoreBody {
    fn default() -> Self {
        KeystoreBody {
            revision: 0,
            keys: Vec::new(),
            audit_key: *Key32::random().as_bytes(),
            audit_head: None,
            clock: 0,
            audit_head_file: false,
            key_stores: Vec::new(),
            hsm_objects: Vec::new(),
        }
    }
}

impl Drop for KeystoreBody {
    fn drop(&mut self) {
        self.audit_key.zeroize();
    }
}

/// Keystore format version 2 (before the clock and the head-file flag):
/// read and converted on open, never written.
mod v2 {
    use serde::Deserialize;
    use zeroize::Zeroize;

    #[derive(Deserialize)]
    pub struct KeystoreBody {
        pub revision: u64,
        pub keys: Vec<super::MasterKey>,
        pub audit_key: [u8; 32],
        pub audit_head: Option<(u64, [u8; 32])>,
    }

    impl Drop for KeystoreBody {
        fn drop(&mut self) {
            self.audit_key.zeroize();
        }
    }
}

fn upgrade_v2(mut old: v2::KeystoreBody) -> KeystoreBody {
    // the clock starts at the latest time the keystore recorded
    let clock = old
        .keys
        .iter()
        .flat_map(|k| {
            [k.created, k.deleted.unwrap_or(0)]
                .into_iter()
                .chain(k.versions.iter().map(|v| v.created))
        })
        .max()
        .unwrap_or(0);
    KeystoreBody {
        revision: old.revision,
        keys: std::mem::take(&mut old.keys),
        audit_key: old.audit_key,
        audit_head: old.audit_head,
        clock,
        audit_head_file: false,
        key_stores: Vec::new(),
        hsm_objects: Vec::new(),
    }
}

/// Keystore format version 3 (before custom key stores): read and
/// converted on open, never written.
mod v3 {
    use serde::Deserialize;
    use zeroize::Zeroize;

    #[derive(Deserialize)]
    pub struct KeystoreBody {
        pub revision: u64,
        pub keys: Vec<super::MasterKey>,
        pub audit_key: [u8; 32],
        pub audit_head: Option<(u64, [u8; 32])>,
        pub clock: u64,
        pub audit_head_file: bool,
    }

    impl Drop for KeystoreBody {
        fn drop(&mut self) {
            self.audit_key.zeroize();
        }
    }
}

fn upgrade_v3(mut old: v3::KeystoreBody) -> KeystoreBody {
    KeystoreBody {
        revision: old.revision,
        keys: std::mem::take(&mut old.keys),
        audit_key: old.audit_key,
        audit_head: old.audit_head,
        clock: old.clock,
        audit_head_file: old.audit_head_file,
        key_stores: Vec::new(),
        hsm_objects: Vec::new(),
    }
}

/// Keystore format version 1 (sealfs before key lifecycle): read and
/// converted on open, never written.
mod v1 {
    use serde::{Deserialize, Serialize};
    use zeroize::{Zeroize, ZeroizeOnDrop};

    #[derive(Serialize, Deserialize)]
    pub enum KeyState {
        Enabled,
        Disabled,
        PendingImport,
        PendingDeletion,
    }

    #[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
    pub struct KeyVersion {
        #[zeroize(skip)]
        pub version: u32,
        #[zeroize(skip)]
        pub created: u64,
        pub material: [u8; 32],
    }

    #[derive(Serialize, Deserialize)]
    pub struct MasterKey {
        pub id: String,
        pub aliases: Vec<String>,
        pub description: String,
        pub state: KeyState,
        pub origin: super::KeyOrigin,
        pub manager: super::KeyManager,
        pub created: u64,
        pub versions: Vec<KeyVersion>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct KeystoreBody {
        pub revision: u64,
        pub keys: Vec<MasterKey>,
    }
}

fn upgrade_v1(old: v1::KeystoreBody) -> KeystoreBody {
    let keys = old
        .keys
        .iter()
        .map(|k| MasterKey {
            id: k.id.clone(),
            aliases: k.aliases.clone(),
            description: k.description.clone(),
            state: match k.state {
                v1::KeyState::Enabled => KeyState::Enabled,
                v1::KeyState::Disabled => KeyState::Disabled,
                v1::KeyState::PendingImport => KeyState::PendingImport,
                v1::KeyState::PendingDeletion => KeyState::PendingDeletion,
            },
            origin: k.origin,
            manager: k.manager,
            created: k.created,
            versions: k
                .versions
                .iter()
                .map(|v| KeyVersion::new(&k.id, v.version, v.created, v.material))
                .collect(),
            rotation_days: None,
            deletion_date: None,
            deleted: None,
        })
        .collect();
    let mut body = KeystoreBody::default();
    body.revision = old.revision;
    body.keys = keys;
    body
}

/// A data key wrapped under a master key version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub key_id: String,
    pub key_version: u32,
    /// `nonce ‖ ciphertext ‖ tag` of the 32-byte data key.
    pub sealed: Vec<u8>,
}

/// Encryption context bound into every wrap (as AEAD associated data).
pub type EncryptionContext = BTreeMap<String, String>;

/// Build the context sealfs uses for a volume key.
pub fn volume_context(volume_id: &str, purpose: &str) -> EncryptionContext {
    let mut c = EncryptionContext::new();
    c.insert("purpose".into(), purpose.into());
    c.insert("volume".into(), volume_id.into());
    c
}

fn wrap_ad(key_id: &str, version: u32, ctx: &EncryptionContext) -> Vec<u8> {
    let mut ad = b"sealfs-wrap-v1".to_vec();
    ad.extend(postcard::to_stdvec(&(key_id, version, ctx)).expect("serializable"));
    ad
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_key_id() -> String {
    let b: [u8; 16] = crypto::random_bytes();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Default keystore location: `$SEALFS_KEYSTORE`, else
/// `$XDG_CONFIG_HOME/sealfs/keystore`, else `~/.config/sealfs/keystore`.
pub fn default_keystore_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SEALFS_KEYSTORE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    base.join("sealfs").join("keystore")
}

struct KdfHeader {
    /// Format version read from the file (new files: the current one).
    version: u16,
    kind: u8,
    salt: [u8; 16],
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
}

impl KdfHeader {
    fn new_for(secret: &KeystoreSecret) -> KdfHeader {
        match secret {
            KeystoreSecret::Passphrase(_) => KdfHeader {
                version: KEYSTORE_FORMAT_VERSION,
                kind: KDF_ARGON2ID,
                salt: crypto::random_bytes(),
                m_cost: ARGON2_M_COST_KIB,
                t_cost: ARGON2_T_COST,
                p_cost: ARGON2_P_COST,
            },
            KeystoreSecret::KeyFile(_) => KdfHeader {
                version: KEYSTORE_FORMAT_VERSION,
                kind: KDF_KEYFILE,
                salt: crypto::random_bytes(),
                m_cost: 0,
                t_cost: 0,
                p_cost: 0,
            },
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(KEYSTORE_HEADER_LEN);
        h.extend_from_slice(KEYSTORE_MAGIC);
        h.extend_from_slice(&self.version.to_le_bytes());
        h.push(self.kind);
        h.extend_from_slice(&self.salt);
        h.extend_from_slice(&self.m_cost.to_le_bytes());
        h.extend_from_slice(&self.t_cost.to_le_bytes());
        h.extend_from_slice(&self.p_cost.to_le_bytes());
        h
    }

    fn decode(path: &Path, data: &[u8]) -> Result<Self> {
        let corrupt = |why: &str| KmsError::Corrupt {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        if data.len() < KEYSTORE_HEADER_LEN || &data[..8] != KEYSTORE_MAGIC {
            return Err(corrupt("bad magic or truncated header"));
        }
        let version = u16::from_le_bytes([data[8], data[9]]);
        if !(1..=KEYSTORE_FORMAT_VERSION).contains(&version) {
            return Err(KmsError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: KEYSTORE_FORMAT_VERSION,
            });
        }
        let kind = data[10];
        if kind != KDF_ARGON2ID && kind != KDF_KEYFILE {
            return Err(corrupt("unknown key-derivation kind"));
        }
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&data[11..27]);
        let u = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
        let h = KdfHeader {
            version,
            kind,
            salt,
            m_cost: u(27),
            t_cost: u(31),
            p_cost: u(35),
        };
        if kind == KDF_ARGON2ID
            && (h.m_cost < 8
                || h.m_cost > 4 * 1024 * 1024
                || h.t_cost == 0
                || h.t_cost > 64
                || h.p_cost == 0
                || h.p_cost > 64)
        {
            return Err(corrupt("Argon2id parameters out of range"));
        }
        Ok(h)
    }

    fn derive_kek(&self, path: &Path, secret: &KeystoreSecret) -> Result<Key32> {
        match (self.kind, secret) {
            (KDF_ARGON2ID, KeystoreSecret::Passphrase(p)) => {
                let params = argon2::Params::new(self.m_cost, self.t_cost, self.p_cost, Some(32))
                    .map_err(|e| KmsError::Corrupt {
                    path: path.to_path_buf(),
                    why: format!("Argon2id parameters: {e}"),
                })?;
                let a = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = Zeroizing::new([0u8; 32]);
                a.hash_password_into(p.as_bytes(), &self.salt, &mut out[..])
                    .map_err(|e| KmsError::Corrupt {
                        path: path.to_path_buf(),
                        why: format!("Argon2id: {e}"),
                    })?;
                Ok(Key32::from_bytes(*out))
            }
            (KDF_KEYFILE, KeystoreSecret::KeyFile(k)) => Ok(crypto::hkdf_sha256(
                Some(&self.salt),
                k.as_bytes(),
                b"sealfs keystore kek v1",
            )),
            (KDF_ARGON2ID, s) => Err(KmsError::SecretKindMismatch {
                path: path.to_path_buf(),
                needs: "passphrase",
                given: s.kind_name(),
                flag: "--passphrase-file or type it at the prompt",
            }),
            (_, s) => Err(KmsError::SecretKindMismatch {
                path: path.to_path_buf(),
                needs: "key file",
                given: s.kind_name(),
                flag: "--key-file",
            }),
        }
    }
}

/// An unlocked keystore. Holds the decrypted body in memory; mutations are
/// written back atomically with [`Keystore::save`] and audited.
pub struct Keystore {
    path: PathBuf,
    kdf: KdfHeader,
    kek: Key32,
    body: KeystoreBody,
    _lock: Option<File>,
    caller: audit::Caller,
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystore")
            .field("path", &self.path)
            .finish()
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Path of the previous keystore version kept by every save.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".bak");
    PathBuf::from(p)
}

fn take_lock(path: &Path) -> Result<File> {
    let lp = lock_path(path);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lp)
        .map_err(io_err(&lp))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(&lp)(e.into()))?;
    Ok(f)
}

/// Environment variable that overrides the keystore clock (seconds since
/// the epoch), so that tests can pass deletion waiting periods and
/// rotation periods without waiting days. It only moves time forward for
/// lifecycle decisions of a keystore the caller can already unlock.
pub const CLOCK_ENV: &str = "SEALFS_KMS_NOW";

/// The keystore clock: `$SEALFS_KMS_NOW` if set, else the system clock.
pub fn kms_now() -> u64 {
    std::env::var(CLOCK_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(now_secs)
}

/// Deletion waiting period bounds, in days (as AWS KMS).
pub const PENDING_DAYS_MIN: u32 = 7;
/// Longest waiting period.
pub const PENDING_DAYS_MAX: u32 = 30;
/// Rotation period of the service key, in days.
pub const SERVICE_ROTATION_DAYS: u32 = 365;
/// Default automatic rotation period, in days.
pub const DEFAULT_ROTATION_DAYS: u32 = 365;

/// Read key material from a file: 32 raw bytes or 64 hex characters.
pub fn read_material(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let bad = |why: String| KmsError::BadMaterial {
        path: path.to_path_buf(),
        why,
    };
    let data = Zeroizing::new(fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?);
    let mut out = Zeroizing::new([0u8; 32]);
    if data.len() == 32 {
        out.copy_from_slice(&data);
        return Ok(out);
    }
    let text = std::str::from_utf8(&data).unwrap_or("").trim();
    if text.len() == 64 && hex::decode_to_slice(text, &mut out[..]).is_ok() {
        return Ok(out);
    }
    Err(bad(format!(
        "must hold exactly 32 raw bytes or 64 hex characters, found {} bytes",
        data.len()
    )))
}

/// What the next keystore access has to do by itself (deletions and
/// rotations that have come due).
fn due_work(body: &KeystoreBody, now: u64) -> bool {
    body.keys.iter().any(|k| {
        (k.state == KeyState::PendingDeletion && k.deletion_date.is_some_and(|d| d <= now))
            || rotation_due(k, now)
    })
}

fn rotation_due(k: &MasterKey, now: u64) -> bool {
    k.origin == KeyOrigin::Generated
        && matches!(k.state, KeyState::Enabled | KeyState::Disabled)
        && k.rotation_days
            .is_some_and(|d| now >= k.last_rotated().saturating_add(d as u64 * 86400))
}

/// An audit record in the making.
struct Rec<'a> {
    op: &'a str,
    key: Option<(&'a str, Option<u32>)>,
    ctx: Option<&'a EncryptionContext>,
}

impl Keystore {
    /// Create a new keystore at `path` protected by `secret`, with the
    /// service key and the default content key.
    pub fn create(path: &Path, secret: &KeystoreSecret) -> Result<Keystore> {
        if path.exists() {
            return Err(KmsError::AlreadyExists(path.to_path_buf()));
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
        }
        let lock = take_lock(path)?;
        if path.exists() {
            return Err(KmsError::AlreadyExists(path.to_path_buf()));
        }
        let kdf = KdfHeader::new_for(secret);
        let kek = kdf.derive_kek(path, secret)?;
        // A stale audit log from an earlier keystore at this path cannot
        // be verified with the new audit key: set it aside.
        let alog = audit::log_path(path);
        if alog.exists() {
            let mut old = alog.as_os_str().to_owned();
            old.push(format!(".old-{}", now_secs()));
            fs::rename(&alog, PathBuf::from(old)).map_err(io_err(&alog))?;
        }
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body: KeystoreBody::default(),
            _lock: Some(lock),
            caller: audit::Caller::current(),
        };
        // A keystore made anew where an earlier one was continues above the
        // revisions this machine saw of that one, so that it is not taken
        // for an older copy.
        ks.body.revision = seen::load(path)
            .map_err(KmsError::State)?
            .map_or(0, |s| s.revision);
        ks.ensure_service_keys();
        let ids: Vec<String> = ks.body.keys.iter().map(|k| k.id.clone()).collect();
        for id in &ids {
            ks.record(
                Rec {
                    op: "CreateKey",
                    key: Some((id, Some(1))),
                    ctx: None,
                },
                "ok",
                Some("service-managed key created with the keystore".into()),
            )?;
        }
        ks.save()?;
        Ok(ks)
    }

    /// Open and unlock an existing keystore. With `for_update`, an exclusive
    /// lock is held until the keystore is dropped, so that concurrent
    /// `sealfs key` commands never lose each other's changes. Deletions and
    /// rotations that have come due are carried out first (under the lock),
    /// and a version 1 keystore is upgraded.
    pub fn open(path: &Path, secret: &KeystoreSecret, for_update: bool) -> Result<Keystore> {
        if !path.exists() {
            return Err(KmsError::NotFound(path.to_path_buf()));
        }
        let lock = if for_update {
            Some(take_lock(path)?)
        } else {
            None
        };
        let (kdf, kek, body) = Self::read_file(path, secret)?;
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body,
            _lock: lock,
            caller: audit::Caller::current(),
        };
        check_clock(path, ks.body.clock)?;
        ks.check_rollback()?;
        let now = ks.now();
        let needs_save = ks.kdf.version != KEYSTORE_FORMAT_VERSION || due_work(&ks.body, now);
        if needs_save || (for_update && ks.needs_service_keys()) {
            if ks._lock.is_none() {
                // Re-read under the lock: another process may have done it.
                let lock = take_lock(path)?;
                let (kdf, kek, body) = Self::read_file(path, secret)?;
                ks.kdf = kdf;
                ks.kek = kek;
                ks.body = body;
                ks.check_rollback()?;
                ks.housekeeping(now)?;
                drop(lock);
            } else {
                ks.housekeeping(now)?;
            }
        }
        ks.note_seen()?;
        Ok(ks)
    }

    /// The keystore clock for this keystore: [`kms_now`], but never earlier
    /// than the latest time the keystore has recorded.
    fn now(&self) -> u64 {
        kms_now().max(self.body.clock)
    }

    /// Refuse a keystore older than the newest revision this machine saw.
    fn check_rollback(&self) -> Result<()> {
        match seen::load(&self.path).map_err(KmsError::State)? {
            Some(s) if s.revision > self.body.revision => Err(KmsError::Rollback {
                path: self.path.clone(),
                found: self.body.revision,
                seen: s.revision,
            }),
            _ => Ok(()),
        }
    }

    /// Record this keystore's revision, clock and destroyed keys in the
    /// local state (only ever forward).
    fn note_seen(&self) -> Result<()> {
        let _guard = seen::lock(&self.path).map_err(KmsError::State)?;
        let old = seen::load(&self.path).map_err(KmsError::State)?;
        let mut s = old.clone().unwrap_or_default();
        s.revision = s.revision.max(self.body.revision);
        s.clock = s.clock.max(self.body.clock);
        for k in &self.body.keys {
            if k.state == KeyState::Deleted && !s.destroyed.contains(&k.id) {
                s.destroyed.push(k.id.clone());
            }
        }
        if old.as_ref() != Some(&s) {
            seen::store(&self.path, &s).map_err(KmsError::State)?;
        }
        Ok(())
    }

    fn read_file(path: &Path, secret: &KeystoreSecret) -> Result<(KdfHeader, Key32, KeystoreBody)> {
        let data = fs::read(path).map_err(io_err(path))?;
        let kdf = KdfHeader::decode(path, &data)?;
        let kek = kdf.derive_kek(path, secret)?;
        let body = Self::decrypt_body(path, &kdf, &kek, &data)?;
        Ok((kdf, kek, body))
    }

    fn decrypt_body(
        path: &Path,
        kdf: &KdfHeader,
        kek: &Key32,
        data: &[u8],
    ) -> Result<KeystoreBody> {
        let (header, sealed) = data.split_at(KEYSTORE_HEADER_LEN);
        let plain = Zeroizing::new(
            AeadKey::new(kek)
                .open(header, sealed)
                .map_err(|_| KmsError::WrongSecret(path.to_path_buf()))?,
        );
        Self::decode_body(path, kdf.version, &plain)
    }

    /// Parse a decrypted body of keystore format `version` (1 to 4).
    /// Whoever knows the secret can seal any bytes, so this is hostile
    /// input too: an error, never a panic (property-tested).
    fn decode_body(path: &Path, version: u16, plain: &[u8]) -> Result<KeystoreBody> {
        let corrupt = |e: postcard::Error| KmsError::Corrupt {
            path: path.to_path_buf(),
            why: format!("body does not parse: {e}"),
        };
        Ok(match version {
            1 => upgrade_v1(postcard::from_bytes(plain).map_err(corrupt)?),
            2 => upgrade_v2(postcard::from_bytes(plain).map_err(corrupt)?),
            3 => upgrade_v3(postcard::from_bytes(plain).map_err(corrupt)?),
            _ => postcard::from_bytes(plain).map_err(corrupt)?,
        })
    }

    /// Re-read the keystore file with the key already derived (no passphrase
    /// stretching): what a mount daemon does to watch its key's state. The
    /// file must still be sealed with the same secret.
    pub fn reload(&self) -> Result<Keystore> {
        let data = fs::read(&self.path).map_err(io_err(&self.path))?;
        let kdf = KdfHeader::decode(&self.path, &data)?;
        if kdf.salt != self.kdf.salt || kdf.kind != self.kdf.kind {
            return Err(KmsError::Refused(format!(
                "keystore {} was re-sealed with another secret since this process unlocked it",
                self.path.display()
            )));
        }
        let body = Self::decrypt_body(&self.path, &kdf, &self.kek, &data)?;
        if body.revision < self.body.revision {
            return Err(KmsError::Rollback {
                path: self.path.clone(),
                found: body.revision,
                seen: self.body.revision,
            });
        }
        let mut ks = Keystore {
            path: self.path.clone(),
            kdf,
            kek: self.kek.clone(),
            body,
            _lock: None,
            caller: self.caller.clone(),
        };
        ks.check_rollback()?;
        // A daemon's clock was fixed when it started: it follows the
        // keystore's clock forward instead of refusing.
        let now = ks.now();
        if due_work(&ks.body, now) {
            let lock = take_lock(&ks.path)?;
            let data = fs::read(&ks.path).map_err(io_err(&ks.path))?;
            ks.body = Self::decrypt_body(&ks.path, &ks.kdf, &ks.kek, &data)?;
            ks.check_rollback()?;
            ks.housekeeping(now)?;
            drop(lock);
        }
        ks.note_seen()?;
        Ok(ks)
    }

    /// Carry out due deletions and rotations, add missing service keys,
    /// upgrade the format; save if anything changed. Needs the lock.
    fn housekeeping(&mut self, now: u64) -> Result<()> {
        let mut changed = self.kdf.version != KEYSTORE_FORMAT_VERSION;
        let mut destroyed = false;
        self.kdf.version = KEYSTORE_FORMAT_VERSION;
        changed |= self.ensure_service_keys();
        let mut events: Vec<(String, &'static str, Option<u32>, String)> = Vec::new();
        let mut hsm_deleted = Vec::new();
        for k in &mut self.body.keys {
            if k.state == KeyState::PendingDeletion && k.deletion_date.is_some_and(|d| d <= now) {
                if k.origin == KeyOrigin::Hsm {
                    hsm_deleted.push(k.id.clone());
                }
                for v in &mut k.versions {
                    v.material.zeroize();
                    v.material = None;
                }
                k.state = KeyState::Deleted;
                k.deleted = Some(now);
                k.rotation_days = None;
                let aliases = std::mem::take(&mut k.aliases);
                k.description = if aliases.is_empty() {
                    k.description.clone()
                } else {
                    format!("{} [was {}]", k.description, aliases.join(","))
                };
                events.push((
                    k.id.clone(),
                    "DestroyKey",
                    None,
                    "waiting period over: key material destroyed".into(),
                ));
                changed = true;
                destroyed = true;
            } else if rotation_due(k, now) {
                let v = k.current_version() + 1;
                k.versions
                    .push(KeyVersion::new(&k.id, v, now, *Key32::random().as_bytes()));
                events.push((
                    k.id.clone(),
                    "RotateKey",
                    Some(v),
                    format!(
                        "automatic rotation (every {} days)",
                        k.rotation_days.unwrap_or(0)
                    ),
                ));
                changed = true;
            }
        }
        for (id, op, v, detail) in events {
            self.record(
                Rec {
                    op,
                    key: Some((&id, v)),
                    ctx: None,
                },
                "ok",
                Some(detail),
            )?;
        }
        for id in hsm_deleted {
            self.destroy_token_objects(&id)?;
        }
        if destroyed {
            // The previous file still holds the material: it must not
            // become the backup.
            self.save_with(Backup::SameAsNew)?;
        } else if changed {
            self.save()?;
        }
        Ok(())
    }

    /// Open the keystore, creating it first when it does not exist yet.
    pub fn open_or_create(path: &Path, secret: &KeystoreSecret) -> Result<(Keystore, bool)> {
        match Keystore::open(path, secret, true) {
            Err(KmsError::NotFound(_)) => Ok((Keystore::create(path, secret)?, true)),
            other => other.map(|k| (k, false)),
        }
    }

    /// Path of the keystore file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Revision number (incremented by every save).
    pub fn revision(&self) -> u64 {
        self.body.revision
    }

    fn needs_service_keys(&self) -> bool {
        self.resolve(SERVICE_KEY_ALIAS).is_err() || self.resolve(DEFAULT_CONTENT_KEY_ALIAS).is_err()
    }

    /// Ensure the service-managed keys exist; returns true if it added any.
    fn ensure_service_keys(&mut self) -> bool {
        let mut changed = false;
        for (alias, desc, rotation) in [
            (
                SERVICE_KEY_ALIAS,
                "sealfs service key: seals volume metadata",
                Some(SERVICE_ROTATION_DAYS),
            ),
            (
                DEFAULT_CONTENT_KEY_ALIAS,
                "sealfs default content key (service managed)",
                None,
            ),
        ] {
            if self.resolve(alias).is_err() {
                let now = self.now();
                let id = new_key_id();
                self.body.keys.push(MasterKey {
                    aliases: vec![alias.to_string()],
                    description: desc.to_string(),
                    state: KeyState::Enabled,
                    origin: KeyOrigin::Generated,
                    manager: KeyManager::Service,
                    created: now,
                    versions: vec![KeyVersion::new(&id, 1, now, *Key32::random().as_bytes())],
                    id,
                    rotation_days: rotation,
                    deletion_date: None,
                    deleted: None,
                });
                changed = true;
            } else if alias == SERVICE_KEY_ALIAS {
                // keystores from before lifecycle support
                let k = self.resolve_mut(alias).expect("resolved");
                if k.rotation_days.is_none() {
                    k.rotation_days = Some(SERVICE_ROTATION_DAYS);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Append an audit entry for an operation on this keystore.
    fn record(&mut self, r: Rec<'_>, result: &str, detail: Option<String>) -> Result<()> {
        let head = self.append_audit(&r, result, detail)?;
        self.body.audit_head = Some(head);
        self.body.audit_head_file = true;
        Ok(())
    }

    fn append_audit(
        &self,
        r: &Rec<'_>,
        result: &str,
        detail: Option<String>,
    ) -> Result<(u64, [u8; 32])> {
        let e = audit::Entry {
            seq: 0,
            time: self.now(),
            op: r.op.to_string(),
            key_id: r.key.map(|k| k.0.to_string()),
            key_version: r.key.and_then(|k| k.1),
            volume: r.ctx.and_then(|c| c.get("volume").cloned()),
            context: r.ctx.cloned(),
            caller: self.caller.clone(),
            result: result.to_string(),
            detail,
            prev: String::new(),
        };
        Ok(audit::append(
            &audit::log_path(&self.path),
            &Key32::from_bytes(self.body.audit_key),
            e,
            self.body.audit_head_file,
        )?)
    }

    /// Audit a read-only operation (wrap/unwrap/describe): the keystore
    /// file is not rewritten.
    /// Record in the audit log a decision about a volume that weakens a
    /// check (`--accept-rollback`): `op` names it, `detail` says what.
    pub fn audit_volume_event(&self, op: &str, volume_id: &str, detail: String) -> Result<()> {
        let ctx = volume_context(volume_id, "metadata");
        self.audit_read(
            Rec {
                op,
                key: None,
                ctx: Some(&ctx),
            },
            "ok",
            Some(detail),
        )
    }

    fn audit_read(&self, r: Rec<'_>, result: &str, detail: Option<String>) -> Result<()> {
        self.append_audit(&r, result, detail).map(|_| ())
    }

    /// Write the keystore atomically: temp file, fsync, rename, fsync dir.
    /// The previous file is kept as `<path>.bak`.
    pub fn save(&mut self) -> Result<()> {
        self.save_with(Backup::Previous)
    }

    fn save_with(&mut self, backup: Backup) -> Result<()> {
        self.body.revision += 1;
        self.body.clock = self.now();
        self.kdf.version = KEYSTORE_FORMAT_VERSION;
        let out = seal_body(&self.kdf, &self.kek, &self.body);
        write_file_atomic(&self.path, &out, backup)?;
        self.note_seen()
    }

    /// All keys.
    pub fn keys(&self) -> &[MasterKey] {
        &self.body.keys
    }

    /// Resolve a key id, `alias/NAME` or bare alias `NAME`.
    pub fn resolve(&self, name: &str) -> Result<&MasterKey> {
        let want_alias = if name.starts_with("alias/") {
            name.to_string()
        } else {
            format!("alias/{name}")
        };
        let by_id = self.body.keys.iter().find(|k| k.id == name);
        let by_alias = self
            .body
            .keys
            .iter()
            .find(|k| k.aliases.contains(&want_alias));
        match (by_id, by_alias) {
            (Some(a), Some(b)) if a.id != b.id => Err(KmsError::Ambiguous {
                name: name.to_string(),
                id_match: a.id.clone(),
                alias_match: b.id.clone(),
            }),
            (Some(k), _) | (None, Some(k)) => Ok(k),
            (None, None) => Err(KmsError::UnknownKey(name.to_string())),
        }
    }

    fn resolve_mut(&mut self, name: &str) -> Result<&mut MasterKey> {
        let id = self.resolve(name)?.id.clone();
        Ok(self
            .body
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .expect("resolved above"))
    }

    /// The service key.
    pub fn service_key(&self) -> Result<&MasterKey> {
        self.resolve(SERVICE_KEY_ALIAS)
    }

    /// Describe a key (audited as DescribeKey).
    pub fn describe(&self, name: &str) -> Result<MasterKey> {
        let k = match self.resolve(name) {
            Ok(k) => k.clone(),
            Err(e) => {
                self.audit_read(
                    Rec {
                        op: "DescribeKey",
                        key: None,
                        ctx: None,
                    },
                    "error",
                    Some(e.to_string()),
                )?;
                return Err(e);
            }
        };
        self.audit_read(
            Rec {
                op: "DescribeKey",
                key: Some((&k.id, None)),
                ctx: None,
            },
            "ok",
            None,
        )?;
        Ok(k)
    }

    /// List keys (audited as ListKeys).
    pub fn list(&self) -> Result<Vec<MasterKey>> {
        self.audit_read(
            Rec {
                op: "ListKeys",
                key: None,
                ctx: None,
            },
            "ok",
            None,
        )?;
        Ok(self.body.keys.clone())
    }

    fn check_alias(&self, a: &str, pending: &[String]) -> Result<String> {
        let name = a.strip_prefix("alias/").unwrap_or(a);
        let ok = !name.is_empty()
            && name.len() <= 250
            && !name.starts_with("sealfs/")
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
        if !ok {
            return Err(KmsError::BadAlias(a.to_string()));
        }
        let fa = format!("alias/{name}");
        if self.body.keys.iter().any(|k| k.aliases.contains(&fa)) || pending.contains(&fa) {
            return Err(KmsError::AliasInUse(fa));
        }
        Ok(fa)
    }

    /// Create a new customer-managed key. Generated keys get their material
    /// now; external ones stay PendingImport until [`Keystore::import`].
    pub fn create_key_with(
        &mut self,
        aliases: &[String],
        description: &str,
        origin: KeyOrigin,
        rotation_days: Option<u32>,
    ) -> Result<String> {
        let mut full = Vec::new();
        for a in aliases {
            let fa = self.check_alias(a, &full)?;
            full.push(fa);
        }
        if let Some(d) = rotation_days {
            if origin == KeyOrigin::External {
                return Err(KmsError::Refused(
                    "imported keys rotate only on demand (`sealfs key rotate KEY --material FILE`); drop --rotation-period".into(),
                ));
            }
            check_rotation_days(d)?;
        }
        let now = self.now();
        let id = new_key_id();
        let versions = match origin {
            KeyOrigin::Generated => vec![KeyVersion::new(&id, 1, now, *Key32::random().as_bytes())],
            KeyOrigin::External => Vec::new(),
            KeyOrigin::Hsm => {
                return Err(KmsError::Refused(
                    "keys in a key store are created with `sealfs key create --key-store NAME`"
                        .into(),
                ))
            }
        };
        self.body.keys.push(MasterKey {
            id: id.clone(),
            aliases: full,
            description: description.to_string(),
            state: match origin {
                KeyOrigin::External => KeyState::PendingImport,
                _ => KeyState::Enabled,
            },
            origin,
            manager: KeyManager::Customer,
            created: now,
            versions,
            rotation_days,
            deletion_date: None,
            deleted: None,
        });
        self.record(
            Rec {
                op: "CreateKey",
                key: Some((&id, (origin == KeyOrigin::Generated).then_some(1))),
                ctx: None,
            },
            "ok",
            Some(format!("origin {origin:?}")),
        )?;
        self.save()?;
        Ok(id)
    }

    /// Create a generated customer key (no rotation).
    pub fn create_key(&mut self, aliases: &[String], description: &str) -> Result<String> {
        self.create_key_with(aliases, description, KeyOrigin::Generated, None)
    }

    /// Refuse an operation, auditing the denial. Nothing is saved.
    fn deny<T>(&mut self, op: &str, id: Option<&str>, e: KmsError) -> Result<T> {
        let id = id.map(str::to_string);
        self.record(
            Rec {
                op,
                key: id.as_deref().map(|i| (i, None)),
                ctx: None,
            },
            "denied",
            Some(e.to_string()),
        )?;
        Err(e)
    }

    /// Resolve for a lifecycle operation: unknown keys are audited errors,
    /// service-managed keys are refused when `customer_only`.
    fn target(&mut self, op: &str, name: &str, customer_only: bool) -> Result<String> {
        let k = match self.resolve(name) {
            Ok(k) => k,
            Err(e) => {
                self.record(
                    Rec {
                        op,
                        key: None,
                        ctx: None,
                    },
                    "error",
                    Some(e.to_string()),
                )?;
                return Err(e);
            }
        };
        let id = k.id.clone();
        if customer_only && k.manager == KeyManager::Service {
            let e = KmsError::Refused(format!(
                "key {} ({}) is managed by sealfs: {op} is not allowed on it",
                k.id,
                k.aliases.join(",")
            ));
            return self.deny(op, Some(&id), e);
        }
        if k.state == KeyState::Deleted {
            let e = k.unusable();
            return self.deny(op, Some(&id), e);
        }
        Ok(id)
    }

    fn commit_change(
        &mut self,
        op: &str,
        id: &str,
        version: Option<u32>,
        detail: String,
    ) -> Result<()> {
        self.record(
            Rec {
                op,
                key: Some((id, version)),
                ctx: None,
            },
            "ok",
            Some(detail),
        )?;
        self.save()
    }

    fn get_mut(&mut self, id: &str) -> &mut MasterKey {
        self.body
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .expect("id from target()")
    }

    /// `key enable`: Disabled → Enabled (Enabled stays Enabled).
    pub fn enable(&mut self, name: &str) -> Result<()> {
        let id = self.target("EnableKey", name, true)?;
        let k = self.get_mut(&id);
        match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                let was = k.state;
                k.state = KeyState::Enabled;
                self.commit_change("EnableKey", &id, None, format!("{was} -> Enabled"))
            }
            _ => {
                let e = k.unusable();
                self.deny("EnableKey", Some(&id), e)
            }
        }
    }

    /// `key disable`: Enabled → Disabled.
    pub fn disable(&mut self, name: &str) -> Result<()> {
        let id = self.target("DisableKey", name, true)?;
        let k = self.get_mut(&id);
        match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                let was = k.state;
                k.state = KeyState::Disabled;
                self.commit_change("DisableKey", &id, None, format!("{was} -> Disabled"))
            }
            _ => {
                let e = k.unusable();
                self.deny("DisableKey", Some(&id), e)
            }
        }
    }

    /// Set a customer key's state directly (tests; CLI uses enable/disable).
    pub fn set_state(&mut self, name: &str, state: KeyState) -> Result<()> {
        match state {
            KeyState::Enabled => self.enable(name),
            KeyState::Disabled => self.disable(name),
            other => Err(KmsError::Refused(format!(
                "cannot set state {other} directly"
            ))),
        }
    }

    /// `key schedule-deletion`: the key refuses all use now and is destroyed
    /// after `days` (7–30). Returns the deletion date.
    pub fn schedule_deletion(&mut self, name: &str, days: u32) -> Result<u64> {
        let id = self.target("ScheduleKeyDeletion", name, true)?;
        let now = self.now();
        if !(PENDING_DAYS_MIN..=PENDING_DAYS_MAX).contains(&days) {
            return self.deny(
                "ScheduleKeyDeletion",
                Some(&id),
                KmsError::Refused(format!(
                    "--pending-days {days} is out of range: the waiting period is {PENDING_DAYS_MIN} to {PENDING_DAYS_MAX} days"
                )),
            );
        }
        let k = self.get_mut(&id);
        if k.state == KeyState::PendingDeletion {
            let e = KmsError::Refused(format!(
                "key {id} is already scheduled for deletion on {}",
                fmt_date(k.deletion_date.unwrap_or(0))
            ));
            return self.deny("ScheduleKeyDeletion", Some(&id), e);
        }
        let when = now + days as u64 * 86400;
        k.state = KeyState::PendingDeletion;
        k.deletion_date = Some(when);
        self.commit_change(
            "ScheduleKeyDeletion",
            &id,
            None,
            format!("destroyed on {} ({days} days)", fmt_date(when)),
        )?;
        Ok(when)
    }

    /// `key cancel-deletion`: PendingDeletion → Disabled (PendingImport for
    /// an external key without material).
    pub fn cancel_deletion(&mut self, name: &str) -> Result<()> {
        let id = self.target("CancelKeyDeletion", name, true)?;
        let k = self.get_mut(&id);
        if k.state != KeyState::PendingDeletion {
            let e = KmsError::Refused(format!(
                "key {id} is {}, not scheduled for deletion",
                k.state
            ));
            return self.deny("CancelKeyDeletion", Some(&id), e);
        }
        let complete = k.versions.last().is_some_and(|v| v.has_material());
        k.state = if complete {
            KeyState::Disabled
        } else {
            KeyState::PendingImport
        };
        k.deletion_date = None;
        let st = k.state;
        self.commit_change(
            "CancelKeyDeletion",
            &id,
            None,
            format!("PendingDeletion -> {st}"),
        )
    }

    /// `key import`: give an external key its material, or give back
    /// deleted material (which must be identical).
    pub fn import(&mut self, name: &str, material: &[u8; 32]) -> Result<u32> {
        let id = self.target("ImportKeyMaterial", name, true)?;
        let now = self.now();
        let k = self.get_mut(&id);
        if k.origin != KeyOrigin::External {
            let e = KmsError::Refused(format!(
                "key {id} was generated by sealfs; only keys created with --origin external take imported material"
            ));
            return self.deny("ImportKeyMaterial", Some(&id), e);
        }
        if k.state == KeyState::PendingDeletion {
            let e = k.unusable();
            return self.deny("ImportKeyMaterial", Some(&id), e);
        }
        let fp = fingerprint(&id, material);
        let version = if k.versions.is_empty() {
            k.versions.push(KeyVersion::new(&id, 1, now, *material));
            1
        } else if let Some(v) = k
            .versions
            .iter_mut()
            .find(|v| crypto::ct_eq(&v.fingerprint, &fp))
        {
            if v.material.is_none() {
                v.material = Some(*material);
            }
            v.version
        } else {
            let e = KmsError::Refused(format!(
                "this material differs from the material key {id} was created with; an imported key accepts only the same material again (new material makes a new version: `sealfs key rotate {id} --material FILE`)"
            ));
            return self.deny("ImportKeyMaterial", Some(&id), e);
        };
        let complete = k.versions.last().is_some_and(|v| v.has_material());
        if k.state == KeyState::PendingImport && complete {
            k.state = KeyState::Enabled;
        }
        let st = k.state;
        self.commit_change(
            "ImportKeyMaterial",
            &id,
            Some(version),
            format!("material for version {version} imported; key is {st}"),
        )?;
        Ok(version)
    }

    /// `key delete-material`: destroy an external key's material (every
    /// version); it is PendingImport until the same material is imported.
    pub fn delete_material(&mut self, name: &str) -> Result<()> {
        let id = self.target("DeleteImportedKeyMaterial", name, true)?;
        let k = self.get_mut(&id);
        if k.origin != KeyOrigin::External {
            let e = KmsError::Refused(format!(
                "key {id} was generated by sealfs; only imported material can be deleted (schedule the key's deletion instead)"
            ));
            return self.deny("DeleteImportedKeyMaterial", Some(&id), e);
        }
        for v in &mut k.versions {
            v.material.zeroize();
            v.material = None;
        }
        if k.state != KeyState::PendingDeletion {
            k.state = KeyState::PendingImport;
        }
        self.commit_change(
            "DeleteImportedKeyMaterial",
            &id,
            None,
            "material of every version deleted".into(),
        )
    }

    /// `key rotate`: add a new version now. Generated keys get fresh
    /// material; imported keys need new material. Returns the new version.
    pub fn rotate(&mut self, name: &str, material: Option<&[u8; 32]>) -> Result<u32> {
        let id = self.target("RotateKey", name, false)?;
        let now = self.now();
        let k = self.get_mut(&id);
        if !matches!(k.state, KeyState::Enabled | KeyState::Disabled) {
            let e = k.unusable();
            return self.deny("RotateKey", Some(&id), e);
        }
        let v = k.current_version() + 1;
        if k.origin == KeyOrigin::Hsm {
            if material.is_some() {
                let e = KmsError::Refused(format!(
                    "key {id} lives in a key store: it rotates to a new key generated in the token (drop --material)"
                ));
                return self.deny("RotateKey", Some(&id), e);
            }
            self.rotate_hsm(&id, v, now)?;
            self.commit_change("RotateKey", &id, Some(v), "rotated on demand".into())?;
            return Ok(v);
        }
        match (k.origin, material) {
            (KeyOrigin::Hsm, _) => unreachable!("handled above"),
            (KeyOrigin::Generated, None) => {
                k.versions
                    .push(KeyVersion::new(&id, v, now, *Key32::random().as_bytes()));
            }
            (KeyOrigin::Generated, Some(_)) => {
                let e = KmsError::Refused(format!(
                    "key {id} was generated by sealfs; it rotates to generated material (drop --material)"
                ));
                return self.deny("RotateKey", Some(&id), e);
            }
            (KeyOrigin::External, None) => {
                let e = KmsError::Refused(format!(
                    "key {id} has imported material; rotate it with new material: `sealfs key rotate {id} --material FILE`"
                ));
                return self.deny("RotateKey", Some(&id), e);
            }
            (KeyOrigin::External, Some(m)) => {
                let fp = fingerprint(&id, m);
                if k.versions
                    .iter()
                    .any(|x| crypto::ct_eq(&x.fingerprint, &fp))
                {
                    let e = KmsError::Refused(format!(
                        "key {id} already has this material; rotation needs new material"
                    ));
                    return self.deny("RotateKey", Some(&id), e);
                }
                k.versions.push(KeyVersion::new(&id, v, now, *m));
            }
        }
        self.commit_change("RotateKey", &id, Some(v), "rotated on demand".into())?;
        Ok(v)
    }

    /// `key rotation enable|disable`.
    pub fn set_rotation(&mut self, name: &str, days: Option<u32>) -> Result<()> {
        let op = if days.is_some() {
            "EnableKeyRotation"
        } else {
            "DisableKeyRotation"
        };
        let id = self.target(op, name, true)?;
        let k = self.get_mut(&id);
        if k.origin == KeyOrigin::External && days.is_some() {
            let e = KmsError::Refused(format!(
                "key {id} has imported material: imported keys rotate only on demand, with new material"
            ));
            return self.deny(op, Some(&id), e);
        }
        if k.origin == KeyOrigin::Hsm && days.is_some() {
            let e = KmsError::Refused(format!(
                "key {id} lives in a key store: it rotates on demand (`sealfs key rotate {id}`)"
            ));
            return self.deny(op, Some(&id), e);
        }
        if let Some(d) = days {
            if let Err(e) = check_rotation_days(d) {
                return self.deny(op, Some(&id), e);
            }
        }
        let k = self.get_mut(&id);
        k.rotation_days = days;
        let detail = match days {
            Some(d) => format!("rotates every {d} days"),
            None => "automatic rotation off".into(),
        };
        self.commit_change(op, &id, None, detail)
    }

    /// `key alias create ALIAS KEY`.
    pub fn alias_create(&mut self, alias: &str, name: &str) -> Result<String> {
        let id = self.target("CreateAlias", name, true)?;
        let fa = match self.check_alias(alias, &[]) {
            Ok(a) => a,
            Err(e) => return self.deny("CreateAlias", Some(&id), e),
        };
        self.get_mut(&id).aliases.push(fa.clone());
        self.commit_change("CreateAlias", &id, None, fa.clone())?;
        Ok(fa)
    }

    /// `key alias delete ALIAS`.
    pub fn alias_delete(&mut self, alias: &str) -> Result<String> {
        let fa = if alias.starts_with("alias/") {
            alias.to_string()
        } else {
            format!("alias/{alias}")
        };
        let Some(k) = self.body.keys.iter().find(|k| k.aliases.contains(&fa)) else {
            let e = KmsError::UnknownKey(fa.clone());
            return self.deny("DeleteAlias", None, e);
        };
        let id = k.id.clone();
        if k.manager == KeyManager::Service {
            let e = KmsError::Refused(format!(
                "{fa} names a key managed by sealfs; its aliases cannot change"
            ));
            return self.deny("DeleteAlias", Some(&id), e);
        }
        self.get_mut(&id).aliases.retain(|a| a != &fa);
        self.commit_change("DeleteAlias", &id, None, fa)?;
        Ok(id)
    }

    /// Re-seal the keystore under another secret (passphrase ↔ key file,
    /// or a new one of the same kind). Atomic; the old file becomes the
    /// backup.
    pub fn change_secret(&mut self, new: &KeystoreSecret) -> Result<()> {
        let kdf = KdfHeader::new_for(new);
        let kek = kdf.derive_kek(&self.path, new)?;
        self.record(
            Rec {
                op: "ChangeSecret",
                key: None,
                ctx: None,
            },
            "ok",
            Some(format!("keystore re-sealed with a {}", new.kind_name())),
        )?;
        self.kdf = kdf;
        self.kek = kek;
        self.save()
    }

    /// Mark the keys `ids` destroyed (their material wiped) if this body
    /// still has material or a live state for them. Returns the ids that
    /// changed.
    fn shred_ids(&mut self, ids: &[String], now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for k in &mut self.body.keys {
            if !ids.contains(&k.id) {
                continue;
            }
            let had = k.versions.iter().any(|v| v.has_material());
            if k.state == KeyState::Deleted && !had {
                continue;
            }
            for v in &mut k.versions {
                v.material.zeroize();
                v.material = None;
            }
            k.state = KeyState::Deleted;
            k.deleted = k.deleted.or(Some(now));
            k.rotation_days = None;
            k.aliases.clear();
            out.push(k.id.clone());
        }
        out
    }

    /// Bring back `<path>.bak` (which must open with `secret`); the current
    /// file becomes the new backup. Returns the restored revision.
    ///
    /// Keys destroyed in the current keystore or recorded as destroyed in
    /// the local state stay destroyed: their material in the backup is
    /// dropped. The restored keystore gets a revision above every revision
    /// seen, so it passes the rollback check.
    pub fn restore_backup(path: &Path, secret: &KeystoreSecret) -> Result<u64> {
        let bak = backup_path(path);
        if !bak.exists() {
            return Err(KmsError::Refused(format!(
                "there is no backup {} to restore",
                bak.display()
            )));
        }
        let lock = take_lock(path)?;
        let data = fs::read(&bak).map_err(io_err(&bak))?;
        let kdf = KdfHeader::decode(&bak, &data)?;
        let kek = kdf.derive_kek(&bak, secret)?;
        let mut body = Self::decrypt_body(&bak, &kdf, &kek, &data).map_err(|e| match e {
            KmsError::WrongSecret(_) => KmsError::Refused(format!(
                "the backup {} does not open with this secret (was the passphrase changed since? pass the old one)",
                bak.display()
            )),
            other => other,
        })?;
        let revision = body.revision;
        let seen = seen::load(path)
            .map_err(KmsError::State)?
            .unwrap_or_default();
        // The current keystore, if this secret opens it.
        let current = fs::read(path).ok();
        let cur_body = current.as_deref().and_then(|d| {
            let k = KdfHeader::decode(path, d).ok()?;
            let kek = k.derive_kek(path, secret).ok()?;
            Self::decrypt_body(path, &k, &kek, d).ok()
        });
        let mut destroyed = seen.destroyed.clone();
        let mut floor = seen.revision;
        let mut clock = seen.clock.max(body.clock);
        if let Some(c) = &cur_body {
            floor = floor.max(c.revision);
            clock = clock.max(c.clock);
            for k in c.keys.iter().filter(|k| k.state == KeyState::Deleted) {
                if !destroyed.contains(&k.id) {
                    destroyed.push(k.id.clone());
                }
            }
        }
        check_clock(path, clock)?;
        body.revision = body.revision.max(floor);
        body.clock = clock;
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body,
            _lock: Some(lock),
            caller: audit::Caller::current(),
        };
        let now = ks.now();
        let shredded = ks.shred_ids(&destroyed, now);
        let mut detail = format!("restored revision {revision} from {}", bak.display());
        if !shredded.is_empty() {
            detail.push_str(&format!(
                "; the backup still held keys destroyed since, which stay destroyed: {}",
                shredded.join(", ")
            ));
        }
        ks.record(
            Rec {
                op: "RestoreBackup",
                key: None,
                ctx: None,
            },
            "ok",
            Some(detail),
        )?;
        ks.body.revision += 1;
        ks.body.clock = ks.now();
        let out = seal_body(&ks.kdf, &ks.kek, &ks.body);
        // Swap: the current file becomes the backup, the backup current;
        // unless the current one holds material of a destroyed key.
        let current_clean = cur_body.as_ref().is_some_and(|c| {
            !c.keys
                .iter()
                .any(|k| destroyed.contains(&k.id) && k.versions.iter().any(|v| v.has_material()))
        });
        match current {
            Some(cur) if current_clean || cur_body.is_none() => {
                write_file_atomic(&bak, &cur, Backup::None)?
            }
            _ => write_file_atomic(&bak, &out, Backup::None)?,
        }
        write_file_atomic(path, &out, Backup::None)?;
        ks.note_seen()?;
        Ok(revision)
    }

    /// Accept the keystore file as it is although this machine has seen a
    /// newer revision of it (or its local state is damaged): audited as
    /// AcceptKeystore. Keys the local state records as destroyed stay
    /// destroyed. Returns (the file's revision, the revision seen before).
    pub fn accept_keystore(path: &Path, secret: &KeystoreSecret) -> Result<(u64, Option<u64>)> {
        if !path.exists() {
            return Err(KmsError::NotFound(path.to_path_buf()));
        }
        let lock = take_lock(path)?;
        let (kdf, kek, body) = Self::read_file(path, secret)?;
        check_clock(path, body.clock)?;
        let (seen, damaged) = match seen::load(path) {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        let found = body.revision;
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body,
            _lock: Some(lock),
            caller: audit::Caller::current(),
        };
        let s = seen.clone().unwrap_or_default();
        ks.body.revision = ks.body.revision.max(s.revision);
        ks.body.clock = ks.body.clock.max(s.clock);
        let now = ks.now();
        let shredded = ks.shred_ids(&s.destroyed, now);
        // Repair the local state first (save() updates it from there).
        seen::store(
            path,
            &seen::Seen {
                revision: ks.body.revision,
                clock: ks.body.clock,
                destroyed: s.destroyed.clone(),
                ..seen::Seen::default()
            },
        )
        .map_err(KmsError::State)?;
        let mut detail = match (&seen, &damaged) {
            (Some(s), _) => format!(
                "accepted keystore revision {found} as it is, although this machine had seen revision {}",
                s.revision
            ),
            (None, Some(e)) => format!("accepted keystore revision {found} as it is; the local state was unusable: {e}"),
            (None, None) => format!("accepted keystore revision {found} (nothing recorded before)"),
        };
        if !shredded.is_empty() {
            detail.push_str(&format!(
                "; keys destroyed before stay destroyed: {}",
                shredded.join(", ")
            ));
        }
        ks.record(
            Rec {
                op: "AcceptKeystore",
                key: None,
                ctx: None,
            },
            "ok",
            Some(detail),
        )?;
        ks.save_with(if shredded.is_empty() {
            Backup::Previous
        } else {
            Backup::SameAsNew
        })?;
        Ok((found, seen.map(|s| s.revision)))
    }

    /// Wrap `data_key` under the newest version of master key `name`
    /// (audited as GenerateDataKey, or `op`).
    pub fn wrap(
        &self,
        name: &str,
        ctx: &EncryptionContext,
        data_key: &Key32,
    ) -> Result<WrappedKey> {
        self.wrap_op("GenerateDataKey", name, ctx, data_key)
    }

    /// Wrap with an explicit audit operation name (Encrypt, ReEncrypt, ...).
    pub fn wrap_op(
        &self,
        op: &str,
        name: &str,
        ctx: &EncryptionContext,
        data_key: &Key32,
    ) -> Result<WrappedKey> {
        let k = match self.resolve(name) {
            Ok(k) => k,
            Err(e) => {
                self.audit_read(
                    Rec {
                        op,
                        key: None,
                        ctx: Some(ctx),
                    },
                    "error",
                    Some(e.to_string()),
                )?;
                return Err(e);
            }
        };
        if k.origin == KeyOrigin::Hsm {
            return self.wrap_hsm(op, k, ctx, data_key);
        }
        let v = k.versions.last().filter(|v| v.has_material());
        let (v, material) = match (k.state, v) {
            (KeyState::Enabled, Some(v)) => (v, v.material.expect("checked")),
            (KeyState::Enabled, None) => {
                let e = KmsError::MaterialDeleted {
                    id: k.id.clone(),
                    version: k.current_version(),
                };
                self.audit_read(
                    Rec {
                        op,
                        key: Some((&k.id, None)),
                        ctx: Some(ctx),
                    },
                    "denied",
                    Some(e.to_string()),
                )?;
                return Err(e);
            }
            _ => {
                let e = k.unusable();
                self.audit_read(
                    Rec {
                        op,
                        key: Some((&k.id, None)),
                        ctx: Some(ctx),
                    },
                    "denied",
                    Some(e.to_string()),
                )?;
                return Err(e);
            }
        };
        let mk = Key32::from_bytes(material);
        let sealed = AeadKey::new(&mk).seal(&wrap_ad(&k.id, v.version, ctx), data_key.as_bytes());
        self.audit_read(
            Rec {
                op,
                key: Some((&k.id, Some(v.version))),
                ctx: Some(ctx),
            },
            "ok",
            None,
        )?;
        Ok(WrappedKey {
            key_id: k.id.clone(),
            key_version: v.version,
            sealed,
        })
    }

    /// The key `name` if it can wrap now (Enabled, newest material
    /// present), else the error a wrap would give.
    pub fn check_usable(&self, name: &str) -> Result<&MasterKey> {
        let k = self.resolve(name)?;
        if k.state != KeyState::Enabled {
            return Err(k.unusable());
        }
        if k.origin == KeyOrigin::Hsm {
            self.hsm_usable(k, k.current_version())?;
            return Ok(k);
        }
        if !k.versions.last().is_some_and(|v| v.has_material()) {
            return Err(KmsError::MaterialDeleted {
                id: k.id.clone(),
                version: k.current_version(),
            });
        }
        Ok(k)
    }

    /// Check whether `w` could be unwrapped now, without doing it or
    /// auditing: Ok, or the error a real unwrap would give. Used by mount
    /// daemons that poll their key's state.
    pub fn usable_for(&self, w: &WrappedKey) -> Result<()> {
        let k = self
            .body
            .keys
            .iter()
            .find(|k| k.id == w.key_id)
            .ok_or_else(|| KmsError::UnknownKey(w.key_id.clone()))?;
        if k.state != KeyState::Enabled {
            return Err(k.unusable());
        }
        if k.origin == KeyOrigin::Hsm {
            return self.hsm_usable(k, w.key_version);
        }
        match k.versions.iter().find(|v| v.version == w.key_version) {
            None => Err(KmsError::NoSuchVersion {
                id: k.id.clone(),
                version: w.key_version,
            }),
            Some(v) if !v.has_material() => Err(KmsError::MaterialDeleted {
                id: k.id.clone(),
                version: v.version,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Unwrap a data key (audited as Decrypt); the encryption context must
    /// match the one used to wrap.
    pub fn unwrap(&self, w: &WrappedKey, ctx: &EncryptionContext) -> Result<Key32> {
        let r = self.unwrap_inner(w, ctx);
        let (result, detail) = match &r {
            Ok(_) if self.is_hsm_key(&w.key_id) => {
                ("ok", self.hsm_detail(&w.key_id, w.key_version))
            }
            Ok(_) => ("ok", None),
            Err(
                e @ (KmsError::KeyNotUsable { .. }
                | KmsError::KeyDeleted { .. }
                | KmsError::MaterialDeleted { .. }
                | KmsError::Unavailable { .. }),
            ) => ("denied", Some(e.to_string())),
            Err(e) => ("error", Some(e.to_string())),
        };
        self.audit_read(
            Rec {
                op: "Decrypt",
                key: Some((&w.key_id, Some(w.key_version))),
                ctx: Some(ctx),
            },
            result,
            detail,
        )?;
        r
    }

    fn unwrap_inner(&self, w: &WrappedKey, ctx: &EncryptionContext) -> Result<Key32> {
        self.usable_for(w)?;
        let k = self
            .body
            .keys
            .iter()
            .find(|k| k.id == w.key_id)
            .expect("checked");
        if k.origin == KeyOrigin::Hsm {
            return self.unwrap_hsm(k, w, ctx);
        }
        let v = k
            .versions
            .iter()
            .find(|v| v.version == w.key_version)
            .expect("checked");
        let mk = Key32::from_bytes(v.material.expect("checked"));
        let fail = || KmsError::UnwrapFailed {
            id: k.id.clone(),
            version: v.version,
            purpose: ctx.get("purpose").cloned().unwrap_or_default(),
        };
        let plain = Zeroizing::new(
            AeadKey::new(&mk)
                .open(&wrap_ad(&k.id, v.version, ctx), &w.sealed)
                .map_err(|_| fail())?,
        );
        Key32::from_slice(&plain).ok_or_else(fail)
    }

    /// Verify the audit log against this keystore's audit key.
    pub fn verify_audit(&self) -> std::result::Result<audit::Verified, String> {
        audit::verify(
            &audit::log_path(&self.path),
            &Key32::from_bytes(self.body.audit_key),
            self.body.audit_head,
            self.body.audit_head_file,
        )
    }
}

fn check_rotation_days(d: u32) -> Result<()> {
    if (1..=3650).contains(&d) {
        Ok(())
    } else {
        Err(KmsError::Refused(format!(
            "rotation period {d} is out of range: use 1 to 3650 days"
        )))
    }
}

/// What a keystore write does with the backup `<path>.bak`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backup {
    /// Leave it alone.
    None,
    /// The file being replaced becomes the backup.
    Previous,
    /// The backup gets the new content too: the file being replaced holds
    /// material that was just destroyed, so it must not survive anywhere.
    SameAsNew,
}

/// Seal a keystore body: `header ‖ AEAD(kek, ad = header, postcard(body))`.
/// The plaintext (which holds every key) is serialized into a buffer of
/// exactly its size that is wiped on drop, never into a growing vector
/// that would leave copies behind when it reallocates.
fn seal_body(kdf: &KdfHeader, kek: &Key32, body: &KeystoreBody) -> Vec<u8> {
    let header = kdf.encode();
    let n = postcard::experimental::serialized_size(body).expect("serializable");
    let mut plain = Zeroizing::new(vec![0u8; n]);
    let used = postcard::to_slice(body, &mut plain[..])
        .expect("buffer of the serialized size")
        .len();
    let sealed = AeadKey::new(kek).seal(&header, &plain[..used]);
    let mut out = header;
    out.extend_from_slice(&sealed);
    out
}

fn tmp_of(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}

/// Write `data` to `path` through `<path>.tmp` (mode 0600, fsync, rename).
fn write_replace(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_of(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Write `data` to `path` atomically (temp file, fsync, rename, fsync the
/// directory), mode 0600, handling the backup as `backup` says.
fn write_file_atomic(path: &Path, data: &[u8], backup: Backup) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let bak = backup_path(path);
    match backup {
        Backup::None => {}
        Backup::Previous if path.exists() => {
            let bak_tmp = tmp_of(&bak);
            fs::copy(path, &bak_tmp)
                .and_then(|_| File::open(&bak_tmp)?.sync_all())
                .and_then(|_| fs::rename(&bak_tmp, &bak))
                .map_err(io_err(&bak))?;
        }
        Backup::Previous => {}
        Backup::SameAsNew => write_replace(&bak, data)?,
    }
    write_replace(path, data)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Refuse a `SEALFS_KMS_NOW` earlier than the keystore clock `last`.
fn check_clock(path: &Path, last: u64) -> Result<()> {
    let Some(v) = std::env::var_os(CLOCK_ENV) else {
        return Ok(());
    };
    let parsed = v.to_str().and_then(|v| v.trim().parse::<u64>().ok());
    if parsed.is_none() {
        return Err(KmsError::Refused(format!(
            "{CLOCK_ENV}={} is not a number of seconds since the epoch; unset it (it is a test aid) or give seconds, as in {CLOCK_ENV}={}",
            v.to_string_lossy(),
            now_secs()
        )));
    }
    if let Some(given) = parsed {
        if given < last {
            return Err(KmsError::ClockBackwards {
                path: path.to_path_buf(),
                given,
                last,
            });
        }
    }
    Ok(())
}

/// Read the whole file (helper for tests).
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyfile_secret() -> KeystoreSecret {
        KeystoreSecret::KeyFile(Key32::random())
    }

    #[test]
    fn create_open_and_service_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let s = keyfile_secret();
        let ks = Keystore::create(&p, &s).unwrap();
        let svc = ks.service_key().unwrap().id.clone();
        drop(ks);
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert_eq!(ks.service_key().unwrap().id, svc);
        assert!(ks.resolve(DEFAULT_CONTENT_KEY_ALIAS).is_ok());
        assert!(matches!(
            Keystore::create(&p, &s),
            Err(KmsError::AlreadyExists(_))
        ));
    }

    #[test]
    fn wrong_secret_and_kind_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        Keystore::create(&p, &keyfile_secret()).unwrap();
        assert!(matches!(
            Keystore::open(&p, &keyfile_secret(), false),
            Err(KmsError::WrongSecret(_))
        ));
        let pass = KeystoreSecret::Passphrase(Zeroizing::new("x".into()));
        assert!(matches!(
            Keystore::open(&p, &pass, false),
            Err(KmsError::SecretKindMismatch { .. })
        ));
    }

    #[test]
    fn passphrase_keystore() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let good = KeystoreSecret::Passphrase(Zeroizing::new("correct horse".into()));
        let bad = KeystoreSecret::Passphrase(Zeroizing::new("wrong horse".into()));
        Keystore::create(&p, &good).unwrap();
        Keystore::open(&p, &good, false).unwrap();
        let e = Keystore::open(&p, &bad, false).unwrap_err();
        assert!(matches!(e, KmsError::WrongSecret(_)));
        assert!(!e.to_string().contains("horse"));
    }

    #[test]
    fn tampered_keystore_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let s = keyfile_secret();
        Keystore::create(&p, &s).unwrap();
        let orig = fs::read(&p).unwrap();
        for i in [0usize, 9, 12, 30, KEYSTORE_HEADER_LEN + 3, orig.len() - 1] {
            let mut t = orig.clone();
            t[i] ^= 0x40;
            fs::write(&p, &t).unwrap();
            assert!(Keystore::open(&p, &s, false).is_err(), "flip at {i}");
        }
        fs::write(&p, &orig[..orig.len() - 5]).unwrap();
        assert!(Keystore::open(&p, &s, false).is_err());
    }

    #[test]
    fn keys_aliases_wrap_unwrap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let s = keyfile_secret();
        let mut ks = Keystore::create(&p, &s).unwrap();
        let id = ks.create_key(&["photos".into()], "family").unwrap();
        assert!(matches!(
            ks.create_key(&["alias/photos".into()], ""),
            Err(KmsError::AliasInUse(_))
        ));
        assert!(matches!(
            ks.create_key(&["bad alias!".into()], ""),
            Err(KmsError::BadAlias(_))
        ));
        assert!(matches!(
            ks.create_key(&["sealfs/service".into()], ""),
            Err(KmsError::BadAlias(_))
        ));
        assert_eq!(ks.resolve("alias/photos").unwrap().id, id);
        assert_eq!(ks.resolve("photos").unwrap().id, id);
        assert_eq!(ks.resolve(&id).unwrap().id, id);
        assert!(matches!(ks.resolve("nope"), Err(KmsError::UnknownKey(_))));

        let dk = Key32::random();
        let ctx = volume_context("vol1", "content");
        let w = ks.wrap("photos", &ctx, &dk).unwrap();
        assert_eq!(w.key_id, id);
        assert_eq!(w.key_version, 1);
        assert!(ks.unwrap(&w, &ctx).unwrap().ct_eq(&dk));
        // another context fails
        let ctx2 = volume_context("vol2", "content");
        assert!(matches!(
            ks.unwrap(&w, &ctx2),
            Err(KmsError::UnwrapFailed { .. })
        ));
        // tampered wrap fails
        let mut w2 = w.clone();
        w2.sealed[20] ^= 1;
        assert!(ks.unwrap(&w2, &ctx).is_err());
        // disabled key refuses
        ks.set_state("photos", KeyState::Disabled).unwrap();
        assert!(matches!(
            ks.unwrap(&w, &ctx),
            Err(KmsError::KeyNotUsable { .. })
        ));
        assert!(ks.wrap("photos", &ctx, &dk).is_err());
        // persisted
        drop(ks);
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert_eq!(ks.resolve("photos").unwrap().state, KeyState::Disabled);
        assert!(ks.set_state_check_service());
    }

    impl Keystore {
        fn set_state_check_service(&self) -> bool {
            self.service_key().unwrap().manager == KeyManager::Service
        }
    }

    #[test]
    fn service_key_state_cannot_change() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let mut ks = Keystore::create(&p, &keyfile_secret()).unwrap();
        assert!(matches!(
            ks.set_state(SERVICE_KEY_ALIAS, KeyState::Disabled),
            Err(KmsError::Refused(_))
        ));
    }

    #[test]
    fn key_file_formats() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let private = |p: &Path, data: &[u8]| {
            fs::write(p, data).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap();
        };
        let raw = d.path().join("raw");
        generate_key_file(&raw).unwrap();
        assert!(generate_key_file(&raw).is_err());
        assert!(KeystoreSecret::from_key_file(&raw).is_ok());
        // exactly 32 bytes: hex text, short and long files are refused
        let hexf = d.path().join("hex");
        private(&hexf, format!("{}\n", "ab".repeat(32)).as_bytes());
        let e = KeystoreSecret::from_key_file(&hexf).err().unwrap();
        assert!(
            e.to_string().contains("exactly 32 raw bytes, found 65"),
            "{e}"
        );
        let short = d.path().join("short");
        private(&short, b"abc");
        let e = KeystoreSecret::from_key_file(&short).err().unwrap();
        assert!(
            e.to_string().contains("exactly 32 raw bytes, found 3"),
            "{e}"
        );
        let long = d.path().join("long");
        private(&long, &[7u8; 1000]);
        let e = KeystoreSecret::from_key_file(&long).err().unwrap();
        assert!(e.to_string().contains("found 65 or more"), "{e}");
        assert!(KeystoreSecret::from_key_file(&d.path().join("missing")).is_err());
        // readable by group or others: refused with the fix
        for mode in [0o640, 0o604, 0o644, 0o610] {
            fs::set_permissions(&raw, fs::Permissions::from_mode(mode)).unwrap();
            let e = KeystoreSecret::from_key_file(&raw)
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(&format!("chmod 600 {}", raw.display()))
                    && e.contains("group or others"),
                "{mode:o}: {e}"
            );
        }
        fs::set_permissions(&raw, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(KeystoreSecret::from_key_file(&raw).is_ok());
        // not a regular file
        let e = KeystoreSecret::from_key_file(d.path()).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn passphrase_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pass");
        fs::write(&p, "correct horse\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeystoreSecret::from_passphrase_file(&p)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        assert!(!e.contains("horse"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        match KeystoreSecret::from_passphrase_file(&p).unwrap() {
            KeystoreSecret::Passphrase(s) => assert_eq!(s.as_str(), "correct horse"),
            _ => panic!("not a passphrase"),
        }
    }

    /// Every file in `dir` that is a keystore sealed with `kek`, decrypted.
    fn open_all_sealed(dir: &Path, kek: &Key32) -> Vec<(PathBuf, Zeroizing<Vec<u8>>)> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let data = fs::read(&p).unwrap();
            if data.len() > KEYSTORE_HEADER_LEN && data.starts_with(KEYSTORE_MAGIC) {
                let (h, sealed) = data.split_at(KEYSTORE_HEADER_LEN);
                if let Ok(plain) = AeadKey::new(kek).open(h, sealed) {
                    out.push((p, Zeroizing::new(plain)));
                }
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// After destruction no file in the keystore's directory holds the
    /// material: not raw, not as hex, not inside any sealed keystore
    /// (current, backup, temp) opened with the keystore's own key; a
    /// restored backup, even a planted pre-destruction copy, leaves the key
    /// destroyed.
    #[test]
    fn destroyed_material_is_in_no_file_and_restore_cannot_bring_it_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let s = keyfile_secret();
        let mut ks = Keystore::create(&p, &s).unwrap();
        let id = ks
            .create_key_with(&["byok".into()], "", KeyOrigin::External, None)
            .unwrap();
        let material = [0xA5u8; 32];
        ks.import(&id, &material).unwrap();
        ks.schedule_deletion(&id, 7).unwrap();
        let kek = ks.kek.clone();
        let before = fs::read(&p).unwrap();
        // the pre-destruction file does hold it
        assert!(contains(&open_all_sealed(d.path(), &kek)[0].1, &material));
        // move the keystore clock past the waiting period
        ks.body.clock = kms_now() + 8 * 86400;
        ks.save().unwrap();
        drop(ks);
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert_eq!(ks.resolve(&id).unwrap().state, KeyState::Deleted);
        drop(ks);
        let check = |what: &str| {
            for e in fs::read_dir(d.path()).unwrap() {
                let f = e.unwrap().path();
                let data = fs::read(&f).unwrap();
                assert!(
                    !contains(&data, &material),
                    "{what}: raw in {}",
                    f.display()
                );
                let h = hex::encode(material);
                assert!(
                    !contains(&data, h.as_bytes()),
                    "{what}: hex in {}",
                    f.display()
                );
            }
            let sealed = open_all_sealed(d.path(), &kek);
            assert!(sealed.len() >= 2, "{what}: keystore and backup");
            for (f, plain) in &sealed {
                assert!(
                    !contains(plain, &material),
                    "{what}: material sealed in {}",
                    f.display()
                );
            }
        };
        check("after destruction");
        // restore-backup: still destroyed
        Keystore::restore_backup(&p, &s).unwrap();
        let ks = Keystore::open(&p, &s, false).unwrap();
        let k = ks.resolve(&id).unwrap();
        assert_eq!(k.state, KeyState::Deleted);
        assert!(k.versions.iter().all(|v| !v.has_material()));
        drop(ks);
        check("after restore-backup");
        // a planted pre-destruction copy as the backup
        fs::write(backup_path(&p), &before).unwrap();
        Keystore::restore_backup(&p, &s).unwrap();
        let ks = Keystore::open(&p, &s, false).unwrap();
        let k = ks.resolve(&id).unwrap();
        assert_eq!(k.state, KeyState::Deleted);
        assert!(k.versions.iter().all(|v| !v.has_material()));
        let log = fs::read_to_string(audit::log_path(&p)).unwrap();
        assert!(log.contains("stay destroyed"), "{log}");
        drop(ks);
        check("after restoring a planted copy");
        // a planted copy over the keystore itself is a rollback
        fs::write(&p, &before).unwrap();
        let e = Keystore::open(&p, &s, false).unwrap_err();
        assert!(matches!(e, KmsError::Rollback { .. }), "{e}");
        // accepting it keeps the key destroyed
        Keystore::accept_keystore(&p, &s).unwrap();
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert_eq!(ks.resolve(&id).unwrap().state, KeyState::Deleted);
        drop(ks);
        check("after accepting the planted copy");
    }

    #[test]
    fn rollback_is_refused_by_open_and_reload() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let s = keyfile_secret();
        let mut ks = Keystore::create(&p, &s).unwrap();
        let id = ks.create_key(&["photos".into()], "").unwrap();
        let old = fs::read(&p).unwrap();
        let old_rev = ks.revision();
        ks.disable(&id).unwrap();
        let new_rev = ks.revision();
        let watcher = Keystore::open(&p, &s, false).unwrap();
        drop(ks);
        // KEYSTORE.bak copied over the keystore to undo the disable
        fs::copy(backup_path(&p), &p).unwrap();
        assert_eq!(fs::read(&p).unwrap(), old);
        let e = Keystore::open(&p, &s, false).unwrap_err().to_string();
        assert!(
            e.contains(&format!("revision {old_rev}"))
                && e.contains(&format!("seen revision {new_rev}"))
                && e.contains("accept-keystore")
                && e.contains("restore-backup"),
            "{e}"
        );
        assert!(matches!(watcher.reload(), Err(KmsError::Rollback { .. })));
        // accepting it: audited, continues above the seen revision
        let (found, seen) = Keystore::accept_keystore(&p, &s).unwrap();
        assert_eq!((found, seen), (old_rev, Some(new_rev)));
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert!(ks.revision() > new_rev);
        assert_eq!(ks.resolve(&id).unwrap().state, KeyState::Enabled);
        assert!(fs::read_to_string(audit::log_path(&p))
            .unwrap()
            .contains("AcceptKeystore"));
        assert!(ks.verify_audit().is_ok());
        drop(ks);
        // restore-backup is the legitimate way back, and records the revision
        let mut ks = Keystore::open(&p, &s, true).unwrap();
        ks.disable(&id).unwrap();
        drop(ks);
        Keystore::restore_backup(&p, &s).unwrap();
        let ks = Keystore::open(&p, &s, false).unwrap();
        assert_eq!(ks.resolve(&id).unwrap().state, KeyState::Enabled);
        assert!(ks.verify_audit().is_ok());
    }

    #[test]
    fn a_new_keystore_at_the_same_path_is_not_a_rollback() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let mut ks = Keystore::create(&p, &keyfile_secret()).unwrap();
        for i in 0..5 {
            ks.create_key(&[format!("k{i}")], "").unwrap();
        }
        let seen_rev = ks.revision();
        drop(ks);
        for f in [p.clone(), backup_path(&p)] {
            fs::remove_file(f).unwrap();
        }
        let s2 = keyfile_secret();
        let ks = Keystore::create(&p, &s2).unwrap();
        assert!(ks.revision() > seen_rev);
        drop(ks);
        Keystore::open(&p, &s2, false).unwrap();
    }

    #[test]
    fn debug_never_prints_key_material() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let mut ks = Keystore::create(&p, &keyfile_secret()).unwrap();
        let id = ks
            .create_key_with(&["byok".into()], "", KeyOrigin::External, None)
            .unwrap();
        let material = [0x3Cu8; 32];
        ks.import(&id, &material).unwrap();
        let text = format!("{:?} {:?} {:?}", ks, ks.body, ks.keys());
        let dec = format!("{:?}", material.to_vec());
        assert!(
            !text.contains(&hex::encode(material)) && !text.contains("60, 60, 60"),
            "{text}"
        );
        assert!(!text.contains(&dec[1..20]));
        let ak = format!("{:?}", ks.body.audit_key.to_vec());
        assert!(
            !text.contains(&ak[1..ak.len() - 1]),
            "audit key printed: {text}"
        );
        assert!(text.contains("[redacted]"));
    }
}

/// Property tests of the keystore decoders: the header, the body of every
/// format version (also sealed by someone who knows the secret), and whole
/// files, over random and mutated input: an error, never a panic.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (tempfile::TempDir, PathBuf, KeystoreSecret, Vec<u8>, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks");
        let k = Key32::random();
        let s = KeystoreSecret::KeyFile(k.clone());
        let mut ks = Keystore::create(&p, &s).unwrap();
        let id = ks
            .create_key_with(&["x".into()], "d", KeyOrigin::External, None)
            .unwrap();
        ks.import(&id, &[1u8; 32]).unwrap();
        ks.schedule_deletion(&id, 7).unwrap();
        let n = postcard::experimental::serialized_size(&ks.body).unwrap();
        let mut plain = vec![0u8; n];
        postcard::to_slice(&ks.body, &mut plain).unwrap();
        drop(ks);
        let file = fs::read(&p).unwrap();
        (d, p, KeystoreSecret::KeyFile(k), file, plain)
    }

    fn mutate(mut b: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for &(i, x, kind) in edits {
            if b.is_empty() {
                b.push(x);
                continue;
            }
            let i = i % b.len();
            match kind % 4 {
                0 => b[i] ^= x | 1,
                1 => b.truncate(i),
                2 => b.insert(i, x),
                _ => {
                    b.remove(i);
                }
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn random_headers_and_bodies_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..400),
            version in 0u16..5,
        ) {
            let p = Path::new("/nonexistent/ks");
            let _ = KdfHeader::decode(p, &data);
            let _ = Keystore::decode_body(p, version, &data);
        }

        #[test]
        fn mutated_bodies_of_every_version_never_panic(
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        ) {
            thread_local!(static SAMPLE: (tempfile::TempDir, PathBuf, KeystoreSecret, Vec<u8>, Vec<u8>) = sample());
            SAMPLE.with(|(_, p, _, _, plain)| {
                let m = mutate(plain.clone(), &edits);
                for v in 1..=KEYSTORE_FORMAT_VERSION {
                    let _ = Keystore::decode_body(p, v, &m);
                }
            });
        }

        #[test]
        fn mutated_files_never_panic_and_never_open(
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        ) {
            thread_local!(static SAMPLE: (tempfile::TempDir, PathBuf, KeystoreSecret, Vec<u8>, Vec<u8>) = sample());
            SAMPLE.with(|(d, _, s, file, _)| {
                let m = mutate(file.clone(), &edits);
                let p = d.path().join("mutated");
                fs::write(&p, &m).unwrap();
                let r = Keystore::open(&p, s, false);
                // only an unchanged file opens
                assert!(r.is_err() || m == *file);
            });
        }
    }

    /// A body sealed by someone who knows the secret, with mutated
    /// content: opening it (which runs housekeeping on whatever parsed) is
    /// an error or a keystore, never a panic.
    #[test]
    fn sealed_mutated_bodies_never_panic_on_open() {
        let (d, _, s, file, plain) = sample();
        let kdf = KdfHeader::decode(Path::new("x"), &file).unwrap();
        let kek = kdf.derive_kek(Path::new("x"), &s).unwrap();
        let mut rng = proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        );
        for i in 0..300 {
            let mut edits = Vec::new();
            for _ in 0..(1 + i % 4) {
                edits.push((
                    rng.next_u64() as usize,
                    rng.next_u32() as u8,
                    rng.next_u32() as u8,
                ));
            }
            let m = mutate(plain.clone(), &edits);
            let header = kdf.encode();
            let mut out = header.clone();
            out.extend_from_slice(&AeadKey::new(&kek).seal(&header, &m));
            let p = d.path().join(format!("sealed-{i}"));
            fs::write(&p, &out).unwrap();
            let _ = Keystore::open(&p, &s, false);
        }
    }
}
