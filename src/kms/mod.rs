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

/// Magic bytes at the start of a keystore file.
pub const KEYSTORE_MAGIC: &[u8; 8] = b"SEALFSKS";
/// Current keystore file format version.
pub const KEYSTORE_FORMAT_VERSION: u16 = 1;
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
    #[error("alias '{0}' is already in use; choose another name")]
    AliasInUse(String),
    #[error("invalid alias '{0}': use 1-250 characters from A-Z a-z 0-9 / _ - (the name must not start with 'sealfs/', which is reserved)")]
    BadAlias(String),
    #[error("key {id} is {state:?}; enable it with `sealfs key enable {id}` before using it")]
    KeyNotUsable { id: String, state: KeyState },
    #[error("key {id} has no version {version}; the wrapped key was made by another keystore")]
    NoSuchVersion { id: String, version: u32 },
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
    /// Read a 32-byte key file (raw bytes, or 64 hex characters).
    pub fn from_key_file(path: &Path) -> Result<Self> {
        let data = Zeroizing::new(fs::read(path).map_err(|e| KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why: format!("cannot read it ({e}); check the path given with --key-file"),
        })?);
        if let Some(k) = Key32::from_slice(&data) {
            return Ok(KeystoreSecret::KeyFile(k));
        }
        let text = std::str::from_utf8(&data).unwrap_or("").trim();
        if text.len() == 64 {
            let mut raw = Zeroizing::new([0u8; 32]);
            if hex::decode_to_slice(text, &mut raw[..]).is_ok() {
                return Ok(KeystoreSecret::KeyFile(Key32::from_bytes(*raw)));
            }
        }
        Err(KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why: format!(
                "must hold exactly 32 raw bytes or 64 hex characters, found {} bytes",
                data.len()
            ),
        })
    }

    /// Read a passphrase from a file (first line, without the newline).
    pub fn from_passphrase_file(path: &Path) -> Result<Self> {
        let data = Zeroizing::new(fs::read_to_string(path).map_err(|e| KmsError::BadKeyFile {
            path: path.to_path_buf(),
            why: format!("cannot read passphrase file ({e})"),
        })?);
        let line = data.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(KmsError::BadKeyFile {
                path: path.to_path_buf(),
                why: "passphrase file is empty".into(),
            });
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
    Enabled,
    Disabled,
    PendingImport,
    PendingDeletion,
}

/// Where the key material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOrigin {
    /// Generated by sealfs.
    Generated,
    /// Imported by the user (bring your own key).
    External,
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
    material: [u8; 32],
}

impl std::fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyVersion(v{}, created {})", self.version, self.created)
    }
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
}

impl MasterKey {
    /// Newest version number.
    pub fn current_version(&self) -> u32 {
        self.versions.last().map(|v| v.version).unwrap_or(0)
    }
}

/// The decrypted body of the keystore.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeystoreBody {
    /// Incremented on every change.
    pub revision: u64,
    pub keys: Vec<MasterKey>,
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
    kind: u8,
    salt: [u8; 16],
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
}

