//! The keystore's audit log (like CloudTrail for KMS).
//!
//! One JSON object per line in `<keystore>.audit` (mode 0600). Every entry
//! carries the MAC of the previous one (`prev`) and its own `mac`:
//! `HMAC-SHA256(audit_key, "sealfs-audit-v1" ‖ prev ‖ canonical JSON of the
//! entry without its mac)`. The audit key is random, lives inside the sealed
//! keystore and survives passphrase changes, so an edited, removed,
//! inserted or reordered entry is detected by anyone who can unlock the
//! keystore, and nobody without it can forge a consistent chain. The
//! keystore also records the newest entry it knew of when it was last
//! saved, and every append replaces `<keystore>.audit-head`, a MAC'd record
//! of the newest entry, so cutting entries off the end is detected too
//! (unless the head file is also replaced by an older copy of itself).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::{self, Key32};

/// Who performed an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub pid: u32,
    /// The command line's program and subcommand (`sealfs mount`), never
    /// its arguments (which could name secrets' files).
    pub command: String,
}

impl Caller {
    /// This process.
    pub fn current() -> Caller {
        let args: Vec<String> = std::env::args().collect();
        let prog = args
            .first()
            .map(|a| {
                Path::new(a)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        // the first two words that are not flags or their values
        let mut words = vec![prog];
        let mut skip_value = false;
        for a in args.iter().skip(1) {
            if skip_value {
                skip_value = false;
                continue;
            }
            if a.starts_with('-') {
                skip_value = !a.contains('=')
                    && matches!(
                        a.as_str(),
                        "--keystore" | "--key-file" | "--passphrase-file" | "-o"
                    );
                continue;
            }
            // subcommand names only: never a path, key name or value
            if words.len() >= 3 || !a.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                break;
            }
            words.push(a.clone());
        }
        Caller {
            uid: rustix::process::getuid().as_raw(),
            pid: std::process::id(),
            command: words.join(" "),
        }
    }
}

/// One audit entry. Field order is the canonical serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Seconds since the epoch (the keystore clock).
    pub time: u64,
    /// Operation, in KMS terms: CreateKey, DescribeKey, ListKeys, EnableKey,
    /// DisableKey, RotateKey, ImportKeyMaterial, DeleteImportedKeyMaterial,
    /// ScheduleKeyDeletion, CancelKeyDeletion, DestroyKey, CreateAlias,
    /// DeleteAlias, EnableKeyRotation, DisableKeyRotation,
    /// GenerateDataKey, Encrypt, Decrypt, ReEncrypt, ChangeSecret,
    /// RestoreBackup.
    pub op: String,
    pub key_id: Option<String>,
    pub key_version: Option<u32>,
    /// Volume id from the encryption context, if any.
    pub volume: Option<String>,
    /// The whole encryption context (purpose, volume), if any.
    pub context: Option<std::collections::BTreeMap<String, String>>,
    pub caller: Caller,
    /// "ok", "denied" (refused by key state or policy) or "error".
    pub result: String,
    /// Why it was denied or failed, or what changed.
    pub detail: Option<String>,
    /// MAC of the previous entry (hex), empty for the first.
    pub prev: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    entry: Entry,
    mac: String,
}

/// Where the audit log of a keystore lives.
pub fn log_path(keystore: &Path) -> PathBuf {
    let mut p = keystore.as_os_str().to_owned();
    p.push(".audit");
    PathBuf::from(p)
}

/// Where the MAC'd record of the newest entry lives (`<log>-head`, i.e.
/// `<keystore>.audit-head`).
pub fn head_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push("-head");
    PathBuf::from(p)
}

fn head_mac(key: &Key32, seq: u64, entry_mac: &[u8; 32]) -> [u8; 32] {
    let mut msg = b"sealfs-audit-head-v1".to_vec();
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(entry_mac);
    crypto::hmac(key, &msg)
}

/// Replace the head file atomically: `seq hex(entry mac) hex(head mac)\n`,
/// written to `<head>.tmp`, fsynced, renamed.
fn write_head(log: &Path, key: &Key32, seq: u64, entry_mac: &[u8; 32]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = head_path(log);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = format!(
        "{seq} {} {}\n",
        hex::encode(entry_mac),
        hex::encode(head_mac(key, seq, entry_mac))
    );
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, &path)
}

