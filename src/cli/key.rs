//! `sealfs key ...`: the key-management commands.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Subcommand, ValueEnum};

use super::{fmt_time, open_keystore, open_or_create_keystore, secret, Global};
use crate::kms::{
    self, audit, KeyManager, KeyOrigin, KeyState, Keystore, KeystoreSecret, MasterKey,
};

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a master key and print its id
    ///
    /// Example: sealfs key create --alias photos --description "family photos" --rotation-period 365
    Create {
        /// Alias (repeatable); "photos" becomes alias/photos
        #[arg(long)]
        alias: Vec<String>,
        /// Free-text description
        #[arg(long, default_value = "")]
        description: String,
        /// generated: sealfs makes the material; external: you import it
        /// later with `sealfs key import` (the key is PendingImport until then)
        #[arg(long, value_enum, default_value_t = Origin::Generated)]
        origin: Origin,
        /// Rotate automatically every DAYS days (generated keys only)
        #[arg(long, value_name = "DAYS")]
        rotation_period: Option<u32>,
        /// Generate the key inside this custom key store's token (see
        /// `sealfs key-store`); its material never leaves the token
        #[arg(long, value_name = "NAME", conflicts_with_all = ["origin", "rotation_period"])]
        key_store: Option<String>,
    },
    /// List keys
    ///
    /// Example: sealfs key list --json
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one key: id, aliases, state, origin, versions, rotation, deletion
    ///
    /// Example: sealfs key describe alias/photos
    Describe {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Enable a Disabled key so it can wrap and unwrap data keys again;
    /// mounted volumes regain access within seconds
    ///
    /// Example: sealfs key enable alias/photos
    Enable { key: String },
    /// Disable a key: mounting volumes it protects is refused, and mounted
    /// ones lose access to file content within 5 seconds (service-managed
    /// keys cannot be disabled)
    ///
    /// Example: sealfs key disable alias/photos
    Disable { key: String },
    /// Schedule a key's deletion: it refuses all use now, and its material
    /// is destroyed after the waiting period, making everything it protects
    /// permanently unreadable
    ///
    /// Example: sealfs key schedule-deletion alias/old --pending-days 7
    ScheduleDeletion {
        key: String,
        /// Waiting period in days (7-30)
        #[arg(long, default_value_t = 30)]
        pending_days: u32,
    },
    /// Cancel a scheduled deletion; the key becomes Disabled
    ///
    /// Example: sealfs key cancel-deletion alias/old
    CancelDeletion { key: String },
    /// Import material for a key created with --origin external (or bring
    /// back deleted material, which must be identical)
    ///
    /// Example: sealfs key import alias/byok --material key.bin
    Import {
        key: String,
        /// File with 32 raw bytes or 64 hex characters
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
    },
    /// Delete an imported key's material: it is unusable (PendingImport)
    /// until the same material is imported again
    ///
    /// Example: sealfs key delete-material alias/byok
    DeleteMaterial { key: String },
    /// Add a new key version now; new wraps use it, old versions still
    /// unwrap (imported keys need --material with new material)
    ///
    /// Example: sealfs key rotate alias/photos
    Rotate {
        key: String,
        /// New material for an imported key (32 raw bytes or 64 hex)
        #[arg(long, value_name = "FILE")]
        material: Option<PathBuf>,
    },
    /// Turn automatic rotation on or off
    #[command(subcommand)]
    Rotation(RotationCmd),
    /// Manage aliases (one key may have several; an alias names one key)
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Re-seal the keystore under a new passphrase or key file (atomic; the
    /// previous file is kept as KEYSTORE.bak)
    ///
    /// Example: sealfs key change-passphrase --new-key-file /etc/sealfs/new.key --generate
    ChangePassphrase {
        /// Switch to (or change) a key file at this path
        #[arg(long, value_name = "PATH", conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// With --new-key-file: write a new random key file there first
        #[arg(long, requires = "new_key_file")]
        generate: bool,
        /// Read the new passphrase from the first line of this file
        /// (default: ask twice on the terminal)
        #[arg(long, value_name = "PATH")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Bring back the previous keystore version (KEYSTORE.bak); the current
    /// one becomes the backup. Needs the secret the backup was sealed with.
    ///
    /// Example: sealfs key restore-backup
    RestoreBackup,
    /// Accept the keystore file as it is although this machine has seen a
    /// newer revision of it (it was replaced by an older copy), or although
    /// the local record of its revision is damaged. Audited as
    /// AcceptKeystore; keys destroyed before stay destroyed. Prefer
    /// `restore-backup` to go back to the previous version.
    ///
    /// Example: sealfs key accept-keystore
    AcceptKeystore,
    /// Show or verify the audit log of every keystore operation
    ///
    /// Example: sealfs key audit --key alias/photos --since 2026-11-01
    Audit {
        /// Only entries about this key
        #[arg(long)]
        key: Option<String>,
        /// Only entries at or after this time (YYYY-MM-DD, RFC 3339, or
        /// seconds since the epoch)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
        /// Check the MAC chain; names the first edited, removed or
        /// reordered entry and exits non-zero
        #[arg(long)]
        verify: bool,
    },
    /// Client-side encryption: data keys, encrypt, decrypt, re-encrypt
    #[command(flatten)]
    Data(super::key_data::DataCmd),
}

#[derive(Subcommand, Debug)]
pub enum RotationCmd {
    /// Rotate automatically every --period days (checked at every keystore use)
    ///
    /// Example: sealfs key rotation enable alias/photos --period 90
    Enable {
        key: String,
        #[arg(long, value_name = "DAYS", default_value_t = kms::DEFAULT_ROTATION_DAYS)]
        period: u32,
    },
    /// Stop automatic rotation
    ///
    /// Example: sealfs key rotation disable alias/photos
    Disable { key: String },
}

#[derive(Subcommand, Debug)]
pub enum AliasCmd {
    /// Give a key another alias
    ///
    /// Example: sealfs key alias create photos-2026 alias/photos
    Create { alias: String, key: String },
    /// Remove an alias (the key stays)
    ///
    /// Example: sealfs key alias delete photos-2026
    Delete { alias: String },
    /// List aliases and the keys they name
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Origin {
    Generated,
    External,
}

/// The state shown to users: `Unavailable` for a usable key whose key
/// store cannot be used now, with the reason.
pub(super) fn shown_state(ks: &Keystore, k: &MasterKey) -> (String, Option<String>) {
    match (k.state, ks.availability(k)) {
        (KeyState::Enabled, Some(r)) => ("Unavailable".into(), Some(r)),
        (st, r) => (st.to_string(), r),
    }
}

fn origin_text(ks: &Keystore, k: &MasterKey) -> String {
    match (k.origin, ks.hsm_store_name(k)) {
        (KeyOrigin::Hsm, Some(s)) => format!("HSM ({s})"),
        (o, _) => format!("{o:?}"),
    }
}

pub fn key_json_in(ks: &Keystore, k: &MasterKey) -> serde_json::Value {
    let mut v = key_json(k);
    let (state, reason) = shown_state(ks, k);
    v["state"] = state.into();
    if k.origin == KeyOrigin::Hsm {
        v["unavailable_reason"] = reason.into();
        v["key_store"] = ks.hsm_store_name(k).into();
        let objs = ks.hsm_objects_of(&k.id);
        if let Some(vs) = v["versions"].as_array_mut() {
            for x in vs {
                let n = x["version"].as_u64().unwrap_or(0) as u32;
                if let Some(o) = objs.iter().find(|o| o.version == n) {
                    x["material"] = if o.destroyed {
                        "destroyed in the token"
                    } else {
                        "in the token"
                    }
                    .into();
                    x["token_object_label"] = o.label.clone().into();
                    x["token_object_id"] = hex::encode(&o.id).into();
                }
            }
        }
    }
    v
}

pub fn key_json(k: &MasterKey) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "aliases": k.aliases,
        "description": k.description,
        "state": k.state.to_string(),
        "origin": format!("{:?}", k.origin),
        "manager": format!("{:?}", k.manager),
        "created": fmt_time(k.created),
        "current_version": k.current_version(),
        "rotation_period_days": k.rotation_days,
        "deletion_date": k.deletion_date.map(fmt_time),
        "deleted": k.deleted.map(fmt_time),
        "versions": k.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "created": fmt_time(v.created),
            "material": if v.has_material() { "present" } else { "deleted" },
        })).collect::<Vec<_>>(),
    })
}

