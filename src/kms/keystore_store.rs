//! The keystore's custom key stores (PKCS#11 tokens) and the keys that live
//! in them: records, connection state, availability, and the wrap, unwrap,
//! rotate and destroy operations the token carries out. Every operation and
//! every failure is audited; no PIN or key material is ever in an error.

use std::path::Path;

use super::pkcs11::{self, HsmObject, KeyStore};
use super::{
    wrap_ad, EncryptionContext, KeyManager, KeyOrigin, KeyState, KeyVersion, Keystore, KmsError,
    MasterKey, Rec, Result, WrappedKey,
};
use crate::crypto::Key32;

/// Whether a key store's keys can be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreStatus {
    Connected,
    /// Unavailable, with the reason (a sentence fragment after "key store NAME").
    Unavailable(String),
}

fn check_store_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KmsError::Refused(format!(
            "invalid key store name '{name}': use 1-64 characters from A-Z a-z 0-9 _ -"
        )))
    }
}

fn object_fingerprint(obj: &HsmObject) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"sealfs-hsm-object-v1\0");
    h.update(obj.store.as_bytes());
    h.update([0]);
    h.update(obj.label.as_bytes());
    h.update([0]);
    h.update(&obj.id);
    h.finalize().into()
}

impl Keystore {
    /// All key stores.
    pub fn key_stores(&self) -> &[KeyStore] {
        &self.body.key_stores
    }

    /// The token objects of key `id` (one per version).
    pub fn hsm_objects_of(&self, id: &str) -> Vec<&HsmObject> {
        self.body
            .hsm_objects
            .iter()
            .filter(|o| o.key_id == id)
            .collect()
    }

