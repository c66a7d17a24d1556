//! `sealfs fsck`: verify every volume state in a store (the live chain of
//! checkpoint and journal records, and every snapshot manifest), every
//! inline file and every chunk object they reference; report missing,
//! damaged and orphaned objects with the file paths they affect.
//! `--repair` removes orphans only, and only when every state could be
//! read (otherwise an "orphan" may belong to the unreadable part).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::format::*;
use super::*;

/// What kind of problem fsck found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A referenced object does not exist.
    Missing,
    /// An object fails authentication or does not parse.
    Damaged,
    /// An object nothing references (left by a crash; harmless).
    Orphan,
    /// Something could not be checked (the content key is unavailable).
    Unchecked,
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProblemKind::Missing => "missing",
            ProblemKind::Damaged => "damaged",
            ProblemKind::Orphan => "orphan",
            ProblemKind::Unchecked => "unchecked",
        })
    }
}

/// One finding.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The object, as a path relative to the store (`chunks/ab/ab12…`).
    pub object: String,
    /// What is wrong.
    pub detail: String,
    /// Files affected: `path` in the live volume, `.snapshots/NAME/path`
    /// in a snapshot.
    pub paths: Vec<String>,
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    pub states: usize,
    pub files: u64,
    pub chunks_checked: u64,
    pub problems: Vec<Problem>,
    /// Orphans removed by `--repair`.
    pub repaired: u64,
}

impl FsckReport {
    /// Whether anything is wrong (orphans that were removed do not count).
    pub fn clean(&self) -> bool {
        self.problems
            .iter()
            .all(|p| p.kind == ProblemKind::Orphan && p.detail.ends_with("; removed"))
    }
}

fn chunk_object(name: &str) -> String {
    format!("chunks/{}/{name}", &name[..2])
}

/// Paths of every inode of a state, from its directory tree.
fn paths_of(recs: &BTreeMap<u64, InodeRecord>, prefix: &str) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let mut todo = vec![(ROOT_INO, prefix.trim_end_matches('/').to_string())];
    out.insert(
        ROOT_INO,
        if prefix.is_empty() {
            "/".into()
        } else {
            prefix.into()
        },
    );
    while let Some((dir, path)) = todo.pop() {
        if let Some(RecordData::Dir { entries, .. }) = recs.get(&dir).map(|r| &r.data) {
            for (name, child) in entries {
                if out.contains_key(child) {
                    continue;
                }
                let p = format!("{path}/{}", String::from_utf8_lossy(name));
                out.insert(*child, p.clone());
                todo.push((*child, p));
            }
        }
    }
    out
}

