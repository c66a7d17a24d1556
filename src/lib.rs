//! sealfs: an encrypted FUSE filesystem with KMS-style key management.
//!
//! Layers (see docs/ and ../shared/DESIGN.md):
//! - [`crypto`]: AEAD, HKDF, zeroizing key types
//! - [`kms`]: the local keystore (master keys, wrap/unwrap)
//! - [`store`]: the object-store trait and the local-directory backend
//! - [`volume`]: header, chunks, journal, checkpoints; no FUSE here
//! - [`fuse`]: the fuser adapter, a translator with no policy
//! - [`cli`]: subcommands, option parsing, daemonizing

#![forbid(unsafe_code)]

pub mod cli;
pub mod crypto;
pub mod fuse;
pub mod kms;
pub mod store;
pub mod volume;
