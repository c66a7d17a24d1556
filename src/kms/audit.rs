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

/// Operation name of the entry that records bytes which are not an audit
/// entry (a line torn by a crash during an append, or foreign data), so
/// that the chain continues past them.
pub const RECOVERY_OP: &str = "RecoverAuditLog";
/// Operation name of the entry written when the head file, which should
/// exist, was missing: entries may have been cut off the end before it.
pub const HEAD_MISSING_OP: &str = "AuditHeadMissing";

/// Does `region` look like the start of an entry whose append was cut
/// short (one unterminated line of JSON)?
fn looks_torn(region: &[u8], ends_with_newline: bool) -> bool {
    !ends_with_newline && region.starts_with(b"{\"seq\":") && !region.contains(&b'\n')
}

fn trim_ws(b: &[u8]) -> &[u8] {
    let s = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let e = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &b[s..e.max(s)]
}

/// Append one entry (filling in seq and prev from the current tail) under
/// an exclusive lock of the log file. Returns (seq, mac).
///
/// Bytes after the last entry that are not an entry (a torn last line from
/// a crash, or foreign data) are kept and recorded by a chained
/// [`RECOVERY_OP`] entry first. With `expect_head`, a missing head file
/// is recorded by a chained [`HEAD_MISSING_OP`] entry first.
pub fn append(
    path: &Path,
    key: &Key32,
    e: Entry,
    expect_head: bool,
) -> Result<(u64, [u8; 32]), AuditError> {
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
    let t = tail(&mut f).map_err(io(path))?;
    let (mut seq, mut prev) = (t.seq, t.mac);
    let mut text = String::new();
    if !t.ends_with_newline {
        text.push('\n');
    }
    let push = |text: &mut String, seq: &mut u64, prev: &mut String, mut entry: Entry| {
        *seq += 1;
        entry.seq = *seq;
        entry.prev = std::mem::take(prev);
        let m = mac(key, &entry);
        let line = Line {
            entry,
            mac: hex::encode(m),
        };
        text.push_str(&serde_json::to_string(&line).expect("serializable"));
        text.push('\n');
        *prev = line.mac;
        m
    };
    let marker = |op: &str, result: &str, detail: String, ctx| Entry {
        seq: 0,
        time: e.time,
        op: op.into(),
        key_id: None,
        key_version: None,
        volume: None,
        context: ctx,
        caller: e.caller.clone(),
        result: result.into(),
        detail: Some(detail),
        prev: String::new(),
    };
    let head = read_head(path, key).ok().flatten();
    if let Some(region) = &t.skipped {
        // A crash tears at most the entry being appended, which the head
        // file (written after the entry is on disk) does not record yet.
        let torn =
            looks_torn(region, t.ends_with_newline) && head.is_none_or(|(hs, _)| hs <= t.seq);
        let kind = if torn { "torn" } else { "foreign" };
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert("kind".to_string(), kind.to_string());
        ctx.insert("skipped_bytes".to_string(), region.len().to_string());
        ctx.insert(
            "skipped_sha256".to_string(),
            hex::encode(crypto::sha256(region)),
        );
        let detail = if torn {
            format!("{} bytes after entry {} are a torn entry (an append interrupted by a crash); kept, skipped", region.len(), t.seq)
        } else {
            format!("{} bytes after entry {} are not an audit entry and were not written by an interrupted append (foreign data, or entries cut off); kept, skipped", region.len(), t.seq)
        };
        let m = marker(
            RECOVERY_OP,
            if torn { "ok" } else { "error" },
            detail,
            Some(ctx),
        );
        push(&mut text, &mut seq, &mut prev, m);
    }
    if expect_head && seq > 0 && head.is_none() && !head_path(path).exists() {
        let detail = format!(
            "{} was missing before this entry: entries before it may have been cut off the end",
            head_path(path).display()
        );
        let m = marker(HEAD_MISSING_OP, "error", detail, None);
        push(&mut text, &mut seq, &mut prev, m);
    }
    let m = push(&mut text, &mut seq, &mut prev, e);
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_data().map_err(io(path))?;
    // still under the log's lock, so heads are written in entry order
    write_head(path, key, seq, &m).map_err(io(&head_path(path)))?;
    Ok((seq, m))
}

