//! POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`).
//!
//! With FUSE_POSIX_ACL the kernel caches ACLs and enforces them itself
//! (default_permissions); the daemon stores them and keeps them coherent
//! with the mode, as a local file system does:
//!
//! - an access ACL sets the mode's permission bits (owner, mask or owning
//!   group, other); one that says no more than the mode is stored as just
//!   the mode (as ext4 does);
//! - chmod rewrites the owner, mask (or owning group) and other entries;
//! - a new inode in a directory with a default ACL gets that ACL as its
//!   access ACL, limited by the create mode (the umask is not applied), and
//!   a new directory also inherits it as its default ACL (`posix_acl_create`
//!   in the kernel).
//!
//! The value is the kernel's xattr form: a little-endian u32 version (2),
//! then 8-byte entries (u16 tag, u16 perm, u32 id). The ACL crates
//! (exacl, posix-acl) work on paths through libacl, not on these bytes,
//! so the small parser lives here.

use std::collections::BTreeMap;

use super::state::Inode;
use super::{FileKind, FsError, FsResult};

/// The access ACL xattr.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The default ACL xattr (directories only).
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;
/// The id of entries that name no user or group.
const UNDEFINED_ID: u32 = u32::MAX;
/// At most this many entries (the kernel refuses values past a page).
const MAX_ENTRIES: usize = (4096 - HEADER) / ENTRY;

/// Entry tags, in the order a valid ACL lists them.
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    /// rwx, 3 bits.
    pub perm: u16,
    /// The user or group id for `USER` and `GROUP`; `UNDEFINED_ID` else.
    pub id: u32,
}

/// A valid ACL: one owner, owning-group and other entry, named entries
/// sorted by id without repeats, and a mask whenever there are named ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

/// Whether `name` is one of the ACL xattrs.
pub fn is_acl_name(name: &[u8]) -> bool {
    name == ACCESS || name == DEFAULT
}

impl Acl {
    /// Parse and validate an xattr value. `Ok(None)` for a value with no
    /// entries (which removes the ACL); EINVAL for anything malformed.
    pub fn parse(value: &[u8]) -> FsResult<Option<Acl>> {
        if value.len() < HEADER || (value.len() - HEADER) % ENTRY != 0 {
            return Err(FsError::INVAL);
        }
        let version = u32::from_le_bytes(value[..HEADER].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(FsError::INVAL);
        }
        let n = (value.len() - HEADER) / ENTRY;
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_ENTRIES {
            return Err(FsError::INVAL);
        }
        let mut entries = Vec::with_capacity(n);
        for e in value[HEADER..].chunks_exact(ENTRY) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]);
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            if perm & !7 != 0 {
                return Err(FsError::INVAL);
            }
            let id = match tag {
                USER | GROUP => id,
                USER_OBJ | GROUP_OBJ | MASK | OTHER => UNDEFINED_ID,
                _ => return Err(FsError::INVAL),
            };
            entries.push(Entry { tag, perm, id });
        }
        let acl = Acl { entries };
        acl.validate()?;
        Ok(Some(acl))
    }

    /// The checks of the kernel's `posix_acl_valid`.
    fn validate(&self) -> FsResult<()> {
        let mut last_tag = 0u16;
        let mut last_id: Option<u32> = None;
        let (mut user_obj, mut group_obj, mut other, mut mask, mut named) = (0, 0, 0, 0, 0);
        for e in &self.entries {
            if e.tag < last_tag {
                return Err(FsError::INVAL);
            }
            if e.tag != last_tag {
                last_id = None;
            }
            match e.tag {
                USER_OBJ => user_obj += 1,
                GROUP_OBJ => group_obj += 1,
                OTHER => other += 1,
                MASK => mask += 1,
                USER | GROUP => {
                    if last_id.is_some_and(|l| e.id <= l) {
                        return Err(FsError::INVAL);
                    }
                    last_id = Some(e.id);
                    named += 1;
                }
                _ => return Err(FsError::INVAL),
            }
            last_tag = e.tag;
        }
        if user_obj != 1 || group_obj != 1 || other != 1 || mask > 1 || (named > 0 && mask == 0) {
            return Err(FsError::INVAL);
        }
        Ok(())
    }

    /// The xattr value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + ENTRY * self.entries.len());
        v.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            v.extend_from_slice(&e.tag.to_le_bytes());
            v.extend_from_slice(&e.perm.to_le_bytes());
            v.extend_from_slice(&e.id.to_le_bytes());
        }
        v
    }

    /// The entries, in order.
    #[cfg(test)]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn perm_of(&self, tag: u16) -> u16 {
        self.entries
            .iter()
            .find(|e| e.tag == tag)
            .map_or(0, |e| e.perm)
    }

    /// Whether the ACL is more than the mode (named entries or a mask).
    pub fn is_extended(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.tag, USER | GROUP | MASK))
    }

    /// The permission bits (0o777) the ACL gives the mode: owner, the mask
    /// when there is one (else the owning group), other.
    pub fn mode_bits(&self) -> u16 {
        let group = if self.entries.iter().any(|e| e.tag == MASK) {
            self.perm_of(MASK)
        } else {
            self.perm_of(GROUP_OBJ)
        };
        (self.perm_of(USER_OBJ) << 6) | (group << 3) | self.perm_of(OTHER)
    }

    /// chmod: owner, mask (or owning group) and other take the mode's bits
    /// (the kernel's `__posix_acl_chmod`).
    pub fn chmod(&mut self, perm: u16) {
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => e.perm = (perm >> 6) & 7,
                MASK => e.perm = (perm >> 3) & 7,
                GROUP_OBJ if !has_mask => e.perm = (perm >> 3) & 7,
                OTHER => e.perm = perm & 7,
                _ => {}
            }
        }
    }

    /// Limit an inherited ACL by the create mode, and the mode by the ACL
    /// (the kernel's `posix_acl_create_masq`). Returns the new permission
    /// bits (0o777).
    pub fn create_masq(&mut self, perm: u16) -> u16 {
        let mut mode = perm & 0o777;
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => {
                    e.perm &= (mode >> 6) & 7;
                    mode &= (e.perm << 6) | !0o700;
                }
                OTHER => {
                    e.perm &= mode & 7;
                    mode &= e.perm | !0o007;
                }
                _ => {}
            }
        }
        let group_tag = if has_mask { MASK } else { GROUP_OBJ };
        if let Some(e) = self.entries.iter_mut().find(|e| e.tag == group_tag) {
            e.perm &= (mode >> 3) & 7;
            mode &= (e.perm << 3) | !0o070;
        }
        mode & 0o777
    }
}