/// Check the store at `root` (not mounted). `progress(done, total)` counts
/// chunk objects verified.
pub fn fsck(
    root: &Path,
    ks: &Keystore,
    repair: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FsckReport, OpenError> {
    if !root.join(HEADER_FILE).exists() {
        return Err(OpenError::NotAStore(root.to_path_buf()));
    }
    let store = super::open_store(root)?;
    let _lock = lock_store(&store)?;
    let (hdr, vmk, vck) = read_header(&store, ks)?;
    let meta_key = AeadKey::new(&vmk.derive(LABEL_META));
    let mut rep = FsckReport::default();
    let keys = match vck.and_then(|k| unwrap_content_keys(ks, &hdr, k)) {
        Ok(k) => ContentKeys::new(&hdr, &k),
        Err(e) => {
            rep.problems.push(Problem {
                kind: ProblemKind::Unchecked,
                object: HEADER_FILE.into(),
                detail: format!("file content not checked: {e}"),
                paths: vec![],
            });
            None
        }
    };
    let sid = hdr.store_id;
    let names = store.list(Kind::Meta).map_err(io_at(root))?;
    let mut complete = true; // every state read in full
    let mut used_meta: HashSet<String> = HashSet::new();

    // The live chain.
    let mut states: Vec<(String, BTreeMap<u64, InodeRecord>)> = Vec::new();
    let damaged = |object: String, detail: String| Problem {
        kind: ProblemKind::Damaged,
        object,
        detail,
        paths: vec![],
    };
    let chain = read_chain(&store, &names, &meta_key, &sid);
    used_meta.extend(chain.used);
    let mut live = true; // the live state was read (maybe only in part)
    if chain.fault.is_some() {
        complete = false;
    }
    match chain.fault {
        None => {}
        Some(ChainFault::NoCheckpoint) => {
            live = false;
            rep.problems.push(Problem {
                kind: ProblemKind::Missing,
                object: "meta/checkpoint-*".into(),
                detail: "no checkpoint: the live volume cannot be read".into(),
                paths: vec![],
            });
        }
        Some(ChainFault::Bad {
            object, seq, why, ..
        }) if seq == chain.ckpt => {
            live = false;
            rep.problems.push(damaged(
                format!("meta/{object}"),
                format!("{why}: the live volume cannot be read"),
            ));
        }
        Some(ChainFault::Bad {
            object,
            seq: j,
            why,
            ..
        }) => {
            // Name what can be named: the files the readable state has, as
            // of commit j - 1.
            rep.problems.push(damaged(
                format!("meta/{object}"),
                format!("{why}; changes from commit {j} on are unreadable (the volume will not mount; files written since commit {} are affected)", j - 1),
            ));
        }
        Some(ChainFault::Missing { expect, found: j }) => {
            rep.problems.push(Problem {
                kind: ProblemKind::Missing,
                object: format!("meta/{}", journal_name(expect)),
                detail: format!(
                    "journal record {expect} is missing; the changes of commits {expect}..{j} and later are lost (the volume will not mount)"
                ),
                paths: vec![],
            });
        }
    }
    if live {
        states.push((String::new(), chain.records));
    }
    // Snapshots.
    for n in &names {
        let Some(id) = parse_seq(n, "snapshot") else {
            continue;
        };
        used_meta.insert(n.clone());
        let opened = store
            .get(Kind::Meta, n, crate::store::MAX_OBJECT)
            .map_err(|e| e.to_string())
            .and_then(|d| open_snapshot(&meta_key, &sid, id, &d).map_err(|e| e.to_string()));
        match opened {
            Ok(b) => states.push((
                format!(".snapshots/{}", b.name),
                b.inodes.into_iter().collect(),
            )),
            Err(e) => {
                complete = false;
                rep.problems.push(damaged(
                    format!("meta/{n}"),
                    format!("{e}: this snapshot cannot be read"),
                ));
            }
        }
    }
    rep.states = states.len();

    // Files: inline content now, chunks collected for one pass.
    let mut refs: HashMap<[u8; 16], (ChunkRef, Vec<String>)> = HashMap::new();
    for (prefix, recs) in &states {
        let paths = paths_of(recs, prefix);
        let path = |ino: &u64| {
            paths
                .get(ino)
                .cloned()
                .unwrap_or_else(|| format!("{prefix}/<inode {ino}, no name>"))
        };
        for (ino, r) in recs {
            match &r.data {
                RecordData::InlineFile(sealed) => {
                    rep.files += 1;
                    if let Some(k) = &keys {
                        let ok = k
                            .all()
                            .iter()
                            .any(|k| open_inline(k, &hdr.data_id, *ino, sealed).is_ok());
                        if !ok {
                            rep.problems.push(Problem {
                                kind: ProblemKind::Damaged,
                                object: "(inline content in metadata)".into(),
                                detail: "inline file content failed authentication".into(),
                                paths: vec![path(ino)],
                            });
                        }
                    }
                }
                RecordData::ChunkedFile(c) => {
                    rep.files += 1;
                    for (_, cr) in c {
                        let e = refs.entry(cr.id).or_insert_with(|| (*cr, Vec::new()));
                        let p = path(ino);
                        if !e.1.contains(&p) {
                            e.1.push(p);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    // Chunks: every referenced object exists and authenticates.
    let total = refs.len() as u64;
    progress(0, total);
    let mut sorted: Vec<_> = refs.iter().collect();
    sorted.sort_by_key(|(id, _)| **id);
    for (n, (id, (cr, paths))) in sorted.into_iter().enumerate() {
        let name = hex::encode(id);
        match store.get(Kind::Chunk, &name, crate::store::MAX_OBJECT) {
            Err(e) => rep.problems.push(Problem {
                kind: ProblemKind::Missing,
                object: chunk_object(&name),
                detail: format!("chunk object cannot be read: {e}"),
                paths: paths.clone(),
            }),
            Ok(data) => {
                if let Some(k) = &keys {
                    let gen = chunk_gen(&data).unwrap_or(0);
                    let r = match k.for_gen(gen) {
                        Some(key) => open_chunk(key, &hdr.data_id, id, gen, cr.len as usize, &data)
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        None => Err(format!(
                            "chunk object has a bad header or unknown key generation {gen}"
                        )),
                    };
                    if let Err(e) = r {
                        rep.problems.push(Problem {
                            kind: ProblemKind::Damaged,
                            object: chunk_object(&name),
                            detail: e,
                            paths: paths.clone(),
                        });
                    }
                }
                rep.chunks_checked += 1;
            }
        }
        if n % 256 == 0 {
            progress(n as u64, total);
        }
    }
    progress(total, total);

    // Orphans.
    let mut orphans: Vec<(Kind, String, String)> = Vec::new();
    for n in store.list(Kind::Chunk).map_err(io_at(root))? {
        let id = hex::decode(&n)
            .ok()
            .and_then(|v| <[u8; 16]>::try_from(v).ok());
        if id.is_some_and(|id| !refs.contains_key(&id)) {
            orphans.push((Kind::Chunk, n.clone(), chunk_object(&n)));
        }
    }
    for n in &names {
        let ours = parse_seq(n, "journal").is_some()
            || parse_seq(n, "checkpoint").is_some()
            || parse_seq(n, "snapshot").is_some();
        if ours && !used_meta.contains(n) {
            orphans.push((Kind::Meta, n.clone(), format!("meta/{n}")));
        }
    }
    for (kind, name, object) in orphans {
        let mut detail = "not referenced by the live volume or any snapshot".to_string();
        if repair && complete {
            if store.delete(kind, &name).is_ok() {
                rep.repaired += 1;
                detail.push_str("; removed");
            }
        } else if repair {
            detail.push_str("; kept: some state could not be read, so it may belong to it");
        }
        rep.problems.push(Problem {
            kind: ProblemKind::Orphan,
            object,
            detail,
            paths: vec![],
        });
    }
    if repair && rep.repaired > 0 {
        store.sync().map_err(io_at(root))?;
    }
    Ok(rep)
}