    fn store(&self, name: &str) -> Result<&KeyStore> {
        self.body
            .key_stores
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| KmsError::UnknownKeyStore(name.to_string()))
    }

    /// Whether the key store can be used now (connected, token present,
    /// PIN accepted). `cached`: reuse a probe at most a second old.
    pub fn store_status(&self, store: &KeyStore, cached: bool) -> StoreStatus {
        if !store.connected {
            return StoreStatus::Unavailable(format!(
                "is disconnected (`sealfs key-store connect {}`)",
                store.name
            ));
        }
        let r = if cached {
            pkcs11::probe_cached(store)
        } else {
            pkcs11::probe(store)
        };
        match r {
            Ok(()) => StoreStatus::Connected,
            Err(e) => StoreStatus::Unavailable(format!("cannot be used: {e}")),
        }
    }

    /// For a key in a key store: None when usable (or not in a key store),
    /// else why it is Unavailable. What `key list/describe` show.
    pub fn availability(&self, k: &MasterKey) -> Option<String> {
        if k.origin != KeyOrigin::Hsm || k.state == KeyState::Deleted {
            return None;
        }
        match self.hsm_store_of(k) {
            Err(e) => Some(e.to_string()),
            Ok(s) => match self.store_status(s, true) {
                StoreStatus::Connected => None,
                StoreStatus::Unavailable(r) => Some(format!("key store {} {r}", s.name)),
            },
        }
    }

    /// The key store of an HSM key.
    pub fn hsm_store_name(&self, k: &MasterKey) -> Option<String> {
        self.body
            .hsm_objects
            .iter()
            .find(|o| o.key_id == k.id)
            .map(|o| o.store.clone())
    }

    fn hsm_store_of(&self, k: &MasterKey) -> Result<&KeyStore> {
        let name = self
            .hsm_store_name(k)
            .ok_or_else(|| KmsError::Refused(format!("key {} has no token object", k.id)))?;
        self.store(&name).map_err(|_| KmsError::Unavailable {
            id: k.id.clone(),
            store: name.clone(),
            reason: "no longer exists".into(),
        })
    }

    fn hsm_object(&self, id: &str, version: u32) -> Option<&HsmObject> {
        self.body
            .hsm_objects
            .iter()
            .find(|o| o.key_id == id && o.version == version)
    }

    pub(super) fn is_hsm_key(&self, id: &str) -> bool {
        self.body
            .keys
            .iter()
            .any(|k| k.id == id && k.origin == KeyOrigin::Hsm)
    }

    pub(super) fn hsm_detail(&self, id: &str, version: u32) -> Option<String> {
        self.hsm_object(id, version).map(|o| {
            format!(
                "in key store {} (token object '{}', AES-GCM in the token)",
                o.store, o.label
            )
        })
    }

    /// Can version `version` of HSM key `k` be used now? (Usable state is
    /// checked by the caller.)
    pub(super) fn hsm_usable(&self, k: &MasterKey, version: u32) -> Result<()> {
        let obj = self
            .hsm_object(&k.id, version)
            .ok_or_else(|| KmsError::NoSuchVersion {
                id: k.id.clone(),
                version,
            })?;
        if obj.destroyed {
            return Err(KmsError::MaterialDeleted {
                id: k.id.clone(),
                version,
            });
        }
        let store = self.hsm_store_of(k)?;
        match self.store_status(store, true) {
            StoreStatus::Connected => Ok(()),
            StoreStatus::Unavailable(reason) => Err(KmsError::Unavailable {
                id: k.id.clone(),
                store: store.name.clone(),
                reason,
            }),
        }
    }

    pub(super) fn wrap_hsm(
        &self,
        op: &str,
        k: &MasterKey,
        ctx: &EncryptionContext,
        data_key: &Key32,
    ) -> Result<WrappedKey> {
        let v = k.current_version();
        let checked = if k.state != KeyState::Enabled {
            Err(k.unusable())
        } else {
            self.hsm_usable(k, v)
        };
        let r = checked.and_then(|()| {
            let obj = self.hsm_object(&k.id, v).expect("checked");
            let store = self.hsm_store_of(k)?;
            pkcs11::seal(store, obj, &wrap_ad(&k.id, v, ctx), data_key.as_bytes()).map_err(
                |reason| KmsError::Unavailable {
                    id: k.id.clone(),
                    store: store.name.clone(),
                    reason: format!("cannot be used: {reason}"),
                },
            )
        });
        let rec = Rec {
            op,
            key: Some((&k.id, Some(v))),
            ctx: Some(ctx),
        };
        match r {
            Ok(sealed) => {
                self.audit_read(rec, "ok", self.hsm_detail(&k.id, v))?;
                Ok(WrappedKey {
                    key_id: k.id.clone(),
                    key_version: v,
                    sealed,
                })
            }
            Err(e) => {
                self.audit_read(rec, "denied", Some(e.to_string()))?;
                Err(e)
            }
        }
    }

    pub(super) fn unwrap_hsm(
        &self,
        k: &MasterKey,
        w: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<Key32> {
        let obj = self.hsm_object(&k.id, w.key_version).expect("checked");
        let store = self.hsm_store_of(k)?;
        let fail = || KmsError::UnwrapFailed {
            id: k.id.clone(),
            version: w.key_version,
            purpose: ctx.get("purpose").cloned().unwrap_or_default(),
        };
        match pkcs11::open_sealed(store, obj, &wrap_ad(&k.id, w.key_version, ctx), &w.sealed) {
            Ok(Some(plain)) => Key32::from_slice(&plain).ok_or_else(fail),
            Ok(None) => Err(fail()),
            Err(reason) => Err(KmsError::Unavailable {
                id: k.id.clone(),
                store: store.name.clone(),
                reason: format!("cannot be used: {reason}"),
            }),
        }
    }

    /// Generate the token object of version `v` of HSM key `id` (audited
    /// on failure; the caller records success).
    pub(super) fn rotate_hsm(&mut self, id: &str, v: u32, now: u64) -> Result<()> {
        let k = self.body.keys.iter().find(|k| k.id == id).expect("target");
        let store = match self.hsm_store_of(k) {
            Ok(s) => s.clone(),
            Err(e) => return self.deny("RotateKey", Some(id), e),
        };
        let obj = match self.new_token_object(&store, id, v) {
            Ok(o) => o,
            Err(e) => return self.deny("RotateKey", Some(id), e),
        };
        let fp = object_fingerprint(&obj);
        self.body.hsm_objects.push(obj);
        let k = self.get_mut(id);
        k.versions.push(KeyVersion::in_token(v, now, fp));
        Ok(())
    }

    fn new_token_object(&self, store: &KeyStore, id: &str, v: u32) -> Result<HsmObject> {
        if let StoreStatus::Unavailable(reason) = self.store_status(store, false) {
            return Err(KmsError::Unavailable {
                id: id.to_string(),
                store: store.name.clone(),
                reason,
            });
        }
        let label = format!("sealfs-{id}-v{v}");
        let oid = pkcs11::generate(store, &label).map_err(|reason| KmsError::Unavailable {
            id: id.to_string(),
            store: store.name.clone(),
            reason: format!("cannot be used: {reason}"),
        })?;
        Ok(HsmObject {
            key_id: id.to_string(),
            version: v,
            store: store.name.clone(),
            label,
            id: oid,
            destroyed: false,
        })
    }

    /// `key create --key-store NAME`: an AES-256 key generated in the token.
    pub fn create_hsm_key(
        &mut self,
        aliases: &[String],
        description: &str,
        store_name: &str,
    ) -> Result<String> {
        let mut full = Vec::new();
        for a in aliases {
            let fa = self.check_alias(a, &full)?;
            full.push(fa);
        }
        let store = match self.store(store_name) {
            Ok(s) => s.clone(),
            Err(e) => return self.deny("CreateKey", None, e),
        };
        let now = self.now();
        let id = super::new_key_id();
        let obj = match self.new_token_object(&store, &id, 1) {
            Ok(o) => o,
            Err(e) => return self.deny("CreateKey", None, e),
        };
        let detail = format!(
            "origin Hsm: AES-256 generated in key store {} (token '{}', object '{}', sensitive, not extractable)",
            store.name, store.token_label, obj.label
        );
        let fp = object_fingerprint(&obj);
        self.body.hsm_objects.push(obj);
        self.body.keys.push(MasterKey {
            id: id.clone(),
            aliases: full,
            description: description.to_string(),
            state: KeyState::Enabled,
            origin: KeyOrigin::Hsm,
            manager: KeyManager::Customer,
            created: now,
            versions: vec![KeyVersion::in_token(1, now, fp)],
            rotation_days: None,
            deletion_date: None,
            deleted: None,
        });
        self.record(
            Rec {
                op: "CreateKey",
                key: Some((&id, Some(1))),
                ctx: None,
            },
            "ok",
            Some(detail),
        )?;
        self.save()?;
        Ok(id)
    }

    /// Destroy the token objects of a deleted HSM key (C_DestroyObject),
    /// auditing each; objects that cannot be reached now stay recorded and
    /// are destroyed when their key store is connected again.
    pub(super) fn destroy_token_objects(&mut self, id: &str) -> Result<()> {
        let pending: Vec<HsmObject> = self
            .body
            .hsm_objects
            .iter()
            .filter(|o| o.key_id == id && !o.destroyed)
            .cloned()
            .collect();
        for obj in pending {
            let r = match self.store(&obj.store) {
                Err(e) => Err(e.to_string()),
                Ok(s) if !s.connected => Err(format!("key store {} is disconnected", s.name)),
                Ok(s) => pkcs11::destroy(s, &obj),
            };
            let rec = Rec {
                op: "DestroyTokenObject",
                key: Some((id, Some(obj.version))),
                ctx: None,
            };
            match r {
                Ok(()) => {
                    for o in &mut self.body.hsm_objects {
                        if o.key_id == obj.key_id && o.version == obj.version {
                            o.destroyed = true;
                        }
                    }
                    self.record(
                        rec,
                        "ok",
                        Some(format!(
                            "C_DestroyObject: token object '{}' destroyed in key store {}",
                            obj.label, obj.store
                        )),
                    )?;
                }
                Err(e) => self.record(
                    rec,
                    "error",
                    Some(format!(
                        "token object '{}' could not be destroyed now ({e}); retried when key store {} is connected",
                        obj.label, obj.store
                    )),
                )?,
            }
        }
        Ok(())
    }

    fn store_rec(&self, op: &str) -> Rec<'static> {
        let _ = self;
        Rec {
            op: match op {
                "CreateKeyStore" => "CreateKeyStore",
                "ConnectKeyStore" => "ConnectKeyStore",
                "DisconnectKeyStore" => "DisconnectKeyStore",
                "DeleteKeyStore" => "DeleteKeyStore",
                _ => "DescribeKeyStores",
            },
            key: None,
            ctx: None,
        }
    }

    fn store_fail<T>(&mut self, op: &str, name: &str, e: KmsError) -> Result<T> {
        let r = self.store_rec(op);
        self.record(r, "error", Some(format!("key store {name}: {e}")))?;
        Err(e)
    }

    /// `key-store create`: record a token after checking that the module
    /// loads, the token is there and the PIN logs in.
    pub fn key_store_create(
        &mut self,
        name: &str,
        module: &Path,
        token_label: &str,
        pin_file: &Path,
    ) -> Result<()> {
        const OP: &str = "CreateKeyStore";
        if let Err(e) = check_store_name(name) {
            return self.store_fail(OP, name, e);
        }
        if self.body.key_stores.iter().any(|s| s.name == name) {
            let e = KmsError::Refused(format!("key store {name} already exists"));
            return self.store_fail(OP, name, e);
        }
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let store = KeyStore {
            name: name.to_string(),
            module: abs(module),
            token_label: token_label.to_string(),
            pin_file: abs(pin_file),
            connected: true,
            created: self.now(),
        };
        if let Err(e) = pkcs11::probe(&store) {
            let e = KmsError::Refused(format!("cannot create key store {name}: {e}"));
            return self.store_fail(OP, name, e);
        }
        let detail = format!(
            "key store {name}: module {}, token '{}'",
            store.module.display(),
            store.token_label
        );
        self.body.key_stores.push(store);
        let r = self.store_rec(OP);
        self.record(r, "ok", Some(detail))?;
        self.save()
    }

    /// `key-store list`/`describe` (audited as DescribeKeyStores).
    pub fn key_store_statuses(&self, name: Option<&str>) -> Result<Vec<(KeyStore, StoreStatus)>> {
        let r = self.store_rec("DescribeKeyStores");
        let out: Result<Vec<_>> = match name {
            Some(n) => self
                .store(n)
                .map(|s| vec![(s.clone(), self.store_status(s, false))]),
            None => Ok(self
                .body
                .key_stores
                .iter()
                .map(|s| (s.clone(), self.store_status(s, false)))
                .collect()),
        };
        let detail = match &out {
            Ok(v) => Some(
                v.iter()
                    .map(|(s, st)| match st {
                        StoreStatus::Connected => format!("{}: connected", s.name),
                        StoreStatus::Unavailable(r) => format!("{}: unavailable, {r}", s.name),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Err(e) => Some(e.to_string()),
        };
        self.audit_read(r, if out.is_ok() { "ok" } else { "error" }, detail)?;
        out
    }

    /// `key-store connect`: the token must be reachable with the PIN.
    /// Token objects of deleted keys left over are destroyed now.
    pub fn key_store_connect(&mut self, name: &str) -> Result<()> {
        const OP: &str = "ConnectKeyStore";
        let mut s = match self.store(name) {
            Ok(s) => s.clone(),
            Err(e) => return self.store_fail(OP, name, e),
        };
        s.connected = true;
        if let Err(e) = pkcs11::probe(&s) {
            let e = KmsError::Refused(format!("cannot connect key store {name}: {e}"));
            return self.store_fail(OP, name, e);
        }
        for st in &mut self.body.key_stores {
            if st.name == name {
                st.connected = true;
            }
        }
        let r = self.store_rec(OP);
        self.record(r, "ok", Some(format!("key store {name} connected")))?;
        let leftover: Vec<String> = self
            .body
            .keys
            .iter()
            .filter(|k| k.state == KeyState::Deleted)
            .filter(|k| {
                self.body
                    .hsm_objects
                    .iter()
                    .any(|o| o.key_id == k.id && o.store == name && !o.destroyed)
            })
            .map(|k| k.id.clone())
            .collect();
        for id in leftover {
            self.destroy_token_objects(&id)?;
        }
        self.save()
    }

    /// `key-store disconnect`: its keys become Unavailable.
    pub fn key_store_disconnect(&mut self, name: &str) -> Result<()> {
        const OP: &str = "DisconnectKeyStore";
        if let Err(e) = self.store(name) {
            return self.store_fail(OP, name, e);
        }
        for st in &mut self.body.key_stores {
            if st.name == name {
                st.connected = false;
            }
        }
        let r = self.store_rec(OP);
        self.record(
            r,
            "ok",
            Some(format!(
                "key store {name} disconnected: its keys are Unavailable"
            )),
        )?;
        self.save()
    }

    /// `key-store delete`: refused while a key in it is not Deleted.
    pub fn key_store_delete(&mut self, name: &str) -> Result<()> {
        const OP: &str = "DeleteKeyStore";
        if let Err(e) = self.store(name) {
            return self.store_fail(OP, name, e);
        }
        let live: Vec<String> = self
            .body
            .keys
            .iter()
            .filter(|k| k.state != KeyState::Deleted)
            .filter(|k| self.hsm_store_name(k).as_deref() == Some(name))
            .map(|k| k.label())
            .collect();
        if !live.is_empty() {
            let e = KmsError::Refused(format!(
                "key store {name} still holds keys that are not deleted: {}; schedule their deletion first (`sealfs key schedule-deletion KEY`)",
                live.join(", ")
            ));
            return self.store_fail(OP, name, e);
        }
        self.body.key_stores.retain(|s| s.name != name);
        let r = self.store_rec(OP);
        self.record(r, "ok", Some(format!("key store {name} deleted")))?;
        self.save()
    }
}
