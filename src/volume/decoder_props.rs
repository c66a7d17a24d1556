//! Property tests over the decoders of everything a store holds (the
//! store is hostile input): the header, journal records, checkpoints,
//! snapshot manifests and chunk objects, fed random bytes and valid
//! objects with random mutations (bit flips, truncation, extension,
//! length-field changes, overwritten bytes). Each returns an error (or,
//! for the unmodified object, the original), never panics, and allocates
//! no more than a bound independent of what length fields claim: inputs
//! whose length prefixes claim huge vectors fail fast, checked in a child
//! process whose address space is limited.

use super::*;
use crate::kms::WrappedKey;
use proptest::prelude::*;

fn rec(i: u64) -> InodeRecord {
    let t = Timespec {
        sec: 1_700_000_000 + i as i64,
        nsec: 5,
    };
    InodeRecord {
        kind: if i % 2 == 0 {
            FileKind::Dir
        } else {
            FileKind::File
        },
        perm: 0o644,
        uid: 1000,
        gid: 1000,
        nlink: 1,
        rdev: 0,
        size: i * 1000,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        xattrs: vec![(b"user.x".to_vec(), vec![i as u8; 3])],
        data: if i % 2 == 0 {
            RecordData::Dir {
                parent: 1,
                entries: vec![(format!("n{i}").into_bytes(), i + 1)],
            }
        } else {
            RecordData::ChunkedFile(vec![(
                0,
                ChunkRef {
                    id: [i as u8; 16],
                    epoch: i,
                    len: 4096,
                },
            )])
        },
    }
}

fn inodes(n: u64) -> Vec<(u64, InodeRecord)> {
    (1..=n).map(|i| (i, rec(i))).collect()
}

fn wrapped(tag: u8) -> WrappedKey {
    WrappedKey {
        key_id: format!("key-{tag}"),
        key_version: 1,
        sealed: vec![tag; 60],
    }
}

fn header_body() -> HeaderBody {
    HeaderBody {
        store_id: [3; 16],
        created: 1_700_000_000,
        chunk_size: 4096,
        inline_max: 1024,
        vmk: wrapped(1),
        vck: wrapped(2),
        content_gen: 1,
        rekey: None,
        data_id: [3; 16],
    }
}

/// A change to a valid object.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    SetByte(usize, u8),
    /// Overwrite 4 bytes at a position with a (little-endian) value.
    SetU32(usize, u32),
    /// Overwrite the object's own length field (`len_at`) with a value.
    LenField(u32),
    /// Remove a range.
    Cut(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        1 => (any::<usize>(), any::<u32>()).prop_map(|(p, v)| Mutation::SetU32(p, v)),
        2 => prop_oneof![
            any::<u32>(),
            Just(u32::MAX),
            Just(0u32),
            (0u32..64),
            Just(1 << 31)
        ]
        .prop_map(Mutation::LenField),
        1 => (any::<usize>(), 1usize..32).prop_map(|(p, n)| Mutation::Cut(p, n)),
    ]
}

