//! Tiandi's backup repository format: content-defined chunks ([`chunker`]), named by keyed
//! BLAKE3, compressed with zstd and sealed with an authenticated cipher ([`crypto`]), gathered
//! into packs whose trailer a storing partner can read and verify without the key
//! ([`pack`]). `FORMAT.md` is the byte-level description, versioned.
//!
//! [`repo`] keeps a repository on a [`backend::Backend`] (a local directory, or an S3 bucket:
//! [`s3`]): init, open, back up, list, browse, restore, prune; [`policy`] decides which
//! snapshots a retention policy keeps.

pub mod backend;
pub mod chunker;
pub mod crypto;
pub mod job;
pub mod pack;
pub mod partner;
pub mod policy;
pub mod repo;
pub mod s3;
pub mod schedule;
pub mod scheduler;
pub mod snapshot;

/// The repository format this crate writes (and the newest it reads).
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("wrong passphrase or key file, or the key file was changed")]
    WrongKey,
    #[error("cipher suite {0} is not known to this version (1 = XChaCha20-Poly1305)")]
    UnknownSuite(u8),
    #[error("format version {0} is newer than this program reads ({FORMAT_VERSION})")]
    Version(u8),
    #[error("a blob failed authentication: it was changed, or belongs to another repository")]
    Tampered,
    #[error("pack: {0}")]
    BadPack(String),
    #[error("key file: {0}")]
    KeyFile(String),
    /// An I/O error; its message names the file or object.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("compression: {0}")]
    Compression(String),
}
