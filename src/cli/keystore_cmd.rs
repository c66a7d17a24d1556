//! `sealfs key-store ...`: custom key stores (PKCS#11 tokens).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::{fmt_time, open_keystore, open_or_create_keystore, Global};
use crate::kms::keystore_store::StoreStatus;
use crate::kms::pkcs11::KeyStore;

#[derive(Subcommand, Debug)]
pub enum KeyStoreCmd {
    /// Record a PKCS#11 token as a key store (checks that the module loads,
    /// the token is there and the PIN logs in)
    ///
    /// Example: sealfs key-store create hsm1 --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token-label sealfs --pin-file /etc/sealfs/hsm1.pin
    Create {
        name: String,
        /// The PKCS#11 module (shared library)
        #[arg(long, value_name = "PATH")]
        pkcs11_module: PathBuf,
        /// The token's label
        #[arg(long, value_name = "LABEL")]
        token_label: String,
        /// File holding the user PIN (mode 0600; read at every use)
        #[arg(long, value_name = "PATH")]
        pin_file: PathBuf,
    },
    /// List key stores and whether they can be used now
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one key store
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Connect a key store: its keys are usable again (mounted volumes
    /// regain access within seconds)
    Connect { name: String },
    /// Disconnect a key store: its keys become Unavailable (mounted volumes
    /// lose access to file content within seconds)
    Disconnect { name: String },
    /// Delete a key store record (refused while keys in it are not deleted)
    Delete { name: String },
}

fn store_json(s: &KeyStore, st: &StoreStatus, keys: &[String]) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "pkcs11_module": s.module,
        "token_label": s.token_label,
        "pin_file": s.pin_file,
        "connection_state": if s.connected { "Connected" } else { "Disconnected" },
        "available": *st == StoreStatus::Connected,
        "unavailable_reason": match st {
            StoreStatus::Connected => None,
            StoreStatus::Unavailable(r) => Some(r),
        },
        "created": fmt_time(s.created),
        "keys": keys,
    })
}

pub fn cmd_key_store(g: &Global, c: KeyStoreCmd) -> Result<()> {
    match c {
        KeyStoreCmd::Create {
            name,
            pkcs11_module,
            token_label,
            pin_file,
        } => {
            let mut ks = open_or_create_keystore(g)?;
            ks.key_store_create(&name, &pkcs11_module, &token_label, &pin_file)?;
            println!("key store {name} created and connected (token '{token_label}')");
        }
        KeyStoreCmd::List { json } => {
            let ks = open_keystore(g, false)?;
            let all = ks.key_store_statuses(None)?;
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(s, st)| store_json(s, st, &keys_in(&ks, &s.name)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<16}  {:<12}  {:<16}  STATUS",
                    "NAME", "CONNECTION", "TOKEN"
                );
                for (s, st) in &all {
                    println!(
                        "{:<16}  {:<12}  {:<16}  {}",
                        s.name,
                        if s.connected {
                            "Connected"
                        } else {
                            "Disconnected"
                        },
                        s.token_label,
                        match st {
                            StoreStatus::Connected => "available".to_string(),
                            StoreStatus::Unavailable(r) => format!("unavailable: {r}"),
                        }
                    );
                }
            }
        }
        KeyStoreCmd::Describe { name, json } => {
            let ks = open_keystore(g, false)?;
            let all = ks.key_store_statuses(Some(&name))?;
            let (s, st) = &all[0];
            let keys = keys_in(&ks, &s.name);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&store_json(s, st, &keys))?
                );
            } else {
                println!("Key store:    {}", s.name);
                println!("Module:       {}", s.module.display());
                println!("Token label:  {}", s.token_label);
                println!("PIN file:     {}", s.pin_file.display());
                println!(
                    "Connection:   {}",
                    if s.connected {
                        "Connected"
                    } else {
                        "Disconnected"
                    }
                );
                println!(
                    "Status:       {}",
                    match st {
                        StoreStatus::Connected => "available".to_string(),
                        StoreStatus::Unavailable(r) => format!("unavailable: {r}"),
                    }
                );
                println!("Created:      {}", fmt_time(s.created));
                println!(
                    "Keys:         {}",
                    if keys.is_empty() {
                        "-".into()
                    } else {
                        keys.join(", ")
                    }
                );
            }
        }
        KeyStoreCmd::Connect { name } => {
            let mut ks = open_keystore(g, true)?;
            ks.key_store_connect(&name)?;
            println!("key store {name} connected");
        }
        KeyStoreCmd::Disconnect { name } => {
            let mut ks = open_keystore(g, true)?;
            ks.key_store_disconnect(&name)?;
            println!("key store {name} disconnected: its keys are Unavailable");
        }
        KeyStoreCmd::Delete { name } => {
            let mut ks = open_keystore(g, true)?;
            ks.key_store_delete(&name)?;
            println!("key store {name} deleted");
        }
    }
    Ok(())
}

fn keys_in(ks: &crate::kms::Keystore, store: &str) -> Vec<String> {
    ks.keys()
        .iter()
        .filter(|k| ks.hsm_store_name(k).as_deref() == Some(store))
        .map(|k| format!("{} ({})", k.label(), super::key::shown_state(ks, k).0))
        .collect()
}