/// Apply `m` to `orig`; `len_at` is the offset of the object's first
/// length field.
fn mutate(orig: &[u8], m: &Mutation, len_at: usize) -> Vec<u8> {
    let mut d = orig.to_vec();
    let n = d.len().max(1);
    match m {
        Mutation::Flip(p, b) => d[p % n] ^= 1 << b,
        Mutation::Truncate(p) => d.truncate(p % n),
        Mutation::Extend(x) => d.extend_from_slice(x),
        Mutation::SetByte(p, b) => {
            let p = p % n;
            if d[p] == *b {
                d[p] = !*b;
            } else {
                d[p] = *b;
            }
        }
        Mutation::SetU32(p, v) => {
            let p = p % n.saturating_sub(4).max(1);
            d[p..p + 4].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::LenField(v) => d[len_at..len_at + 4].copy_from_slice(&v.to_le_bytes()),
        Mutation::Cut(p, k) => {
            let p = p % n;
            let e = (p + k).min(d.len());
            d.drain(p..e);
        }
    }
    d
}

fn key() -> AeadKey {
    AeadKey::new(&Key32::random())
}

const SID: [u8; 16] = [9; 16];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_decode(data in proptest::collection::vec(any::<u8>(), 0..600), seq in 0u64..4) {
        let k = key();
        // magic checks first: random bytes are refused (a header that
        // happened to parse would still fail its MAC, checked below)
        let _ = decode_header(&data);
        prop_assert!(open_journal(&k, &SID, seq, &[0; TAG_LEN], &data).is_err());
        prop_assert!(open_checkpoint(&k, &SID, seq, &data).is_err());
        prop_assert!(open_snapshot(&k, &SID, seq, &data).is_err());
        prop_assert!(open_chunk(&k, &SID, &[1; 16], 1, 100, &data).is_err());
        // the same with a valid magic and version in front
        for magic in [JOURNAL_MAGIC, CHECKPOINT_MAGIC, SNAPSHOT_MAGIC, CHUNK_MAGIC] {
            let mut d = magic.to_vec();
            d.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
            d.extend_from_slice(&seq.to_le_bytes());
            d.extend_from_slice(&data);
            prop_assert!(open_journal(&k, &SID, seq, &[0; TAG_LEN], &d).is_err());
            prop_assert!(open_checkpoint(&k, &SID, seq, &d).is_err());
            prop_assert!(open_snapshot(&k, &SID, seq, &d).is_err());
            prop_assert!(open_chunk(&k, &SID, &[1; 16], 1, 100, &d).is_err());
        }
        let mut h = HEADER_MAGIC.to_vec();
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&data);
        h.extend_from_slice(&[0; 32]);
        if decode_header(&h).is_ok() {
            prop_assert!(!verify_header(&h, &Key32::random()));
        }
    }

    #[test]
    fn mutated_header_is_refused(m in mutation()) {
        let mac = Key32::random();
        let orig = encode_header(&header_body(), &mac);
        prop_assert_eq!(decode_header(&orig).unwrap(), header_body());
        prop_assert!(verify_header(&orig, &mac));
        let d = mutate(&orig, &m, 10);
        if d != orig {
            // the body is parsed before the MAC can be checked (its key
            // is unwrapped from the body): a change either does not parse
            // or fails the MAC
            prop_assert!(decode_header(&d).is_err() || !verify_header(&d, &mac));
        }
    }

    #[test]
    fn mutated_journal_record_is_refused(m in mutation(), n in 0u64..6, seq in 1u64..1000) {
        let k = key();
        let prev = [7u8; TAG_LEN];
        let body = JournalBody { next_ino: 99, upserts: inodes(n), deletes: vec![5, 6] };
        let (orig, tag) = seal_journal(&k, &SID, seq, &prev, &body);
        let (b, t) = open_journal(&k, &SID, seq, &prev, &orig).unwrap();
        prop_assert_eq!(&b, &body);
        prop_assert_eq!(t, tag);
        // another position in the chain, another store, another key
        prop_assert!(open_journal(&k, &SID, seq + 1, &prev, &orig).is_err());
        prop_assert!(open_journal(&k, &SID, seq, &[8; TAG_LEN], &orig).is_err());
        prop_assert!(open_journal(&k, &[1; 16], seq, &prev, &orig).is_err());
        prop_assert!(open_journal(&key(), &SID, seq, &prev, &orig).is_err());
        let d = mutate(&orig, &m, 14);
        if d != orig {
            prop_assert!(open_journal(&k, &SID, seq, &prev, &d).is_err());
        }
    }

    #[test]
    fn mutated_checkpoint_is_refused(m in mutation(), n in 0u64..6, seq in 1u64..1000) {
        let k = key();
        let body = CheckpointBody { next_ino: 77, inodes: inodes(n), history: (1..=n).map(|i| (i, [i as u8; TAG_LEN])).collect() };
        let (orig, _) = seal_checkpoint(&k, &SID, seq, &body);
        prop_assert_eq!(open_checkpoint(&k, &SID, seq, &orig).unwrap().0, body);
        prop_assert!(open_checkpoint(&k, &SID, seq + 1, &orig).is_err());
        prop_assert!(open_checkpoint(&k, &[1; 16], seq, &orig).is_err());
        let d = mutate(&orig, &m, 14);
        if d != orig {
            prop_assert!(open_checkpoint(&k, &SID, seq, &d).is_err());
        }
    }

    #[test]
    fn mutated_snapshot_manifest_is_refused(m in mutation(), n in 0u64..6, id in any::<u64>()) {
        let k = key();
        let body = SnapshotBody {
            name: "snap".into(),
            created: 1_700_000_000,
            seq: 12,
            next_ino: 40,
            inodes: inodes(n),
        };
        let orig = seal_snapshot(&k, &SID, id, &body);
        prop_assert_eq!(open_snapshot(&k, &SID, id, &orig).unwrap(), body);
        prop_assert!(open_snapshot(&k, &SID, id ^ 1, &orig).is_err());
        let d = mutate(&orig, &m, 14);
        if d != orig {
            prop_assert!(open_snapshot(&k, &SID, id, &d).is_err());
        }
    }

    #[test]
    fn mutated_chunk_is_refused(m in mutation(), len in 0usize..9000, gen in 1u32..4) {
        let k = key();
        let id = [4u8; 16];
        let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let orig = seal_chunk(&k, &SID, &id, gen, &plain);
        prop_assert_eq!(open_chunk(&k, &SID, &id, gen, len, &orig).unwrap(), plain.clone());
        prop_assert_eq!(chunk_gen(&orig), Some(gen));
        // wrong length (the length itself comes from the authenticated
        // file record: within the zero padding a longer one is not told
        // apart, beyond it or over non-zero bytes it is), id, generation
        prop_assert!(open_chunk(&k, &SID, &id, gen, padded_len(len.max(1)) + 1, &orig).is_err());
        if len > 0 && plain[len - 1] != 0 {
            prop_assert!(open_chunk(&k, &SID, &id, gen, len - 1, &orig).is_err());
        }
        prop_assert!(open_chunk(&k, &SID, &[5; 16], gen, len, &orig).is_err());
        prop_assert!(open_chunk(&k, &SID, &id, gen + 1, len, &orig).is_err());
        let d = mutate(&orig, &m, 6);
        if d != orig {
            prop_assert!(open_chunk(&k, &SID, &id, gen, len, &d).is_err());
        }
    }
}

