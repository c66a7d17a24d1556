//! What this machine has seen of a keystore: the local keystore state.
//!
//! One small JSON file per keystore under the sealfs state directory,
//! `<state>/keystores/<hex SHA-256 of the keystore's canonical path>.json`
//! (mode 0600, written with temp file + fsync + rename + directory fsync):
//!
//! ```json
//! {"format":1,"keystore":"/abs/path","revision":12,"clock":1764547200,"destroyed":["<key id>"]}
//! ```
//!
//! * `revision`: the highest keystore revision opened here. A keystore with
//!   a lower revision is an older copy (a rollback) and is refused.
//! * `clock`: the highest keystore clock seen (informational; the keystore
//!   body carries its own).
//! * `destroyed`: ids of keys whose material was destroyed. A restored or
//!   accepted keystore never gets their material back.
//!
//! The file holds no secret. It is trusted local state, like the volumes'
//! rollback state next to it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The local record of one keystore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub format: u32,
    pub keystore: String,
    pub revision: u64,
    pub clock: u64,
    pub destroyed: Vec<String>,
}

/// Largest state file accepted (bounds what a damaged file can make us read).
const MAX_LEN: u64 = 1 << 20;

#[cfg(not(test))]
fn state_root() -> std::io::Result<PathBuf> {
    crate::volume::default_state_dir()
}

/// Unit tests never touch the real state directory.
#[cfg(test)]
fn state_root() -> std::io::Result<PathBuf> {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    Ok(DIR
        .get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
        .to_path_buf())
}

/// The canonical form of a keystore path (the file itself need not exist).
pub fn canonical(keystore: &Path) -> PathBuf {
    let abs = std::path::absolute(keystore).unwrap_or_else(|_| keystore.to_path_buf());
    if let Ok(c) = abs.canonicalize() {
        return c;
    }
    match (abs.parent(), abs.file_name()) {
        (Some(d), Some(f)) => d
            .canonicalize()
            .map(|d| d.join(f))
            .unwrap_or_else(|_| abs.clone()),
        _ => abs,
    }
}

/// Where the state of `keystore` lives.
pub fn state_path(keystore: &Path) -> std::io::Result<PathBuf> {
    let c = canonical(keystore);
    let h = crate::crypto::sha256(c.as_os_str().as_encoded_bytes());
    Ok(state_root()?
        .join("keystores")
        .join(format!("{}.json", hex::encode(h))))
}

/// Read the state of `keystore`: `Ok(None)` when this machine never saw
/// it; an error (a sentence) when the file cannot be read or is damaged.
pub fn load(keystore: &Path) -> Result<Option<Seen>, String> {
    let p = state_path(keystore).map_err(|e| {
        format!("cannot find the local keystore state to check for a rollback: {e}")
    })?;
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the local keystore state {}: {e}",
                p.display()
            ))
        }
    };
    use std::io::Read;
    let mut text = String::new();
    f.take(MAX_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the local keystore state {}: {e}", p.display()))?;
    let bad = |why: String| {
        format!(
            "the local keystore state {} is damaged ({why}), so sealfs cannot tell whether keystore {} is an older copy; if you trust the keystore as it is, accept it with `sealfs key accept-keystore`",
            p.display(),
            keystore.display()
        )
    };
    if text.len() as u64 > MAX_LEN {
        return Err(bad("too large".into()));
    }
    let s: Seen = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if s.format != 1 {
        return Err(bad(format!("unknown format {}", s.format)));
    }
    Ok(Some(s))
}

/// Hold an exclusive lock on the state of `keystore` (`<name>.lock` next to
/// it) while it is read, raised and written, so that concurrent processes
/// never lower each other's record.
pub fn lock(keystore: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = state_path(keystore)
        .map_err(|e| format!("cannot record the keystore revision locally: {e}"))?
        .with_extension("lock");
    let dir = p.parent().expect("has a parent");
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create the keystore state directory {}: {e}",
            dir.display()
        )
    })?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", p.display()))?;
    Ok(f)
}

/// Write the state of `keystore` durably (temp, fsync, rename, dir fsync).
pub fn store(keystore: &Path, s: &Seen) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = state_path(keystore)
        .map_err(|e| format!("cannot record the keystore revision locally: {e}"))?;
    let dir = p.parent().expect("has a parent").to_path_buf();
    let fail = |e: std::io::Error, what: &Path| {
        format!(
            "cannot record the keystore revision in {}: {e}; a rollback of keystore {} to an older copy would go unnoticed until this works",
            what.display(),
            keystore.display()
        )
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(e, &dir))?;
    let mut s = s.clone();
    s.format = 1;
    s.keystore = canonical(keystore).to_string_lossy().into_owned();
    let text = serde_json::to_string(&s).expect("serializable") + "\n";
    let tmp = p.with_extension(format!("json.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| fail(e, &tmp))?;
    f.write_all(text.as_bytes()).map_err(|e| fail(e, &tmp))?;
    f.sync_all().map_err(|e| fail(e, &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &p).map_err(|e| fail(e, &p))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(e, &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let ks = d.path().join("ks");
        assert_eq!(load(&ks).unwrap(), None);
        let s = Seen {
            revision: 7,
            clock: 9,
            destroyed: vec!["a".into()],
            ..Seen::default()
        };
        store(&ks, &s).unwrap();
        let got = load(&ks).unwrap().unwrap();
        assert_eq!(
            (got.revision, got.clock, got.destroyed),
            (7, 9, vec!["a".into()])
        );
        std::fs::write(state_path(&ks).unwrap(), b"garbage").unwrap();
        let e = load(&ks).unwrap_err();
        assert!(
            e.contains("damaged") && e.contains("accept-keystore"),
            "{e}"
        );
        std::fs::write(state_path(&ks).unwrap(), b"").unwrap();
        assert!(load(&ks).is_err());
    }
}