impl KdfHeader {
    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(KEYSTORE_HEADER_LEN);
        h.extend_from_slice(KEYSTORE_MAGIC);
        h.extend_from_slice(&KEYSTORE_FORMAT_VERSION.to_le_bytes());
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
        if version != KEYSTORE_FORMAT_VERSION {
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
            (KDF_KEYFILE, KeystoreSecret::KeyFile(k)) => {
                let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.salt), k.as_bytes());
                let mut out = Zeroizing::new([0u8; 32]);
                hk.expand(b"sealfs keystore kek v1", &mut out[..])
                    .expect("valid length");
                Ok(Key32::from_bytes(*out))
            }
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
/// written back atomically with [`Keystore::save`].
pub struct Keystore {
    path: PathBuf,
    kdf: KdfHeader,
    kek: Key32,
    body: KeystoreBody,
    _lock: Option<File>,
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
        let kdf = match secret {
            KeystoreSecret::Passphrase(_) => KdfHeader {
                kind: KDF_ARGON2ID,
                salt: crypto::random_bytes(),
                m_cost: ARGON2_M_COST_KIB,
                t_cost: ARGON2_T_COST,
                p_cost: ARGON2_P_COST,
            },
            KeystoreSecret::KeyFile(_) => KdfHeader {
                kind: KDF_KEYFILE,
                salt: crypto::random_bytes(),
                m_cost: 0,
                t_cost: 0,
                p_cost: 0,
            },
        };
        let kek = kdf.derive_kek(path, secret)?;
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body: KeystoreBody::default(),
            _lock: Some(lock),
        };
        ks.ensure_service_keys();
        ks.save()?;
        Ok(ks)
    }

    /// Open and unlock an existing keystore. With `for_update`, an exclusive
    /// lock is held until the keystore is dropped, so that concurrent
    /// `sealfs key` commands never lose each other's changes.
    pub fn open(path: &Path, secret: &KeystoreSecret, for_update: bool) -> Result<Keystore> {
        if !path.exists() {
            return Err(KmsError::NotFound(path.to_path_buf()));
        }
        let lock = if for_update {
            Some(take_lock(path)?)
        } else {
            None
        };
        let data = fs::read(path).map_err(io_err(path))?;
        let kdf = KdfHeader::decode(path, &data)?;
        let kek = kdf.derive_kek(path, secret)?;
        let (header, sealed) = data.split_at(KEYSTORE_HEADER_LEN);
        let plain = Zeroizing::new(
            AeadKey::new(&kek)
                .open(header, sealed)
                .map_err(|_| KmsError::WrongSecret(path.to_path_buf()))?,
        );
        let body: KeystoreBody = postcard::from_bytes(&plain).map_err(|e| KmsError::Corrupt {
            path: path.to_path_buf(),
            why: format!("body does not parse: {e}"),
        })?;
        let mut ks = Keystore {
            path: path.to_path_buf(),
            kdf,
            kek,
            body,
            _lock: lock,
        };
        if for_update && ks.ensure_service_keys() {
            ks.save()?;
        }
        Ok(ks)
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

    /// Ensure the service-managed keys exist; returns true if it added any.
    fn ensure_service_keys(&mut self) -> bool {
        let mut changed = false;
        for (alias, desc) in [
            (
                SERVICE_KEY_ALIAS,
                "sealfs service key: seals volume metadata",
            ),
            (
                DEFAULT_CONTENT_KEY_ALIAS,
                "sealfs default content key (service managed)",
            ),
        ] {
            if self.resolve(alias).is_err() {
                let now = now_secs();
                self.body.keys.push(MasterKey {
                    id: new_key_id(),
                    aliases: vec![alias.to_string()],
                    description: desc.to_string(),
                    state: KeyState::Enabled,
                    origin: KeyOrigin::Generated,
                    manager: KeyManager::Service,
                    created: now,
                    versions: vec![KeyVersion {
                        version: 1,
                        created: now,
                        material: *Key32::random().as_bytes(),
                    }],
                });
                changed = true;
            }
        }
        changed
    }

    /// Write the keystore atomically: temp file, fsync, rename, fsync dir.
    /// The previous file is kept as `<path>.bak`.
    pub fn save(&mut self) -> Result<()> {
        self.body.revision += 1;
        let header = self.kdf.encode();
        let plain = Zeroizing::new(postcard::to_stdvec(&self.body).expect("serializable"));
        let sealed = AeadKey::new(&self.kek).seal(&header, &plain);
        let mut out = header;
        out.extend_from_slice(&sealed);
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&out).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        if self.path.exists() {
            let mut bak = self.path.as_os_str().to_owned();
            bak.push(".bak");
            let _ = fs::copy(&self.path, PathBuf::from(bak));
        }
        fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        Ok(())
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
        self.body
            .keys
            .iter()
            .find(|k| k.id == name || k.aliases.contains(&want_alias))
            .ok_or_else(|| KmsError::UnknownKey(name.to_string()))
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

    /// Create a new customer-managed key with generated material.
    pub fn create_key(&mut self, aliases: &[String], description: &str) -> Result<String> {
        let mut full = Vec::new();
        for a in aliases {
            let name = a.strip_prefix("alias/").unwrap_or(a);
            let ok = !name.is_empty()
                && name.len() <= 250
                && !name.starts_with("sealfs/")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
            if !ok {
                return Err(KmsError::BadAlias(a.clone()));
            }
            let fa = format!("alias/{name}");
            if self.resolve(&fa).is_ok() || full.contains(&fa) {
                return Err(KmsError::AliasInUse(fa));
            }
            full.push(fa);
        }
        let now = now_secs();
        let id = new_key_id();
        self.body.keys.push(MasterKey {
            id: id.clone(),
            aliases: full,
            description: description.to_string(),
            state: KeyState::Enabled,
            origin: KeyOrigin::Generated,
            manager: KeyManager::Customer,
            created: now,
            versions: vec![KeyVersion {
                version: 1,
                created: now,
                material: *Key32::random().as_bytes(),
            }],
        });
        self.save()?;
        Ok(id)
    }

    /// Set a customer key's state (used by tests and by `key enable/disable`).
    pub fn set_state(&mut self, name: &str, state: KeyState) -> Result<()> {
        let k = self.resolve_mut(name)?;
        if k.manager == KeyManager::Service {
            return Err(KmsError::Refused(format!(
                "key {} is managed by sealfs; its state cannot be changed",
                k.id
            )));
        }
        k.state = state;
        self.save()
    }

    /// Wrap `data_key` under the newest version of master key `name`.
    pub fn wrap(
        &self,
        name: &str,
        ctx: &EncryptionContext,
        data_key: &Key32,
    ) -> Result<WrappedKey> {
        let k = self.resolve(name)?;
        if k.state != KeyState::Enabled {
            return Err(KmsError::KeyNotUsable {
                id: k.id.clone(),
                state: k.state,
            });
        }
        let v = k.versions.last().ok_or_else(|| KmsError::KeyNotUsable {
            id: k.id.clone(),
            state: k.state,
        })?;
        let mk = Key32::from_bytes(v.material);
        let sealed = AeadKey::new(&mk).seal(&wrap_ad(&k.id, v.version, ctx), data_key.as_bytes());
        Ok(WrappedKey {
            key_id: k.id.clone(),
            key_version: v.version,
            sealed,
        })
    }

    /// Unwrap a data key; the encryption context must match the one used to wrap.
    pub fn unwrap(&self, w: &WrappedKey, ctx: &EncryptionContext) -> Result<Key32> {
        let k = self
            .body
            .keys
            .iter()
            .find(|k| k.id == w.key_id)
            .ok_or_else(|| KmsError::UnknownKey(w.key_id.clone()))?;
        if k.state != KeyState::Enabled {
            return Err(KmsError::KeyNotUsable {
                id: k.id.clone(),
                state: k.state,
            });
        }
        let v = k
            .versions
            .iter()
            .find(|v| v.version == w.key_version)
            .ok_or_else(|| KmsError::NoSuchVersion {
                id: k.id.clone(),
                version: w.key_version,
            })?;
        let mk = Key32::from_bytes(v.material);
        let plain = Zeroizing::new(
            AeadKey::new(&mk)
                .open(&wrap_ad(&k.id, v.version, ctx), &w.sealed)
                .map_err(|_| KmsError::UnwrapFailed {
                    id: k.id.clone(),
                    version: v.version,
                    purpose: ctx.get("purpose").cloned().unwrap_or_default(),
                })?,
        );
        Key32::from_slice(&plain).ok_or_else(|| KmsError::UnwrapFailed {
            id: k.id.clone(),
            version: v.version,
            purpose: ctx.get("purpose").cloned().unwrap_or_default(),
        })
    }
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
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw");
        generate_key_file(&raw).unwrap();
        assert!(generate_key_file(&raw).is_err());
        assert!(KeystoreSecret::from_key_file(&raw).is_ok());
        let hexf = d.path().join("hex");
        fs::write(&hexf, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(KeystoreSecret::from_key_file(&hexf).is_ok());
        let short = d.path().join("short");
        fs::write(&short, b"abc").unwrap();
        let e = KeystoreSecret::from_key_file(&short).err().unwrap();
        assert!(e.to_string().contains("32 raw bytes"));
        assert!(KeystoreSecret::from_key_file(&d.path().join("missing")).is_err());
    }
}