fn print_key(ks: &Keystore, k: &MasterKey) {
    println!("Key id:       {}", k.id);
    println!(
        "Aliases:      {}",
        if k.aliases.is_empty() {
            "-".into()
        } else {
            k.aliases.join(", ")
        }
    );
    println!("Description:  {}", k.description);
    let extra = match (k.state, k.deletion_date, k.deleted) {
        (KeyState::PendingDeletion, Some(d), _) => {
            format!(" (material destroyed on {})", fmt_time(d))
        }
        (KeyState::Deleted, _, Some(d)) => format!(" (material destroyed on {})", fmt_time(d)),
        _ => String::new(),
    };
    let (state, reason) = shown_state(ks, k);
    println!("State:        {state}{extra}");
    if let Some(r) = reason {
        println!("Unavailable:  {r}");
    }
    println!("Origin:       {}", origin_text(ks, k));
    println!(
        "Managed by:   {}",
        if k.manager == KeyManager::Service {
            "sealfs (service)"
        } else {
            "customer"
        }
    );
    println!("Created:      {}", fmt_time(k.created));
    println!(
        "Rotation:     {}",
        match k.rotation_days {
            Some(d) => format!("every {d} days"),
            None if k.origin == KeyOrigin::External => "on demand, with new material".into(),
            None => "on demand".into(),
        }
    );
    println!(
        "Versions:     {} (current v{})",
        k.versions.len(),
        k.current_version()
    );
    let objs = ks.hsm_objects_of(&k.id);
    for v in &k.versions {
        let note = match objs.iter().find(|o| o.version == v.version) {
            Some(o) => format!(
                "  token object '{}' (id {}){}",
                o.label,
                hex::encode(&o.id),
                if o.destroyed { ", destroyed" } else { "" }
            ),
            None if v.has_material() => String::new(),
            None => "  (material deleted)".into(),
        };
        println!("  v{:<4} created {}{note}", v.version, fmt_time(v.created));
    }
}

