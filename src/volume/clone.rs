//! `sealfs clone`: a new, independent store from a snapshot (or from the
//! live state of a store that is not mounted).
//!
//! The clone gets a new volume id and a fresh metadata key; its metadata
//! is sealed anew. Without `--reencrypt` it keeps the origin's content key
//! (re-wrapped for the new volume id, under the same or another master
//! key) and its chunk objects, hard-linked (copied across file systems);
//! its header's `data_id` names the origin's id, which those objects are
//! bound to. With `--reencrypt` it gets a fresh content key and every
//! chunk and inline file is decrypted and sealed again (copies).
//!
//! The clone is built in a temporary directory next to the destination
//! and renamed into place at the end, so a failed clone leaves nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use super::format::*;
use super::*;

/// Options for [`clone_store`].
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// Clone this snapshot; None: the live state (store not mounted).
    pub snapshot: Option<String>,
    /// Master key for the clone's content key [default: the origin's].
    pub kms_key: Option<String>,
    /// Fresh content key, every chunk re-sealed.
    pub reencrypt: bool,
}

/// What a clone did.
#[derive(Debug, Clone)]
pub struct CloneReport {
    pub volume_id: String,
    /// Master key id wrapping the clone's content key.
    pub content_key: String,
    /// Whether the clone shares its data (content) key with the origin.
    pub shares_data_key: bool,
    pub chunks: u64,
    pub linked: u64,
    pub copied: u64,
    pub reencrypted: u64,
    pub files: u64,
}

fn err_at(path: &Path, why: String) -> OpenError {
    OpenError::Refused {
        path: path.to_path_buf(),
        why,
    }
}

