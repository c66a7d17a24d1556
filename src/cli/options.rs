//! Parsing of `-o` mount options (also used by the fstab mount helper).

use std::path::PathBuf;

/// `log=syslog` sends a background mount's log to syslog/journald.
pub const LOG_SYSLOG: &str = "syslog";

/// Parsed mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOpts {
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub noatime: bool,
    /// `strictatime`: every read the daemon serves updates atime (the
    /// default is `relatime`).
    pub strictatime: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub keystore: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    pub threads: usize,
    pub cache_mib: usize,
    pub dirty_mib: usize,
    pub commit_secs: u64,
    pub log: Option<PathBuf>,
    pub debug: bool,
    pub nonempty: bool,
    /// Mount this snapshot (read-only).
    pub snapshot: Option<String>,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            read_only: false,
            allow_other: false,
            allow_root: false,
            noatime: false,
            strictatime: false,
            nosuid: false,
            nodev: false,
            noexec: false,
            keystore: None,
            key_file: None,
            passphrase_file: None,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(4),
            cache_mib: 256,
            dirty_mib: 512,
            commit_secs: 5,
            log: None,
            debug: false,
            nonempty: false,
            snapshot: None,
        }
    }
}

/// Options accepted for compatibility with mount(8) and fstab and ignored.
fn is_generic(o: &str) -> bool {
    matches!(
        o,
        "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "default_permissions"
            | "async"
            | "lazytime"
            | "nolazytime"
            | "exec"
            | "suid"
            | "dev"
    ) || o.starts_with("x-")
        || o.starts_with("comment=")
}