/// Parse an ACL stored with an inode (authenticated metadata, written by
/// sealfs): `None` if absent or, defensively, if it does not parse.
fn stored(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>, name: &[u8]) -> Option<Acl> {
    let v = xattrs.get(name)?;
    match Acl::parse(v) {
        Ok(a) => a,
        Err(_) => {
            log::warn!(
                "ignoring a malformed stored {}",
                String::from_utf8_lossy(name)
            );
            None
        }
    }
}

/// setxattr of an ACL on `inode`: validate, then store it and bring the
/// mode in line. An access ACL equal to the mode is kept as the mode only;
/// a value without entries removes the ACL.
pub(crate) fn set(inode: &mut Inode, name: &[u8], value: &[u8]) -> FsResult<()> {
    if inode.kind == FileKind::Symlink {
        return Err(FsError::NOTSUP);
    }
    let acl = Acl::parse(value)?;
    if name == DEFAULT {
        if inode.kind != FileKind::Dir {
            return Err(if acl.is_some() {
                FsError(libc::EACCES)
            } else {
                FsError::NODATA
            });
        }
        match acl {
            Some(a) => {
                inode.xattrs.insert(DEFAULT.to_vec(), a.to_bytes());
            }
            None => {
                inode.xattrs.remove(DEFAULT);
            }
        }
        return Ok(());
    }
    match acl {
        Some(a) => {
            inode.perm = (inode.perm & !0o777) | a.mode_bits();
            if a.is_extended() {
                inode.xattrs.insert(ACCESS.to_vec(), a.to_bytes());
            } else {
                inode.xattrs.remove(ACCESS);
            }
        }
        None => {
            inode.xattrs.remove(ACCESS);
        }
    }
    Ok(())
}

/// chmod of `inode` (its new `perm` already set): the access ACL follows.
pub(crate) fn chmod(inode: &mut Inode) {
    if let Some(mut a) = stored(&inode.xattrs, ACCESS) {
        a.chmod(inode.perm);
        inode.xattrs.insert(ACCESS.to_vec(), a.to_bytes());
    }
}