/// The (seq, entry mac) recorded in the head file; `Ok(None)` when there is
/// none; an error when it is unreadable or its MAC does not verify.
fn read_head(log: &Path, key: &Key32) -> Result<Option<(u64, [u8; 32])>, String> {
    let path = head_path(log);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let bad = || format!("{} is damaged or was edited", path.display());
    let mut it = text.split_whitespace();
    let seq: u64 = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let m: [u8; 32] = it
        .next()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|v| v.try_into().ok())
        .ok_or_else(bad)?;
    let hm = it
        .next()
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(bad)?;
    if it.next().is_some() || !crypto::ct_eq(&head_mac(key, seq, &m), &hm) {
        return Err(bad());
    }
    Ok(Some((seq, m)))
}

fn mac(key: &Key32, e: &Entry) -> [u8; 32] {
    let mut msg = b"sealfs-audit-v1".to_vec();
    msg.extend_from_slice(e.prev.as_bytes());
    msg.extend(serde_json::to_vec(e).expect("serializable"));
    crypto::hmac(key, &msg)
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Append one entry (filling in seq and prev from the current tail) under
/// an exclusive lock of the log file. Returns (seq, mac).
pub fn append(path: &Path, key: &Key32, mut e: Entry) -> Result<(u64, [u8; 32]), AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(path)(e.into()))?;
    let (seq, prev) = tail(&mut f).map_err(io(path))?;
    e.seq = seq + 1;
    e.prev = prev;
    let m = mac(key, &e);
    let line = Line {
        entry: e,
        mac: hex::encode(m),
    };
    let mut text = serde_json::to_string(&line).expect("serializable");
    text.push('\n');
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_data().map_err(io(path))?;
    // still under the log's lock, so heads are written in entry order
    write_head(path, key, line.entry.seq, &m).map_err(io(&head_path(path)))?;
    Ok((line.entry.seq, m))
}

/// The last entry's (seq, mac hex), or (0, "") for an empty log. Reads at
/// most the last 64 KiB.
fn tail(f: &mut File) -> std::io::Result<(u64, String)> {
    let len = f.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut last = None;
    for l in BufReader::new(&mut *f).lines() {
        let l = l?;
        if !l.trim().is_empty() {
            last = Some(l);
        }
    }
    Ok(
        match last.and_then(|l| serde_json::from_str::<Line>(&l).ok()) {
            Some(l) => (l.entry.seq, l.mac),
            None => (0, String::new()),
        },
    )
}

/// Read every entry (no verification).
pub fn read(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut out = Vec::new();
    for l in BufReader::new(f).lines() {
        let l = l.map_err(io(path))?;
        if let Ok(line) = serde_json::from_str::<Line>(&l) {
            out.push(line.entry);
        }
    }
    Ok(out)
}

/// Verify the whole chain. `head` is the (seq, mac) the keystore recorded
/// at its last save; the head file is checked as well. Returns the number
/// of entries, or a description of the first bad one.
pub fn verify(path: &Path, key: &Key32, head: Option<(u64, [u8; 32])>) -> Result<u64, String> {
    let file_head = read_head(path, key)?;
    let n = verify_against(path, key, head)?;
    if file_head.is_none() && n > 0 && head.is_some_and(|(s, _)| s < n) {
        // Written by this version since the keystore's last save: the head
        // file should be there (logs of older versions heal at the next
        // append, which writes it).
        return Err(format!(
            "{} is missing: entries after {} cannot be checked for removal from the end",
            head_path(path).display(),
            head.map(|h| h.0).unwrap_or(0)
        ));
    }
    match file_head {
        Some(fh) => verify_against(path, key, Some(fh)).map_err(|e| {
            if e.contains("cut off the end") {
                e.replace("the keystore has seen", "the audit head file records")
            } else {
                e
            }
        }),
        None => Ok(n),
    }
}