/// The end of the log: the last entry's (seq, mac hex), or (0, "") for an
/// empty log; the bytes after it that are not an entry; whether the file
/// ends with a newline. Reads at most the last 256 KiB.
struct Tail {
    seq: u64,
    mac: String,
    skipped: Option<Vec<u8>>,
    ends_with_newline: bool,
}

fn tail(f: &mut File) -> std::io::Result<Tail> {
    use std::io::Read;
    let len = f.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let mut pos = 0;
    if start > 0 {
        // the window starts inside a line
        pos = buf
            .iter()
            .position(|&c| c == b'\n')
            .map_or(buf.len(), |p| p + 1);
    }
    let (mut seq, mut mac) = (0, String::new());
    let mut good_end = pos;
    while pos < buf.len() {
        let end = buf[pos..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(buf.len(), |p| pos + p);
        if let Ok(l) = serde_json::from_slice::<Line>(&buf[pos..end]) {
            seq = l.entry.seq;
            mac = l.mac;
            good_end = (end + 1).min(buf.len());
        }
        pos = end + 1;
    }
    let region = trim_ws(&buf[good_end.min(buf.len())..]);
    Ok(Tail {
        seq,
        mac,
        skipped: (!region.is_empty()).then(|| region.to_vec()),
        ends_with_newline: buf.is_empty() || buf.last() == Some(&b'\n'),
    })
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

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Number of entries (the newest entry's seq).
    pub entries: u64,
    /// Benign findings (a torn line from a crash, recovered or not yet).
    pub notes: Vec<String>,
}

/// Verify the whole chain. `head` is the (seq, mac) the keystore recorded
/// at its last save; the head file is checked as well. With
/// `expect_head_file`, the head file must exist (every append since the
/// keystore recorded `head` wrote it). Returns the number of entries and
/// notes, or a description of the first problem.
pub fn verify(
    path: &Path,
    key: &Key32,
    head: Option<(u64, [u8; 32])>,
    expect_head_file: bool,
) -> Result<Verified, String> {
    let file_head = read_head(path, key)?;
    let v = verify_against(path, key, head)?;
    let n = v.entries;
    if file_head.is_none() && n > 0 && (expect_head_file || head.is_some_and(|(s, _)| s < n)) {
        // Every append of this version writes it; sealfs never deletes it.
        return Err(format!(
            "{} is missing: entries after {} could have been cut off the end without a trace; the head file was deleted by something other than sealfs",
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
        None => Ok(v),
    }
}

fn verify_against(
    path: &Path,
    key: &Key32,
    head: Option<(u64, [u8; 32])>,
) -> Result<Verified, String> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match head {
                Some((s, _)) if s > 0 => Err(format!(
                    "the audit log {} is missing, but the keystore has seen {s} entries",
                    path.display()
                )),
                _ => Ok(Verified {
                    entries: 0,
                    notes: Vec::new(),
                }),
            };
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut prev = String::new();
    let mut n = 0u64;
    let mut head_seen = false;
    let mut notes = Vec::new();
    // bytes after the last good entry that are not an entry
    let mut after_good = 0usize;
    let mut bad: Option<(usize, String)> = None;
    let mut pos = 0usize;
    let mut lineno = 0usize;
    while pos < data.len() {
        lineno += 1;
        let end = data[pos..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(data.len(), |p| pos + p);
        let seg = &data[pos..end];
        let seg_start = pos;
        pos = end + 1;
        if trim_ws(seg).is_empty() {
            continue;
        }
        let line: Line = match serde_json::from_slice(seg) {
            Ok(l) => l,
            Err(e) => {
                if bad.is_none() {
                    bad = Some((lineno, e.to_string()));
                }
                continue;
            }
        };
        let e = &line.entry;
        if let Some((bl, why)) = bad.take() {
            let region = trim_ws(&data[after_good..seg_start]);
            let ctx = e.context.as_ref();
            let recorded = e.op == RECOVERY_OP
                && ctx.and_then(|c| c.get("skipped_sha256"))
                    == Some(&hex::encode(crypto::sha256(region)));
            if !recorded {
                return Err(format!(
                    "line {bl}: not a valid audit entry ({why}): something other than sealfs wrote to the log"
                ));
            }
            if ctx.and_then(|c| c.get("kind")).map(String::as_str) != Some("torn") {
                return Err(format!(
                    "line {bl}: {} bytes that are not an audit entry (recorded by entry {}): something other than sealfs wrote to the log, or entries were cut off",
                    region.len(),
                    e.seq
                ));
            }
            notes.push(format!(
                "line {bl}: a torn entry from an append interrupted by a crash, recovered by entry {}",
                e.seq
            ));
        } else if e.op == RECOVERY_OP {
            return Err(format!(
                "line {lineno} (entry {}): records skipped bytes that are not there: the log was edited",
                e.seq
            ));
        }
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
        // (lowercase hex only, as written: "A" for "a" is an edit too)
        let got = if line
            .mac
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            hex::decode(&line.mac).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !crypto::ct_eq(&want, &got) {
            return Err(format!(
                "line {lineno} (entry {}): its MAC does not match: the entry was edited",
                e.seq
            ));
        }
        // The MAC covers the entry's meaning; the line must also be exactly
        // what sealfs writes for it, so that no byte can change unnoticed
        // (a renamed null field, added whitespace).
        if serde_json::to_vec(&line).map_or(true, |c| c != seg) {
            return Err(format!(
                "line {lineno} (entry {}): not in the exact form sealfs writes: the line was edited",
                e.seq
            ));
        }
        if e.op == HEAD_MISSING_OP {
            return Err(format!(
                "line {lineno} (entry {}): {}",
                e.seq,
                e.detail.as_deref().unwrap_or("the head file was missing")
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
        after_good = pos.min(data.len());
    }
    if let Some((hs, _)) = head {
        if hs > 0 && !head_seen {
            return Err(format!(
                "the log ends at entry {n}, but the keystore has seen entry {hs}: entries were cut off the end"
            ));
        }
    }
    if let Some((bl, why)) = bad {
        let region = trim_ws(&data[after_good..]);
        if looks_torn(region, data.last() == Some(&b'\n')) {
            notes.push(format!(
                "line {bl}: the last line is torn ({} bytes; an append interrupted by a crash); the next audited operation records a recovery entry and continues the chain",
                region.len()
            ));
        } else {
            return Err(format!(
                "line {bl}: not a valid audit entry ({why}): data that is not an audit entry was appended to the log"
            ));
        }
    }
    Ok(Verified { entries: n, notes })
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

    fn append_t(p: &Path, k: &Key32, e: Entry) -> Result<(u64, [u8; 32]), AuditError> {
        append(p, k, e, false)
    }

    fn n(r: Result<Verified, String>) -> Result<u64, String> {
        r.map(|v| v.entries)
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        let mut head = None;
        for op in ["CreateKey", "Encrypt", "Decrypt", "DisableKey"] {
            head = Some(append_t(&p, &k, entry(op)).unwrap());
        }
        assert_eq!(n(verify(&p, &k, head, false)).unwrap(), 4);
        assert!(n(verify(&p, &Key32::random(), head, false)).is_err());
        let orig = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = orig.lines().collect();

        // edited
        let edited = orig.replacen("\"Decrypt\"", "\"Encrypt\"", 1);
        std::fs::write(&p, edited).unwrap();
        let e = n(verify(&p, &k, head, false)).unwrap_err();
        assert!(e.contains("entry 3") && e.contains("edited"), "{e}");
        // removed
        let removed = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        std::fs::write(&p, removed).unwrap();
        let e = n(verify(&p, &k, head, false)).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        // reordered
        let reordered = [lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n";
        std::fs::write(&p, reordered).unwrap();
        assert!(n(verify(&p, &k, head, false))
            .unwrap_err()
            .contains("line 2"));
        // cut off the end
        let cut = [lines[0], lines[1]].join("\n") + "\n";
        std::fs::write(&p, cut).unwrap();
        let e = n(verify(&p, &k, head, false)).unwrap_err();
        assert!(e.contains("cut off"), "{e}");
        // deleted entirely
        std::fs::remove_file(&p).unwrap();
        assert!(n(verify(&p, &k, head, false))
            .unwrap_err()
            .contains("missing"));
        std::fs::write(&p, orig).unwrap();
        assert_eq!(n(verify(&p, &k, head, false)).unwrap(), 4);
        assert_eq!(read(&p).unwrap()[2].op, "Decrypt");
    }

    #[test]
    fn head_file_detects_entries_cut_after_the_keystore_head() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        // the keystore was saved after entry 2; entries 3 and 4 are
        // read-only operations (a mount's Decrypt, a Describe)
        let saved = append_t(&p, &k, entry("CreateKey")).unwrap();
        let saved = [saved, append_t(&p, &k, entry("GenerateDataKey")).unwrap()][1];
        append_t(&p, &k, entry("Decrypt")).unwrap();
        append_t(&p, &k, entry("DescribeKey")).unwrap();
        assert_eq!(n(verify(&p, &k, Some(saved), false)).unwrap(), 4);
        let orig = std::fs::read_to_string(&p).unwrap();
        let head = std::fs::read_to_string(head_path(&p)).unwrap();
        assert!(head.starts_with("4 "), "{head}");

        // entries 3 and 4 cut off
        let cut: String = orig.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, &cut).unwrap();
        let e = n(verify(&p, &k, Some(saved), false)).unwrap_err();
        assert!(e.contains("cut off") && e.contains("head file"), "{e}");
        // ... and also the head file rewritten by someone without the key
        let forged = head.replacen("4 ", "2 ", 1);
        std::fs::write(head_path(&p), &forged).unwrap();
        let e = n(verify(&p, &k, Some(saved), false)).unwrap_err();
        assert!(e.contains("damaged or was edited"), "{e}");
        // the head file removed while entries after the keystore's head remain
        std::fs::write(&p, &orig).unwrap();
        std::fs::remove_file(head_path(&p)).unwrap();
        let e = n(verify(&p, &k, Some(saved), false)).unwrap_err();
        assert!(e.contains("is missing"), "{e}");
        // the next append writes it again
        append_t(&p, &k, entry("ListKeys")).unwrap();
        assert_eq!(n(verify(&p, &k, Some(saved), false)).unwrap(), 5);
    }

    #[test]
    fn torn_last_line_is_reported_and_recovered_with_a_chained_marker() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        for op in ["CreateKey", "Encrypt"] {
            append(&p, &k, entry(op), true).unwrap();
        }
        // a crash during the append of entry 3: half a line, no newline
        let full = std::fs::read(&p).unwrap();
        let line3 = "{\"seq\":3,\"time\":1700000000,\"op\":\"Decrypt\",\"key_id\":\"k\",\"key_vers";
        let mut torn = full.clone();
        torn.extend_from_slice(line3.as_bytes());
        std::fs::write(&p, &torn).unwrap();
        let v = verify(&p, &k, None, true).unwrap();
        assert_eq!(v.entries, 2);
        assert!(v.notes.iter().any(|n| n.contains("torn")), "{v:?}");
        // the next append records the torn bytes and continues the chain
        append(&p, &k, entry("Decrypt"), true).unwrap();
        append(&p, &k, entry("ListKeys"), true).unwrap();
        let v = verify(&p, &k, None, true).unwrap();
        assert_eq!(v.entries, 5);
        assert!(
            v.notes.iter().any(|n| n.contains("recovered by entry 3")),
            "{v:?}"
        );
        let entries = read(&p).unwrap();
        assert_eq!(entries[2].op, RECOVERY_OP);
        assert_eq!(entries[3].op, "Decrypt");
        // the torn bytes themselves cannot be changed afterwards
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replacen("key_vers", "key_verz", 1)).unwrap();
        assert!(verify(&p, &k, None, true).is_err());
    }

    #[test]
    fn garbage_appended_is_detected_before_and_after_the_next_append() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        for op in ["CreateKey", "Encrypt"] {
            append(&p, &k, entry(op), true).unwrap();
        }
        let orig = std::fs::read(&p).unwrap();
        for junk in [
            &b"garbage\n"[..],
            b"{\"seq\":3}\n",
            b"\x00\xff\x00",
            b"not json",
        ] {
            let mut g = orig.clone();
            g.extend_from_slice(junk);
            std::fs::write(&p, &g).unwrap();
            let e = verify(&p, &k, None, true).unwrap_err();
            assert!(
                e.contains("line 3") && e.contains("not a valid audit entry"),
                "{e}"
            );
            append(&p, &k, entry("ListKeys"), true).unwrap();
            let e = verify(&p, &k, None, true).unwrap_err();
            assert!(
                e.contains("line 3") && e.contains("not an audit entry"),
                "{e}"
            );
            std::fs::write(&p, &orig).unwrap();
        }
        // a torn-looking tail that cuts an entry the head file recorded is
        // not a crash: entries were cut
        let text = String::from_utf8(orig.clone()).unwrap();
        let cut = &text[..text.len() - 20];
        std::fs::write(&p, cut).unwrap();
        assert!(verify(&p, &k, None, true).unwrap_err().contains("cut off"));
        append(&p, &k, entry("ListKeys"), true).unwrap();
        let e = verify(&p, &k, None, true).unwrap_err();
        assert!(e.contains("not an audit entry"), "{e}");
    }

    #[test]
    fn cut_with_the_head_file_deleted_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.audit");
        let k = Key32::random();
        // the keystore saved after entry 2 (its head), then read-only
        // entries 3 and 4 that it never recorded
        append(&p, &k, entry("CreateKey"), true).unwrap();
        let saved = append(&p, &k, entry("DisableKey"), true).unwrap();
        append(&p, &k, entry("Decrypt"), true).unwrap();
        append(&p, &k, entry("DescribeKey"), true).unwrap();
        let orig = std::fs::read_to_string(&p).unwrap();
        // cut exactly back to the keystore's head and delete the head file
        let cut: String = orig.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, &cut).unwrap();
        std::fs::remove_file(head_path(&p)).unwrap();
        let e = verify(&p, &k, Some(saved), true).unwrap_err();
        assert!(e.contains("is missing") && e.contains("cut off"), "{e}");
        // the next append does not hide it: it records the missing head
        append(&p, &k, entry("ListKeys"), true).unwrap();
        let e = verify(&p, &k, Some(saved), true).unwrap_err();
        assert!(e.contains("entry 3") && e.contains("was missing"), "{e}");
        // the same log of a keystore from before head files still verifies
        std::fs::write(&p, &cut).unwrap();
        std::fs::remove_file(head_path(&p)).unwrap();
        assert_eq!(verify(&p, &k, Some(saved), false).unwrap().entries, 2);
    }
}

/// Property tests of the audit-line parser and verifier: random and
/// mutated logs and head files give an error or a verdict, never a panic;
/// an append after any damage never panics, and a log is never reported
/// intact after one of its entries was changed.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn entry(op: &str) -> Entry {
        Entry {
            seq: 0,
            time: 1,
            op: op.into(),
            key_id: None,
            key_version: None,
            volume: None,
            context: None,
            caller: Caller {
                uid: 0,
                pid: 1,
                command: "t".into(),
            },
            result: "ok".into(),
            detail: None,
            prev: String::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn random_logs_and_heads_never_panic(
            log in prop::collection::vec(any::<u8>(), 0..600),
            head in prop::collection::vec(any::<u8>(), 0..200),
            lines in prop::collection::vec("[ -~]{0,80}", 0..6),
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("a.audit");
            let k = Key32::from_bytes([7; 32]);
            for data in [log.clone(), lines.join("\n").into_bytes()] {
                std::fs::write(&p, &data).unwrap();
                std::fs::write(head_path(&p), &head).unwrap();
                let _ = verify(&p, &k, None, true);
                let _ = verify(&p, &k, Some((3, [1; 32])), false);
                let _ = read(&p);
                let _ = read_head(&p, &k);
                std::fs::remove_file(head_path(&p)).unwrap();
                let _ = append(&p, &k, entry("ListKeys"), true);
                let _ = verify(&p, &k, None, true);
            }
        }

        #[test]
        fn mutated_logs_never_panic_and_edits_are_caught(
            at in any::<usize>(),
            x in 1u8..=255,
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("a.audit");
            let k = Key32::from_bytes([9; 32]);
            for op in ["A", "B", "C"] {
                append(&p, &k, entry(op), true).unwrap();
            }
            let orig = std::fs::read(&p).unwrap();
            let mut m = orig.clone();
            let i = at % m.len();
            m[i] ^= x;
            std::fs::write(&p, &m).unwrap();
            let r = verify(&p, &k, None, true);
            // a changed byte is caught: an error, or (a damaged last
            // line) fewer entries with a note
            if let Ok(v) = &r {
                prop_assert!(
                    v.entries < 3 && !v.notes.is_empty(),
                    "{v:?}: byte {i} {:?} -> {:?} in {}",
                    orig[i] as char,
                    m[i] as char,
                    String::from_utf8_lossy(&orig)
                );
            }
            let _ = append(&p, &k, entry("D"), true);
            let _ = verify(&p, &k, None, true);
        }
    }
}
