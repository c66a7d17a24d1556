//! mount(8) helper calling conventions.
//!
//! `mount -t fuse.sealfs STORE DIR -o OPTS` runs `/sbin/mount.fuse.sealfs
//! STORE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]`, which `scripts/install.sh`
//! links to the `sealfs` binary. The fuse3 package's `mount.fuse3` runs
//! `sealfs STORE DIR -o OPTS` instead. Both are rewritten here into the
//! ordinary `sealfs mount -o OPTS STORE DIR` before clap sees them.

use std::ffi::{OsStr, OsString};
use std::path::Path;

/// Names the binary answers to as a mount helper.
const HELPER_NAMES: &[&str] = &["mount.fuse.sealfs", "mount.sealfs"];

/// Subcommands of the normal CLI (a first argument that names one of these
/// is never taken as a store path).
const SUBCOMMANDS: &[&str] = &[
    "init", "key", "create", "mount", "umount", "unmount", "status", "info", "help",
];

/// If `args` is a helper invocation, the equivalent `sealfs mount` argv;
/// `Ok(None)` if it is an ordinary command line. Errors name the bad
/// argument.
pub fn translate(args: &[OsString]) -> Result<Option<Vec<OsString>>, String> {
    let argv0 = args
        .first()
        .map(|a| Path::new(a).file_name().unwrap_or(a.as_os_str()).to_owned())
        .unwrap_or_default();
    let as_helper = HELPER_NAMES.iter().any(|n| argv0 == OsStr::new(n));
    let rest = &args[1.min(args.len())..];
    // mount.fuse3 style: `sealfs STORE DIR -o OPTS` with STORE an existing
    // directory that is not a subcommand name.
    let fuse3_style = !as_helper
        && rest.len() >= 2
        && rest.first().is_some_and(|a| {
            let s = a.to_string_lossy();
            !s.starts_with('-') && !SUBCOMMANDS.contains(&s.as_ref()) && Path::new(a).is_dir()
        });
    if !as_helper && !fuse3_style {
        return Ok(None);
    }
    let mut positional: Vec<OsString> = Vec::new();
    let mut opts: Vec<OsString> = Vec::new();
    let (mut fake, mut verbose) = (false, 0u8);
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].to_string_lossy().into_owned();
        i += 1;
        if !a.starts_with('-') || a == "-" {
            positional.push(rest[i - 1].clone());
            continue;
        }
        if a == "--" {
            positional.extend(rest[i..].iter().cloned());
            break;
        }
        let flags: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < flags.len() {
            let c = flags[j];
            j += 1;
            match c {
                's' | 'n' => {} // sloppy, no mtab: nothing to do
                'f' => fake = true,
                'v' => verbose = verbose.saturating_add(1),
                'o' | 't' | 'N' => {
                    let tail: String = flags[j..].iter().collect();
                    let val = if !tail.is_empty() {
                        OsString::from(tail)
                    } else if i < rest.len() {
                        i += 1;
                        rest[i - 1].clone()
                    } else {
                        return Err(format!("mount helper: -{c} needs a value"));
                    };
                    match c {
                        'o' => opts.push(val),
                        't' => {
                            let t = val.to_string_lossy();
                            if t != "fuse.sealfs" && t != "sealfs" && t != "fuse" {
                                return Err(format!(
                                    "mount helper: file system type '{t}' is not sealfs"
                                ));
                            }
                        }
                        _ => {
                            return Err(
                                "mount helper: mounting in another namespace (-N) is not supported"
                                    .into(),
                            )
                        }
                    }
                    j = flags.len();
                }
                _ => return Err(format!("mount helper: unknown flag -{c}")),
            }
        }
    }
    if positional.len() != 2 {
        return Err(format!(
            "mount helper: expected STORE and MOUNTPOINT, got {} arguments; \
             usage: mount -t fuse.sealfs [-o OPTIONS] STORE MOUNTPOINT",
            positional.len()
        ));
    }
    let mut out: Vec<OsString> = vec!["sealfs".into()];
    for _ in 0..verbose {
        out.push("-v".into());
    }
    out.push("mount".into());
    if fake {
        out.push("--fake".into());
    }
    for o in opts {
        out.push("-o".into());
        out.push(o);
    }
    out.push("--".into());
    out.extend(positional);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> Result<Option<Vec<String>>, String> {
        let args: Vec<OsString> = v.iter().map(OsString::from).collect();
        translate(&args).map(|o| {
            o.map(|v| {
                v.into_iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect()
            })
        })
    }

    #[test]
    fn ordinary_command_lines_pass_through() {
        assert_eq!(t(&["sealfs", "mount", "/tmp", "/tmp"]).unwrap(), None);
        assert_eq!(t(&["/usr/bin/sealfs", "status"]).unwrap(), None);
        assert_eq!(t(&["sealfs", "--help"]).unwrap(), None);
        assert_eq!(t(&["sealfs"]).unwrap(), None);
    }

    #[test]
    fn mount8_helper_arguments() {
        let r = t(&[
            "/sbin/mount.fuse.sealfs",
            "/srv/s",
            "/mnt/m",
            "-n",
            "-o",
            "rw,key_file=/k",
            "-t",
            "fuse.sealfs",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            r,
            [
                "sealfs",
                "mount",
                "-o",
                "rw,key_file=/k",
                "--",
                "/srv/s",
                "/mnt/m"
            ]
        );
        let r = t(&["mount.sealfs", "-sfv", "/srv/s", "/mnt/m", "-oro"])
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            ["sealfs", "-v", "mount", "--fake", "-o", "ro", "--", "/srv/s", "/mnt/m"]
        );
    }

    #[test]
    fn fuse3_style_needs_an_existing_store_dir() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().to_str().unwrap();
        let r = t(&["sealfs", s, "/mnt/m", "-o", "ro"]).unwrap().unwrap();
        assert_eq!(r, ["sealfs", "mount", "-o", "ro", "--", s, "/mnt/m"]);
        assert_eq!(t(&["sealfs", "/nonexistent-x", "/mnt/m"]).unwrap(), None);
    }

    #[test]
    fn helper_errors_name_the_problem() {
        assert!(t(&["mount.fuse.sealfs", "/s"])
            .unwrap_err()
            .contains("expected STORE"));
        assert!(t(&["mount.fuse.sealfs", "/s", "/m", "-o"])
            .unwrap_err()
            .contains("-o needs a value"));
        assert!(t(&["mount.fuse.sealfs", "/s", "/m", "-t", "ext4"])
            .unwrap_err()
            .contains("'ext4'"));
        assert!(t(&["mount.fuse.sealfs", "/s", "/m", "-N", "x"])
            .unwrap_err()
            .contains("namespace"));
        assert!(t(&["mount.fuse.sealfs", "/s", "/m", "-q"])
            .unwrap_err()
            .contains("-q"));
    }
}