#[test]
fn checkpoint_frames_cannot_be_dropped_reordered_or_duplicated() {
    // A checkpoint of more than one frame (frames are 1 MiB of plaintext):
    // cutting it at a frame boundary, swapping or repeating frames fails.
    let k = key();
    let mut big = inodes(4);
    for (_, r) in big.iter_mut() {
        r.xattrs = vec![(b"user.big".to_vec(), vec![0x5a; 700_000])];
    }
    let body = CheckpointBody {
        next_ino: 9,
        inodes: big,
        history: vec![(2, [1; TAG_LEN])],
    };
    let (obj, _) = seal_checkpoint(&k, &SID, 3, &body);
    assert_eq!(open_checkpoint(&k, &SID, 3, &obj).unwrap().0, body);
    let mut frames = Vec::new();
    let mut pos = 14;
    while pos < obj.len() {
        let len = u32::from_le_bytes(obj[pos..pos + 4].try_into().unwrap()) as usize;
        frames.push(obj[pos..pos + 4 + len].to_vec());
        pos += 4 + len;
    }
    assert!(frames.len() >= 3, "{} frames", frames.len());
    let build = |fs: &[Vec<u8>]| {
        let mut o = obj[..14].to_vec();
        for f in fs {
            o.extend_from_slice(f);
        }
        o
    };
    let n = frames.len();
    assert!(open_checkpoint(&k, &SID, 3, &build(&frames[..n - 1])).is_err());
    assert!(open_checkpoint(&k, &SID, 3, &build(&frames[1..])).is_err());
    let mut swapped = frames.clone();
    swapped.swap(0, 1);
    assert!(open_checkpoint(&k, &SID, 3, &build(&swapped)).is_err());
    let mut dup = frames.clone();
    dup.insert(1, frames[0].clone());
    assert!(open_checkpoint(&k, &SID, 3, &build(&dup)).is_err());
}