fn verify_against(path: &Path, key: &Key32, head: Option<(u64, [u8; 32])>) -> Result<u64, String> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match head {
                Some((s, _)) if s > 0 => Err(format!(
                    "the audit log {} is missing, but the keystore has seen {s} entries",
                    path.display()
                )),
                _ => Ok(0),
            };
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut prev = String::new();
    let mut n = 0u64;
    let mut head_seen = false;
    for (i, l) in BufReader::new(f).lines().enumerate() {
        let lineno = i + 1;
        let l = l.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if l.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(&l)
            .map_err(|e| format!("line {lineno}: not a valid audit entry ({e})"))?;
        let e = &line.entry;
        if e.seq != n + 1 {
            return Err(format!(
                "line {lineno} (entry {}): expected entry {}: entries were removed, inserted or reordered",
                e.seq,
                n + 1
            ));
        }
        if e.prev != prev {
            return Err(format!(
                "line {lineno} (entry {}): does not chain to the entry before it: an entry was removed, inserted or reordered",
                e.seq
            ));
        }
        let want = mac(key, e);
        let got = hex::decode(&line.mac).unwrap_or_default();
        if !crypto::ct_eq(&want, &got) {
            return Err(format!(
                "line {lineno} (entry {}): its MAC does not match: the entry was edited",
                e.seq
            ));
        }
        if let Some((hs, hm)) = head {
            if hs == e.seq {
                if !crypto::ct_eq(&hm, &got) {
                    return Err(format!(
                        "line {lineno} (entry {}): differs from the entry the keystore recorded",
                        e.seq
                    ));
                }
                head_seen = true;
            }
        }
        prev = line.mac.clone();
        n = e.seq;
    }
    if let Some((hs, _)) = head {
        if hs > 0 && !head_seen {
            return Err(format!(
                "the log ends at entry {n}, but the keystore has seen entry {hs}: entries were cut off the end"
            ));
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op: &str) -> Entry {
        Entry {
            seq: 0,
            time: 1_700_000_000,
            op: op.into(),
            key_id: Some("k".into()),
            key_version: Some(1),
            volume: None,
            context: None,
            caller: Caller {
                uid: 0,
                pid: 1,
                command: "sealfs test".into(),
            },
            result: "ok".into(),
            detail: None,
            prev: String::new(),
        }
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        let mut head = None;
        for op in ["CreateKey", "Encrypt", "Decrypt", "DisableKey"] {
            head = Some(append(&p, &k, entry(op)).unwrap());
        }
        assert_eq!(verify(&p, &k, head).unwrap(), 4);
        assert!(verify(&p, &Key32::random(), head).is_err());
        let orig = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = orig.lines().collect();

        // edited
        let edited = orig.replacen("\"Decrypt\"", "\"Encrypt\"", 1);
        std::fs::write(&p, edited).unwrap();
        let e = verify(&p, &k, head).unwrap_err();
        assert!(e.contains("entry 3") && e.contains("edited"), "{e}");
        // removed
        let removed = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        std::fs::write(&p, removed).unwrap();
        let e = verify(&p, &k, head).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        // reordered
        let reordered = [lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n";
        std::fs::write(&p, reordered).unwrap();
        assert!(verify(&p, &k, head).unwrap_err().contains("line 2"));
        // cut off the end
        let cut = [lines[0], lines[1]].join("\n") + "\n";
        std::fs::write(&p, cut).unwrap();
        let e = verify(&p, &k, head).unwrap_err();
        assert!(e.contains("cut off"), "{e}");
        // deleted entirely
        std::fs::remove_file(&p).unwrap();
        assert!(verify(&p, &k, head).unwrap_err().contains("missing"));
        std::fs::write(&p, orig).unwrap();
        assert_eq!(verify(&p, &k, head).unwrap(), 4);
        assert_eq!(read(&p).unwrap()[2].op, "Decrypt");
    }

    #[test]
    fn head_file_detects_entries_cut_after_the_keystore_head() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        // the keystore was saved after entry 2; entries 3 and 4 are
        // read-only operations (a mount's Decrypt, a Describe)
        let saved = append(&p, &k, entry("CreateKey")).unwrap();
        let saved = [saved, append(&p, &k, entry("GenerateDataKey")).unwrap()][1];
        append(&p, &k, entry("Decrypt")).unwrap();
        append(&p, &k, entry("DescribeKey")).unwrap();
        assert_eq!(verify(&p, &k, Some(saved)).unwrap(), 4);
        let orig = std::fs::read_to_string(&p).unwrap();
        let head = std::fs::read_to_string(head_path(&p)).unwrap();
        assert!(head.starts_with("4 "), "{head}");

        // entries 3 and 4 cut off
        let cut: String = orig.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, &cut).unwrap();
        let e = verify(&p, &k, Some(saved)).unwrap_err();
        assert!(e.contains("cut off") && e.contains("head file"), "{e}");
        // ... and also the head file rewritten by someone without the key
        let forged = head.replacen("4 ", "2 ", 1);
        std::fs::write(head_path(&p), &forged).unwrap();
        let e = verify(&p, &k, Some(saved)).unwrap_err();
        assert!(e.contains("damaged or was edited"), "{e}");
        // the head file removed while entries after the keystore's head remain
        std::fs::write(&p, &orig).unwrap();
        std::fs::remove_file(head_path(&p)).unwrap();
        let e = verify(&p, &k, Some(saved)).unwrap_err();
        assert!(e.contains("is missing"), "{e}");
        // the next append writes it again
        append(&p, &k, entry("ListKeys")).unwrap();
        assert_eq!(verify(&p, &k, Some(saved)).unwrap(), 5);
    }
}