/// The state to clone: (seq, next_ino, records), and the source header,
/// VMK-derived metadata key and raw content key.
fn source_state(src: &Path, ks: &Keystore, snapshot: Option<&str>) -> Result<Source, OpenError> {
    if !src.join(HEADER_FILE).exists() {
        return Err(OpenError::NotAStore(src.to_path_buf()));
    }
    let src_store = super::open_store(src)?;
    let (hdr, vmk, vck) = read_header(&src_store, ks)?;
    let vck = vck?;
    if hdr.rekey.is_some() {
        return Err(err_at(
            src,
            format!(
                "a re-key is under way; finish it first with `sealfs rekey {}`",
                src.display()
            ),
        ));
    }
    let meta_key = AeadKey::new(&vmk.derive(LABEL_META));
    // The live state is cloned from a read-only open of the volume, kept
    // open (it holds the store lock) until every chunk is linked or copied:
    // nobody can commit and free chunks under the clone.
    let mut held = None;
    let body = match snapshot {
        Some(name) => {
            // Snapshot manifests are immutable and their chunks are kept
            // while the snapshot exists: no lock needed (the origin may be
            // mounted).
            let names = src_store.list(Kind::Meta).map_err(io_at(src))?;
            let dead = super::default_state_dir()
                .map(|d| {
                    super::snapshot::read_tombstones(&super::snapshot::tombstone_path(
                        &d,
                        &hdr.store_id,
                    ))
                })
                .unwrap_or_default();
            super::snapshot::find_snapshot(
                &src_store,
                &names,
                &meta_key,
                &hdr.store_id,
                name,
                &dead,
            )
            .map_err(|why| err_at(src, why))?
            .ok_or_else(|| OpenError::UnknownSnapshot {
                path: src.to_path_buf(),
                name: name.to_string(),
            })?
        }
        None => {
            let vol = Volume::open(
                src,
                ks,
                &OpenOptions2 {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| match e {
                OpenError::InUse { path, .. } => err_at(
                    &path,
                    format!(
                        "it is mounted or in use; take a snapshot and clone that instead: \
                         `sealfs snapshot create MOUNTPOINT NAME`, then `sealfs clone {}@NAME ...`",
                        path.display()
                    ),
                ),
                other => other,
            })?;
            let body = vol.live_records();
            held = Some(vol);
            body
        }
    };
    Ok((body, hdr, vck, held))
}

/// What is cloned: the state, the origin's header and content key, and (for
/// the live state) the read-only open volume that holds the store lock.
type Source = (SnapshotBody, HeaderBody, Key32, Option<Arc<Volume>>);

/// Check the destination: missing, or an empty directory.
fn check_dest(dest: &Path) -> Result<(), OpenError> {
    match fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(OpenError::NotEmpty(dest.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(OpenError::NotEmpty(dest.to_path_buf()))
        }
        Err(e) => Err(io_at(dest)(e)),
    }
}

/// Clone `src` (a snapshot of it, or its live state) into the new store
/// `dest`. `progress(done, total)` counts chunks.
pub fn clone_store(
    src: &Path,
    dest: &Path,
    ks: &Keystore,
    o: &CloneOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CloneReport, OpenError> {
    check_dest(dest)?;
    let target_key = o.kms_key.clone();
    if let Some(k) = &target_key {
        ks.check_usable(k)?;
    }
    let (mut body, hdr, vck, _lock) = source_state(src, ks, o.snapshot.as_deref())?;
    let dest = std::path::absolute(dest).map_err(io_at(dest))?;
    let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
    let leaf = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "clone".into());
    let tmp = parent.join(format!(
        ".{leaf}.sealfs-clone-{}",
        hex::encode(crypto::random_bytes::<6>())
    ));
    fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let r = build(src, &tmp, ks, o, target_key, &mut body, &hdr, vck, progress).and_then(|r| {
        // An existing empty destination directory is replaced atomically.
        fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
        store::sync_dir(&parent).map_err(io_at(&parent))?;
        Ok(r)
    });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn build(
    src: &Path,
    tmp: &Path,
    ks: &Keystore,
    o: &CloneOptions,
    target_key: Option<String>,
    body: &mut SnapshotBody,
    hdr: &HeaderBody,
    vck: Key32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CloneReport, OpenError> {
    LocalDirStore::init(tmp).map_err(io_at(tmp))?;
    let out = LocalDirStore::open(tmp).map_err(io_at(tmp))?;
    let from = LocalDirStore::open(src).map_err(io_at(src))?;
    let store_id: [u8; 16] = crypto::random_bytes();
    let vid = volume_id_hex(&store_id);
    let vmk = Key32::random();
    let (new_vck, data_id, gen) = if o.reencrypt {
        (Key32::random(), store_id, 1)
    } else {
        (vck.clone(), hdr.data_id, hdr.content_gen)
    };
    let target = target_key.unwrap_or_else(|| hdr.vck.key_id.clone());
    let svc = ks.service_key()?.id.clone();
    let wvmk = ks.wrap(&svc, &kms::volume_context(&vid, "metadata"), &vmk)?;
    let wvck = ks.wrap(&target, &kms::volume_context(&vid, "content"), &new_vck)?;
    let old_key = AeadKey::new(&vck.derive(LABEL_CONTENT));
    let new_key = AeadKey::new(&new_vck.derive(LABEL_CONTENT));

    // Every chunk once (a snapshot's files may share none, but be safe).
    let mut chunks: BTreeMap<[u8; 16], ChunkRef> = BTreeMap::new();
    // A re-encrypted clone also gets new object ids, so its objects cannot
    // be matched to the origin's by name.
    let mut renamed: BTreeMap<[u8; 16], [u8; 16]> = BTreeMap::new();
    let mut files = 0;
    for (ino, rec) in body.inodes.iter_mut() {
        match &mut rec.data {
            RecordData::ChunkedFile(c) => {
                files += 1;
                for (_, r) in c.iter_mut() {
                    chunks.insert(r.id, *r);
                    if o.reencrypt {
                        r.id = *renamed.entry(r.id).or_insert_with(crypto::random_bytes);
                    }
                }
            }
            RecordData::InlineFile(sealed) => {
                files += 1;
                if o.reencrypt {
                    let plain = zeroize::Zeroizing::new(
                        open_inline(&old_key, &hdr.data_id, *ino, sealed).map_err(|e| {
                            err_at(src, format!("inode {ino}: {e}; run `sealfs fsck`"))
                        })?,
                    );
                    *sealed = seal_inline(&new_key, &data_id, *ino, &plain);
                }
            }
            _ => {}
        }
    }
    let total = chunks.len() as u64;
    let mut report = CloneReport {
        volume_id: vid.clone(),
        content_key: ks.resolve(&target)?.id.clone(),
        shares_data_key: !o.reencrypt,
        chunks: total,
        linked: 0,
        copied: 0,
        reencrypted: 0,
        files,
    };
    progress(0, total);
    for (n, (id, r)) in chunks.iter().enumerate() {
        let name = hex::encode(id);
        let missing = |e: io::Error| {
            err_at(
                src,
                format!(
                    "chunk object {name} cannot be read ({e}); if the snapshot was deleted \
                     while cloning, that is why; otherwise run `sealfs fsck`"
                ),
            )
        };
        if o.reencrypt {
            let data = from
                .get(Kind::Chunk, &name, crate::store::MAX_OBJECT)
                .map_err(missing)?;
            let g = chunk_gen(&data).unwrap_or(0);
            let plain = zeroize::Zeroizing::new(
                open_chunk(&old_key, &hdr.data_id, id, g, r.len as usize, &data)
                    .map_err(|e| err_at(src, format!("chunk {name}: {e}; run `sealfs fsck`")))?,
            );
            let new_id = renamed[id];
            let obj = seal_chunk(&new_key, &data_id, &new_id, gen, &plain);
            out.put(Kind::Chunk, &hex::encode(new_id), &obj, false)
                .map_err(io_at(tmp))?;
            report.reencrypted += 1;
        } else {
            let linked = match out.link_from(&from, Kind::Chunk, &name) {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing(e)),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(missing(e)),
                Err(_) => false, // no hard links here: copy
            };
            if linked {
                report.linked += 1;
            } else {
                // another file system (EXDEV): copy, checking the size
                let want = super::snapshot::object_bytes(r);
                let data = from
                    .get(Kind::Chunk, &name, want as usize)
                    .map_err(missing)?;
                if data.len() as u64 != want {
                    return Err(missing(io::Error::other(format!(
                        "it has {} bytes, the object has {want}",
                        data.len()
                    ))));
                }
                out.put(Kind::Chunk, &name, &data, false)
                    .map_err(io_at(tmp))?;
                report.copied += 1;
            }
        }
        if n % 64 == 0 {
            progress(n as u64, total);
        }
    }
    progress(total, total);
    out.sync().map_err(io_at(tmp))?;
    let header = HeaderBody {
        store_id,
        created: kms::now_secs(),
        chunk_size: hdr.chunk_size,
        inline_max: hdr.inline_max,
        vmk: wvmk,
        vck: wvck,
        content_gen: gen,
        rekey: None,
        data_id,
    };
    let (meta_key, mac_key, _) = derive_keys(&vmk, &new_vck);
    // The clone's history starts at the commit it copies, so every chunk's
    // birth epoch is at most its first sequence number.
    let seq = body.seq;
    let ckpt = CheckpointBody {
        next_ino: body.next_ino,
        inodes: std::mem::take(&mut body.inodes),
        history: Vec::new(),
    };
    let (obj, _) = seal_checkpoint(&meta_key, &store_id, seq, &ckpt);
    out.put(Kind::Meta, &checkpoint_name(seq), &obj, true)
        .map_err(io_at(tmp))?;
    super::write_header(&out, &encode_header(&header, &mac_key))?;
    Ok(report)
}