/// Inputs whose length prefixes claim huge vectors or strings: postcard
/// bodies of each kind, and a whole (unauthenticated) header. Each must
/// fail, quickly.
fn huge_prefix_cases() -> Vec<(String, Box<dyn Fn() -> bool>)> {
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }
    let mut cases: Vec<(String, Box<dyn Fn() -> bool>)> = Vec::new();
    for claim in [
        1u64 << 20,
        1 << 28,
        1 << 32,
        1 << 40,
        u64::MAX >> 1,
        u64::MAX,
    ] {
        // JournalBody: next_ino, then the upserts vector's length
        let mut j = varint(5);
        j.extend(varint(claim));
        j.extend_from_slice(&[1, 2, 3]);
        cases.push((
            format!("journal body claiming {claim} upserts"),
            Box::new(move || postcard::from_bytes::<JournalBody>(&j).is_err()),
        ));
        // an upsert whose xattr vector claims `claim` entries
        let mut j2 = varint(5);
        j2.extend(varint(1)); // one upsert
        j2.extend(varint(2)); // ino
        j2.extend(varint(0)); // kind
        j2.extend(varint(0o644));
        for _ in 0..4 {
            j2.extend(varint(1)); // uid gid nlink rdev
        }
        j2.extend(varint(10)); // size
        for _ in 0..4 {
            j2.extend(varint(1)); // timespec sec (zigzag)
            j2.extend(varint(0)); // nsec
        }
        j2.extend(varint(claim)); // xattrs
        cases.push((
            format!("journal upsert claiming {claim} xattrs"),
            Box::new(move || postcard::from_bytes::<JournalBody>(&j2).is_err()),
        ));
        let mut c = varint(5);
        c.extend(varint(claim));
        let mut ch = varint(5);
        ch.extend(varint(0)); // no inodes
        ch.extend(varint(claim)); // history entries
        cases.push((
            format!("checkpoint body claiming {claim} history entries"),
            Box::new(move || postcard::from_bytes::<CheckpointBody>(&ch).is_err()),
        ));
        cases.push((
            format!("checkpoint body claiming {claim} inodes"),
            Box::new(move || postcard::from_bytes::<CheckpointBody>(&c).is_err()),
        ));
        // SnapshotBody: the name string claims `claim` bytes
        let mut s = varint(claim);
        s.extend_from_slice(b"abc");
        cases.push((
            format!("snapshot body whose name claims {claim} bytes"),
            Box::new(move || postcard::from_bytes::<SnapshotBody>(&s).is_err()),
        ));
        // a header whose wrapped key's id string claims `claim` bytes,
        // through the whole (unauthenticated) decode_header
        let mut body = vec![3u8; 16]; // store_id
        body.extend(varint(1_700_000_000));
        body.extend(varint(4096));
        body.extend(varint(1024));
        body.extend(varint(claim));
        body.extend_from_slice(b"key");
        let mut h = HEADER_MAGIC.to_vec();
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(body.len() as u32).to_le_bytes());
        h.extend_from_slice(&body);
        h.extend_from_slice(&[0; 32]);
        cases.push((
            format!("header whose key id claims {claim} bytes"),
            Box::new(move || decode_header(&h).is_err()),
        ));
        // a header whose body length field claims more than there is
        let mut h2 = encode_header(&header_body(), &Key32::random());
        h2[10..14].copy_from_slice(&(claim as u32).to_le_bytes());
        cases.push((
            format!("header whose body length is {}", claim as u32),
            Box::new(move || claim as u32 as usize == h2.len() - 46 || decode_header(&h2).is_err()),
        ));
    }
    // framed objects whose frame length claims up to 4 GiB
    let k = Arc::new(key());
    for claim in [u32::MAX, 1 << 31, 1 << 24] {
        let body = CheckpointBody {
            next_ino: 1,
            inodes: inodes(2),
            history: Vec::new(),
        };
        let (mut obj, _) = seal_checkpoint(&k, &SID, 1, &body);
        obj[14..18].copy_from_slice(&claim.to_le_bytes());
        let k = k.clone();
        cases.push((
            format!("checkpoint whose frame claims {claim} bytes"),
            Box::new(move || open_checkpoint(&k, &SID, 1, &obj).is_err()),
        ));
    }
    cases
}

/// Address space this process has mapped (VmSize), in bytes.
fn vm_size() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

const CHILD_ENV: &str = "SEALFS_DECODER_BOUND_CHILD";

#[test]
fn huge_length_prefixes_fail_fast_within_a_memory_bound() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The child: limit the address space to what is mapped now plus
        // 64 MiB; an allocation beyond that aborts the process.
        const HEADROOM: u64 = 64 << 20;
        let limit = vm_size() + HEADROOM;
        rustix::process::setrlimit(
            rustix::process::Resource::As,
            rustix::process::Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            },
        )
        .unwrap();
        // the limit is real: a 256 MiB reservation fails now
        let mut probe: Vec<u8> = Vec::new();
        assert!(
            probe.try_reserve(256 << 20).is_err(),
            "the address-space limit does not hold"
        );
        for (what, case) in huge_prefix_cases() {
            let t = std::time::Instant::now();
            assert!(case(), "{what}: decoded");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{what}: took {:?}",
                t.elapsed()
            );
        }
        println!("decoder bound child: all cases failed fast");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "volume::decoder_props::huge_length_prefixes_fail_fast_within_a_memory_bound",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("decoder bound child: all cases failed fast"),
        "the decoders under a 64 MiB allocation bound: {}\n{so}\n{se}",
        out.status
    );
}
