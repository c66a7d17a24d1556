//! `sealfs key generate-data-key | encrypt | decrypt | re-encrypt`:
//! client-side encryption with keystore keys, no server needed. The
//! ciphertext blobs are [`crate::kms::blob`]'s.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use clap::{Subcommand, ValueEnum};
use zeroize::Zeroizing;

use super::{open_keystore, Global};
use crate::kms::{blob, EncryptionContext};

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Make a random data key: prints it and the same key encrypted under
    /// KEY (a ciphertext blob to store beside your data; `sealfs key
    /// decrypt` gives the key back)
    ///
    /// Example: sealfs key generate-data-key alias/app --context app=billing --json
    GenerateDataKey {
        key: String,
        #[arg(long, value_enum, default_value_t = DataKeySpec::Aes256)]
        key_spec: DataKeySpec,
        /// Encryption context entry (repeatable): needed again to decrypt
        #[arg(long = "context", value_name = "K=V", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Write the ciphertext blob to this file
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Write the plaintext key (raw bytes) to this new file (mode 0600)
        #[arg(long, value_name = "FILE")]
        plaintext_out: Option<PathBuf>,
        /// Print {"KeyId","Plaintext","CiphertextBlob"} (base64) as AWS does
        #[arg(long)]
        json: bool,
    },
    /// Encrypt up to 4096 bytes under KEY into a ciphertext blob
    ///
    /// Example: sealfs key encrypt alias/app --in secret.txt --out secret.kms --context app=billing
    Encrypt {
        key: String,
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long = "context", value_name = "K=V", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// Decrypt a ciphertext blob (it names its key and version); the
    /// encryption context must be the one it was made with
    ///
    /// Example: sealfs key decrypt --in secret.kms --out secret.txt --context app=billing
    Decrypt {
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// New file for the plaintext (mode 0600)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long = "context", value_name = "K=V", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Refuse unless the blob was made with this key
        #[arg(long)]
        key: Option<String>,
    },
    /// Decrypt a blob and encrypt its plaintext under another key (or the
    /// newest version of the same one) without it leaving the keystore
    ///
    /// Example: sealfs key re-encrypt --in a.kms --to alias/other --out b.kms
    ReEncrypt {
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[arg(long, value_name = "KEY")]
        to: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Context the blob was made with
        #[arg(long = "context", value_name = "K=V", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Context for the new blob (default: the same as --context)
        #[arg(long = "to-context", value_name = "K=V", value_parser = parse_kv)]
        to_context: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataKeySpec {
    #[value(name = "AES_256")]
    Aes256,
    #[value(name = "AES_128")]
    Aes128,
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Build an encryption context, refusing a key given twice.
pub fn context_of(kv: &[(String, String)]) -> Result<EncryptionContext> {
    let mut c = EncryptionContext::new();
    for (k, v) in kv {
        if c.insert(k.clone(), v.clone()).is_some() {
            bail!("encryption context key '{k}' is given twice");
        }
    }
    Ok(c)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn read_limited(p: &Path, max: usize, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", p.display());
    }
    if meta.len() > max as u64 {
        bail!(
            "{} is {} bytes; {what} takes at most {max}",
            p.display(),
            meta.len()
        );
    }
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Write a new file (refusing to replace one), mode 0600 if `private`.
fn write_new(p: &Path, data: &[u8], private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(p)
        .with_context(|| format!("cannot create {} (it must not exist yet)", p.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", p.display()))
}

pub fn cmd_data(g: &Global, c: DataCmd) -> Result<()> {
    match c {
        DataCmd::GenerateDataKey {
            key,
            key_spec,
            context,
            out,
            plaintext_out,
            json,
        } => {
            let ctx = context_of(&context)?;
            let ks = open_keystore(g, false)?;
            let n = match key_spec {
                DataKeySpec::Aes256 => 32,
                DataKeySpec::Aes128 => 16,
            };
            let dk = Zeroizing::new(crate::crypto::random_bytes::<32>());
            let b = blob::encrypt(&ks, "GenerateDataKey", &key, &ctx, &dk[..n])?;
            let bytes = b.to_bytes();
            if let Some(p) = &out {
                write_new(p, &bytes, false)?;
            }
            if let Some(p) = &plaintext_out {
                write_new(p, &dk[..n], true)?;
            }
            if json {
                let v = serde_json::json!({
                    "KeyId": b.key.key_id,
                    "KeyVersion": b.key.key_version,
                    "Plaintext": b64(&dk[..n]),
                    "CiphertextBlob": b64(&bytes),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("KeyId:          {} v{}", b.key.key_id, b.key.key_version);
                if plaintext_out.is_none() {
                    println!("Plaintext:      {}", b64(&dk[..n]));
                }
                if out.is_none() {
                    println!("CiphertextBlob: {}", b64(&bytes));
                }
            }
        }
        DataCmd::Encrypt {
            key,
            input,
            out,
            context,
        } => {
            let ctx = context_of(&context)?;
            let plain = Zeroizing::new(read_limited(&input, blob::MAX_PLAINTEXT, "encrypt")?);
            let ks = open_keystore(g, false)?;
            let b = blob::encrypt(&ks, "Encrypt", &key, &ctx, &plain)?;
            write_new(&out, &b.to_bytes(), false)?;
            println!(
                "encrypted {} bytes under key {} v{} into {}",
                plain.len(),
                b.key.key_id,
                b.key.key_version,
                out.display()
            );
        }
        DataCmd::Decrypt {
            input,
            out,
            context,
            key,
        } => {
            let ctx = context_of(&context)?;
            let data = read_limited(&input, blob::MAX_BLOB, "decrypt")?;
            let ks = open_keystore(g, false)?;
            let (b, plain) = blob::decrypt(&ks, &data, &ctx, key.as_deref())
                .map_err(|e| anyhow!("{}: {e}", input.display()))?;
            write_new(&out, &plain, true)?;
            println!(
                "decrypted {} bytes with key {} v{} into {}",
                plain.len(),
                b.key.key_id,
                b.key.key_version,
                out.display()
            );
        }
        DataCmd::ReEncrypt {
            input,
            to,
            out,
            context,
            to_context,
        } => {
            let from_ctx = context_of(&context)?;
            let to_ctx = if to_context.is_empty() {
                from_ctx.clone()
            } else {
                context_of(&to_context)?
            };
            let data = read_limited(&input, blob::MAX_BLOB, "re-encrypt")?;
            let ks = open_keystore(g, false)?;
            let (old, new) = blob::re_encrypt(&ks, &data, &from_ctx, &to, &to_ctx)
                .map_err(|e| anyhow!("{}: {e}", input.display()))?;
            write_new(&out, &new.to_bytes(), false)?;
            println!(
                "re-encrypted from key {} v{} to key {} v{} into {}",
                old.key.key_id,
                old.key.key_version,
                new.key.key_id,
                new.key.key_version,
                out.display()
            );
        }
    }
    Ok(())
}