/// Parse `--since`: seconds, YYYY-MM-DD, or YYYY-MM-DDTHH:MM:SSZ.
fn parse_since(s: &str) -> Result<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad = || {
        anyhow!("--since '{s}': use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or seconds since the epoch")
    };
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, t.trim_end_matches('Z')),
        None => (s, "00:00:00"),
    };
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if d.len() != 3 || t.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    // days from civil (Howard Hinnant)
    let (y, m, dd) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86400 + t[0] * 3600 + t[1] * 60 + t[2];
    u64::try_from(secs).map_err(|_| bad())
}

pub fn cmd_key(g: &Global, k: KeyCmd) -> Result<()> {
    match k {
        KeyCmd::Data(c) => super::key_data::cmd_data(g, c)?,
        KeyCmd::Create {
            alias,
            description,
            origin,
            rotation_period,
            key_store,
        } => {
            let mut ks = open_or_create_keystore(g)?;
            if let Some(store) = key_store {
                let id = ks.create_hsm_key(&alias, &description, &store)?;
                println!("{id}");
                return Ok(());
            }
            let origin = match origin {
                Origin::Generated => KeyOrigin::Generated,
                Origin::External => KeyOrigin::External,
            };
            let id = ks.create_key_with(&alias, &description, origin, rotation_period)?;
            println!("{id}");
            if origin == KeyOrigin::External {
                eprintln!("sealfs: key {id} is PendingImport: import its material with `sealfs key import {id} --material FILE`");
            }
        }
        KeyCmd::Enable { key } => {
            let mut ks = open_keystore(g, true)?;
            ks.enable(&key)?;
            println!("key {} is Enabled", ks.resolve(&key)?.id);
        }
        KeyCmd::Disable { key } => {
            let mut ks = open_keystore(g, true)?;
            ks.disable(&key)?;
            println!("key {} is Disabled", ks.resolve(&key)?.id);
        }
        KeyCmd::ScheduleDeletion { key, pending_days } => {
            let mut ks = open_keystore(g, true)?;
            let when = ks.schedule_deletion(&key, pending_days)?;
            let id = ks.resolve(&key)?.id.clone();
            println!(
                "key {id} is PendingDeletion: its material will be destroyed on {} (cancel with `sealfs key cancel-deletion {id}`)",
                fmt_time(when)
            );
        }
        KeyCmd::CancelDeletion { key } => {
            let mut ks = open_keystore(g, true)?;
            ks.cancel_deletion(&key)?;
            let k = ks.resolve(&key)?;
            println!("key {} is {}", k.id, k.state);
        }
        KeyCmd::Import { key, material } => {
            let m = kms::read_material(&material)?;
            let mut ks = open_keystore(g, true)?;
            let v = ks.import(&key, &m)?;
            let k = ks.resolve(&key)?;
            println!("key {} v{v}: material imported; key is {}", k.id, k.state);
        }
        KeyCmd::DeleteMaterial { key } => {
            let mut ks = open_keystore(g, true)?;
            ks.delete_material(&key)?;
            let k = ks.resolve(&key)?;
            println!("key {} material deleted; key is {}", k.id, k.state);
        }
        KeyCmd::Rotate { key, material } => {
            let m = material.as_deref().map(kms::read_material).transpose()?;
            let mut ks = open_keystore(g, true)?;
            let v = ks.rotate(&key, m.as_deref())?;
            println!("key {} rotated: new wraps use v{v}", ks.resolve(&key)?.id);
        }
        KeyCmd::Rotation(RotationCmd::Enable { key, period }) => {
            let mut ks = open_keystore(g, true)?;
            ks.set_rotation(&key, Some(period))?;
            println!("key {} rotates every {period} days", ks.resolve(&key)?.id);
        }
        KeyCmd::Rotation(RotationCmd::Disable { key }) => {
            let mut ks = open_keystore(g, true)?;
            ks.set_rotation(&key, None)?;
            println!("key {}: automatic rotation off", ks.resolve(&key)?.id);
        }
        KeyCmd::Alias(AliasCmd::Create { alias, key }) => {
            let mut ks = open_keystore(g, true)?;
            let fa = ks.alias_create(&alias, &key)?;
            println!("{fa} -> {}", ks.resolve(&fa)?.id);
        }
        KeyCmd::Alias(AliasCmd::Delete { alias }) => {
            let mut ks = open_keystore(g, true)?;
            let id = ks.alias_delete(&alias)?;
            println!("removed alias {alias} from key {id}");
        }
        KeyCmd::Alias(AliasCmd::List { json }) => {
            let ks = open_keystore(g, false)?;
            let keys = ks.list()?;
            let pairs: Vec<(&String, &String)> = keys
                .iter()
                .flat_map(|k| k.aliases.iter().map(move |a| (a, &k.id)))
                .collect();
            if json {
                let v: Vec<_> = pairs
                    .iter()
                    .map(|(a, id)| serde_json::json!({"alias": a, "key_id": id}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<40}  KEY ID", "ALIAS");
                for (a, id) in pairs {
                    println!("{a:<40}  {id}");
                }
            }
        }
        KeyCmd::List { json } => {
            let ks = open_keystore(g, false)?;
            let keys = ks.list()?;
            if json {
                let v: Vec<_> = keys.iter().map(|k| key_json_in(&ks, k)).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<36}  {:<15}  {:<8}  {:>3}  {:<20}  ALIASES",
                    "KEY ID", "STATE", "MANAGER", "VER", "CREATED"
                );
                for k in &keys {
                    let (state, reason) = shown_state(&ks, k);
                    println!(
                        "{:<36}  {:<15}  {:<8}  {:>3}  {:<20}  {}{}",
                        k.id,
                        state,
                        if k.manager == KeyManager::Service {
                            "service"
                        } else {
                            "customer"
                        },
                        k.current_version(),
                        fmt_time(k.created),
                        k.aliases.join(","),
                        reason.map(|r| format!("  ({r})")).unwrap_or_default()
                    );
                }
            }
        }
        KeyCmd::Describe { key, json } => {
            let ks = open_keystore(g, false)?;
            let k = ks.describe(&key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&key_json_in(&ks, &k))?);
            } else {
                print_key(&ks, &k);
            }
        }
        KeyCmd::ChangePassphrase {
            new_key_file,
            generate,
            new_passphrase_file,
        } => {
            let mut ks = open_keystore(g, true)?;
            let new = match &new_key_file {
                Some(p) => {
                    if generate {
                        kms::generate_key_file(p)?;
                        eprintln!(
                            "sealfs: wrote new key file {} (keep it safe: it unlocks the keystore)",
                            p.display()
                        );
                    }
                    KeystoreSecret::from_key_file(p)?
                }
                None => {
                    let ng = Global {
                        passphrase_file: new_passphrase_file.clone(),
                        key_file: None,
                        ..g.clone()
                    };
                    eprintln!("sealfs: enter the NEW passphrase");
                    secret(&ng, ks.path(), true)?
                }
            };
            ks.change_secret(&new)?;
            println!(
                "keystore {} is now unlocked by {}; the previous version is kept as {}",
                ks.path().display(),
                match &new_key_file {
                    Some(p) => format!("the key file {}", p.display()),
                    None => "the new passphrase".into(),
                },
                kms::backup_path(ks.path()).display()
            );
        }
        KeyCmd::RestoreBackup => {
            let p = super::keystore_path(g);
            let s = secret(g, &p, false)?;
            let rev = kms::Keystore::restore_backup(&p, &s)?;
            println!(
                "restored keystore revision {rev} from {}; the replaced version is now the backup",
                kms::backup_path(&p).display()
            );
        }
        KeyCmd::AcceptKeystore => {
            let p = super::keystore_path(g);
            let s = secret(g, &p, false)?;
            let (found, seen) = kms::Keystore::accept_keystore(&p, &s)?;
            match seen {
                Some(r) if r > found => println!(
                    "accepted keystore {} at revision {found} (this machine had seen revision {r}); it continues above revision {r}",
                    p.display()
                ),
                _ => println!("accepted keystore {} at revision {found}", p.display()),
            }
        }
        KeyCmd::Audit {
            key,
            since,
            json,
            verify,
        } => {
            let ks = open_keystore(g, false)?;
            let log = audit::log_path(ks.path());
            if verify {
                match ks.verify_audit() {
                    Ok(v) => {
                        for n in &v.notes {
                            println!("note: {n}");
                        }
                        println!(
                            "audit log {} is intact: {} entries",
                            log.display(),
                            v.entries
                        );
                        return Ok(());
                    }
                    Err(e) => bail!("audit log {} is NOT intact: {e}", log.display()),
                }
            }
            let key_id = key
                .as_deref()
                .map(|k| ks.resolve(k).map(|k| k.id.clone()))
                .transpose()?;
            let since = since.as_deref().map(parse_since).transpose()?;
            let entries: Vec<_> = audit::read(&log)?
                .into_iter()
                .filter(|e| key_id.is_none() || e.key_id == key_id)
                .filter(|e| since.is_none_or(|s| e.time >= s))
                .collect();
            if json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!(
                    "{:>5}  {:<20}  {:<26}  {:<7}  {:<40}  {:<16}  CALLER",
                    "SEQ", "TIME", "OPERATION", "RESULT", "KEY", "VOLUME"
                );
                for e in &entries {
                    let key = match (&e.key_id, e.key_version) {
                        (Some(k), Some(v)) => format!("{k} v{v}"),
                        (Some(k), None) => k.clone(),
                        _ => "-".into(),
                    };
                    println!(
                        "{:>5}  {:<20}  {:<26}  {:<7}  {:<40}  {:<16}  uid {} pid {} {}{}",
                        e.seq,
                        fmt_time(e.time),
                        e.op,
                        e.result,
                        key,
                        e.volume
                            .as_deref()
                            .map(|v| &v[..v.len().min(16)])
                            .unwrap_or("-"),
                        e.caller.uid,
                        e.caller.pid,
                        e.caller.command,
                        e.detail
                            .as_deref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parsing() {
        assert_eq!(parse_since("0").unwrap(), 0);
        assert_eq!(parse_since("2023-11-14T22:13:20Z").unwrap(), 1_700_000_000);
        assert_eq!(parse_since("2000-02-29").unwrap(), 951_782_400);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2020-13-01").is_err());
    }
}