/// A new `child` of `parent`: with a default ACL in the parent, inherit it
/// (the create mode limited by it, no umask); else apply the umask.
/// Symlinks have neither.
pub(crate) fn inherit(parent: &Inode, child: &mut Inode, umask: u32) {
    if child.kind == FileKind::Symlink {
        return;
    }
    let Some(default) = stored(&parent.xattrs, DEFAULT) else {
        child.perm &= !((umask & 0o777) as u16);
        return;
    };
    let mut access = default.clone();
    let bits = access.create_masq(child.perm);
    child.perm = (child.perm & !0o777) | bits;
    if access.is_extended() {
        child.xattrs.insert(ACCESS.to_vec(), access.to_bytes());
    }
    if child.kind == FileKind::Dir {
        child.xattrs.insert(DEFAULT.to_vec(), default.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::format::Timespec;
    use proptest::prelude::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const U: u32 = UNDEFINED_ID;

    fn file(perm: u16) -> Inode {
        Inode::new(FileKind::File, perm, 0, 0, 0, Timespec::default())
    }

    fn dir(perm: u16) -> Inode {
        Inode::new_dir(1, perm, 0, 0, Timespec::default())
    }

    #[test]
    fn parses_what_setfacl_sends() {
        let v = acl(&[
            (USER_OBJ, 6, U),
            (USER, 6, 1000),
            (GROUP_OBJ, 4, U),
            (MASK, 6, U),
            (OTHER, 4, U),
        ]);
        let a = Acl::parse(&v).unwrap().unwrap();
        assert_eq!(a.to_bytes(), v);
        assert_eq!(a.mode_bits(), 0o664);
        assert!(a.is_extended());
    }

    #[test]
    fn refuses_malformed_values() {
        let ok = [(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 5, U)];
        assert!(Acl::parse(&acl(&ok)).unwrap().is_some());
        let bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![2, 0, 0],
            {
                let mut v = acl(&ok);
                v[0] = 1; // version 1
                v
            },
            {
                let mut v = acl(&ok);
                v.push(0); // not a whole entry
                v
            },
            acl(&[(USER_OBJ, 8, U), (GROUP_OBJ, 5, U), (OTHER, 5, U)]), // perm > 7
            acl(&[(GROUP_OBJ, 5, U), (USER_OBJ, 7, U), (OTHER, 5, U)]), // unsorted
            acl(&[(USER_OBJ, 7, U), (OTHER, 5, U)]),                    // no group
            acl(&[
                (USER_OBJ, 7, U),
                (USER_OBJ, 7, U),
                (GROUP_OBJ, 5, U),
                (OTHER, 5, U),
            ]),
            acl(&[
                (USER_OBJ, 7, U),
                (USER, 7, 5),
                (GROUP_OBJ, 5, U),
                (OTHER, 5, U),
            ]), // no mask
            acl(&[
                (USER_OBJ, 7, U),
                (USER, 7, 5),
                (USER, 7, 5), // repeated id
                (GROUP_OBJ, 5, U),
                (MASK, 7, U),
                (OTHER, 5, U),
            ]),
            acl(&[
                (USER_OBJ, 7, U),
                (USER, 7, 6),
                (USER, 7, 5), // ids not sorted
                (GROUP_OBJ, 5, U),
                (MASK, 7, U),
                (OTHER, 5, U),
            ]),
            acl(&[
                (USER_OBJ, 7, U),
                (0x40, 7, U),
                (GROUP_OBJ, 5, U),
                (OTHER, 5, U),
            ]), // tag
        ];
        for v in bad {
            assert_eq!(Acl::parse(&v), Err(FsError::INVAL), "{v:?}");
        }
        assert_eq!(Acl::parse(&acl(&[])), Ok(None));
    }

    #[test]
    fn minimal_access_acl_is_the_mode() {
        let mut f = file(0o2644);
        set(
            &mut f,
            ACCESS,
            &acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 0, U), (OTHER, 1, U)]),
        )
        .unwrap();
        assert_eq!(f.perm, 0o2701);
        assert!(!f.xattrs.contains_key(ACCESS));
    }

    #[test]
    fn extended_access_acl_sets_group_bits_from_the_mask() {
        let mut f = file(0o644);
        let v = acl(&[
            (USER_OBJ, 6, U),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, U),
            (MASK, 5, U),
            (OTHER, 0, U),
        ]);
        set(&mut f, ACCESS, &v).unwrap();
        assert_eq!(f.perm, 0o650);
        assert_eq!(f.xattrs.get(ACCESS), Some(&v));
        // chmod changes the mask, not the owning group's entry
        f.perm = 0o604;
        chmod(&mut f);
        let a = Acl::parse(f.xattrs.get(ACCESS).unwrap()).unwrap().unwrap();
        assert_eq!(a.perm_of(MASK), 0);
        assert_eq!(a.perm_of(GROUP_OBJ), 4);
        assert_eq!(a.perm_of(OTHER), 4);
        assert_eq!(a.perm_of(USER), 7);
    }

    #[test]
    fn default_acl_only_on_directories() {
        let v = acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 5, U)]);
        let mut f = file(0o644);
        assert_eq!(set(&mut f, DEFAULT, &v), Err(FsError(libc::EACCES)));
        let mut d = dir(0o755);
        set(&mut d, DEFAULT, &v).unwrap();
        // a minimal default ACL is kept (it replaces the umask)
        assert_eq!(d.xattrs.get(DEFAULT), Some(&v));
        set(&mut d, DEFAULT, &acl(&[])).unwrap();
        assert!(!d.xattrs.contains_key(DEFAULT));
    }

    #[test]
    fn inheritance_ignores_the_umask() {
        let mut d = dir(0o755);
        let v = acl(&[
            (USER_OBJ, 7, U),
            (USER, 6, 1000),
            (GROUP_OBJ, 5, U),
            (MASK, 7, U),
            (OTHER, 0, U),
        ]);
        set(&mut d, DEFAULT, &v).unwrap();
        let mut f = file(0o666);
        inherit(&d, &mut f, 0o077);
        assert_eq!(f.perm, 0o660); // mask rw (create mode), other none
        let a = Acl::parse(f.xattrs.get(ACCESS).unwrap()).unwrap().unwrap();
        assert_eq!(a.perm_of(MASK), 6);
        assert_eq!(a.perm_of(USER_OBJ), 6);
        assert!(!f.xattrs.contains_key(DEFAULT));
        let mut sub = dir(0o777);
        inherit(&d, &mut sub, 0o077);
        assert_eq!(sub.perm & 0o777, 0o770);
        assert_eq!(sub.xattrs.get(DEFAULT), Some(&v));
        // without a default ACL the umask applies
        let mut g = file(0o666);
        inherit(&dir(0o755), &mut g, 0o022);
        assert_eq!(g.perm, 0o644);
        // symlinks take nothing
        let mut l = Inode::new(FileKind::Symlink, 0o777, 0, 0, 0, Timespec::default());
        inherit(&d, &mut l, 0o077);
        assert_eq!(l.perm, 0o777);
        assert!(l.xattrs.is_empty());
    }

    fn any_acl() -> impl Strategy<Value = Acl> {
        (
            0u16..8,
            0u16..8,
            0u16..8,
            proptest::option::of(0u16..8),
            proptest::collection::btree_map(0u32..100, 0u16..8, 0..4),
            proptest::collection::btree_map(0u32..100, 0u16..8, 0..4),
        )
            .prop_map(|(u, g, o, m, users, groups)| {
                let e = |tag, perm, id| Entry { tag, perm, id };
                let mut entries = vec![e(USER_OBJ, u, U)];
                entries.extend(users.iter().map(|(&id, &p)| e(USER, p, id)));
                entries.push(e(GROUP_OBJ, g, U));
                entries.extend(groups.iter().map(|(&id, &p)| e(GROUP, p, id)));
                let named = !users.is_empty() || !groups.is_empty();
                if let Some(m) = m.or(named.then_some(7)) {
                    entries.push(e(MASK, m, U));
                }
                entries.push(e(OTHER, o, U));
                Acl { entries }
            })
    }

    proptest! {
        #[test]
        fn valid_acls_roundtrip(a in any_acl()) {
            prop_assert_eq!(Acl::parse(&a.to_bytes()).unwrap(), Some(a));
        }

        #[test]
        fn parse_never_panics(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some(a)) = Acl::parse(&v) {
                prop_assert!(a.validate().is_ok());
            }
        }

        #[test]
        fn chmod_then_mode_bits_is_the_mode(a in any_acl(), perm in 0u16..0o1000) {
            let mut a = a;
            a.chmod(perm);
            prop_assert_eq!(a.mode_bits(), perm);
        }

        #[test]
        fn create_masq_never_grants_more(a in any_acl(), perm in 0u16..0o1000) {
            let mut b = a.clone();
            let bits = b.create_masq(perm);
            prop_assert_eq!(bits & !perm, 0);
            prop_assert_eq!(b.mode_bits(), bits);
            for (x, y) in a.entries().iter().zip(b.entries()) {
                prop_assert_eq!(y.perm & !x.perm, 0);
            }
        }
    }
}