/// Parse a comma-separated option list into `opts`. Unknown or malformed
/// options are errors that name the option.
pub fn parse_into(opts: &mut MountOpts, list: &str) -> Result<(), String> {
    for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        let need = |v: Option<&str>| -> Result<String, String> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(format!("mount option '{k}' needs a value, as in {k}=VALUE")),
            }
        };
        let num = |v: Option<&str>, lo: u64, hi: u64| -> Result<u64, String> {
            let s = need(v)?;
            match s.parse::<u64>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(format!(
                    "mount option '{k}={s}' is invalid: use a whole number from {lo} to {hi}"
                )),
            }
        };
        let flag = |v: Option<&str>| -> Result<(), String> {
            match v {
                None => Ok(()),
                Some(_) => Err(format!("mount option '{k}' takes no value")),
            }
        };
        match k {
            "ro" => {
                flag(v)?;
                opts.read_only = true
            }
            "rw" => {
                flag(v)?;
                opts.read_only = false
            }
            "allow_other" => {
                flag(v)?;
                opts.allow_other = true
            }
            "allow_root" => {
                flag(v)?;
                opts.allow_root = true
            }
            // The last of noatime, strictatime, relatime, atime wins.
            "noatime" => {
                flag(v)?;
                opts.noatime = true;
                opts.strictatime = false
            }
            "strictatime" => {
                flag(v)?;
                opts.noatime = false;
                opts.strictatime = true
            }
            "relatime" | "atime" => {
                flag(v)?;
                opts.noatime = false;
                opts.strictatime = false
            }
            "nosuid" => {
                flag(v)?;
                opts.nosuid = true
            }
            "nodev" => {
                flag(v)?;
                opts.nodev = true
            }
            "noexec" => {
                flag(v)?;
                opts.noexec = true
            }
            "debug" => {
                flag(v)?;
                opts.debug = true
            }
            "nonempty" => {
                flag(v)?;
                opts.nonempty = true
            }
            "keystore" => opts.keystore = Some(need(v)?.into()),
            "key_file" => opts.key_file = Some(need(v)?.into()),
            "passphrase_file" => opts.passphrase_file = Some(need(v)?.into()),
            "log" => opts.log = Some(need(v)?.into()),
            "snapshot" => {
                let name = need(v)?;
                if crate::volume::snapshot::check_snapshot_name(&name).is_err() {
                    return Err(format!("mount option '{o}': invalid snapshot name"));
                }
                opts.snapshot = Some(name);
            }
            "threads" => opts.threads = num(v, 1, 64)? as usize,
            "cache_size" => opts.cache_mib = num(v, 1, 65536)? as usize,
            "dirty_size" => opts.dirty_mib = num(v, 1, 65536)? as usize,
            "commit_interval" => opts.commit_secs = num(v, 1, 3600)?,
            _ if is_generic(k) => {}
            _ => {
                return Err(format!(
                "unknown mount option '{o}'; see `sealfs mount --help` for the supported options"
            ))
            }
        }
    }
    if opts.allow_other && opts.allow_root {
        return Err(
            "mount options 'allow_other' and 'allow_root' exclude each other; pick one".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_options() {
        let mut o = MountOpts::default();
        parse_into(
            &mut o,
            "ro,allow_other,noatime,keystore=/k,key_file=/kf,threads=8,cache_size=128,nofail,_netdev,x-systemd.automount,defaults",
        )
        .unwrap();
        assert!(o.read_only && o.allow_other && o.noatime);
        assert_eq!(o.keystore, Some(PathBuf::from("/k")));
        assert_eq!(o.key_file, Some(PathBuf::from("/kf")));
        assert_eq!(o.threads, 8);
        assert_eq!(o.cache_mib, 128);
    }

    #[test]
    fn atime_options_last_wins() {
        let mut o = MountOpts::default();
        assert!(!o.noatime && !o.strictatime, "relatime by default");
        parse_into(&mut o, "strictatime").unwrap();
        assert!(!o.noatime && o.strictatime);
        parse_into(&mut o, "noatime").unwrap();
        assert!(o.noatime && !o.strictatime);
        parse_into(&mut o, "noatime,relatime").unwrap();
        assert!(!o.noatime && !o.strictatime);
        parse_into(&mut o, "strictatime,atime").unwrap();
        assert!(!o.noatime && !o.strictatime);
    }

    #[test]
    fn rejects_bad_options_by_name() {
        for (s, needle) in [
            ("bogus", "unknown mount option 'bogus'"),
            ("threads=0", "threads=0"),
            ("threads=abc", "threads=abc"),
            ("keystore", "needs a value"),
            ("ro=1", "takes no value"),
            ("allow_other,allow_root", "exclude each other"),
        ] {
            let mut o = MountOpts::default();
            let e = parse_into(&mut o, s).unwrap_err();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }
}

/// Property tests: the option parser returns Ok or a named error for any
/// input, never panics, and never accepts an out-of-range number.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "ro",
        "rw",
        "allow_other",
        "allow_root",
        "noatime",
        "nosuid",
        "nodev",
        "noexec",
        "keystore",
        "key_file",
        "passphrase_file",
        "threads",
        "cache_size",
        "dirty_size",
        "commit_interval",
        "log",
        "debug",
        "nonempty",
        "snapshot",
        "defaults",
        "x-foo",
        "comment",
        "bogus",
        "",
    ];

    fn token() -> impl Strategy<Value = String> {
        (
            prop::sample::select(KEYS),
            prop::option::of(prop_oneof![
                "[0-9]{0,25}",
                "-?[0-9]{1,5}",
                ".{0,12}",
                Just(String::new()),
            ]),
        )
            .prop_map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.to_string(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_strings_never_panic(s in ".{0,200}") {
            let mut o = MountOpts::default();
            let _ = parse_into(&mut o, &s);
        }

        #[test]
        fn option_lists_never_panic_and_numbers_stay_in_range(
            toks in prop::collection::vec(token(), 0..12),
            sep in prop::sample::select(&[",", ", ", ",,", "=", " "][..]),
        ) {
            let list = toks.join(sep);
            let mut o = MountOpts::default();
            match parse_into(&mut o, &list) {
                Ok(()) => {
                    prop_assert!(o.threads >= 1);
                    prop_assert!(!(o.allow_other && o.allow_root));
                }
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        #[test]
        fn mutated_valid_lists_never_panic(
            flips in prop::collection::vec((0usize..200, any::<u8>()), 1..8),
        ) {
            let mut b = b"ro,allow_other,noatime,keystore=/k,key_file=/kf,threads=8,cache_size=128,nofail".to_vec();
            for (i, x) in flips {
                let n = b.len();
                b[i % n] = x;
            }
            let s = String::from_utf8_lossy(&b);
            let mut o = MountOpts::default();
            let _ = parse_into(&mut o, &s);
        }
    }
}
