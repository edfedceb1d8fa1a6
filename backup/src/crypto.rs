//! The repository's keys and how a blob is sealed.
//!
//! - A repository has one set of [`Keys`]: the encryption key, the chunk-ID key (chunk IDs are
//!   keyed BLAKE3, so a partner holding the packs cannot test whether a known file is inside)
//!   and the chunker's seed (chunk boundaries depend on it, so they leak nothing either).
//! - [`KeyFile`]: the keys wrapped by a key derived with Argon2id from a passphrase (or the
//!   contents of a key file). A repository may have several key files, each wrapping the same
//!   keys: adding or removing a person's key re-encrypts nothing.
//! - A sealed blob is `suite (1 byte) ‖ nonce (24) ‖ ciphertext ‖ tag (16)`; suite 1 is
//!   XChaCha20-Poly1305 (random 192-bit nonces, no counter to keep). The associated data binds a
//!   blob to its ID, so a blob moved to another ID fails to open. A suite byte leaves room for
//!   SM4-GCM (国密) without a new format.

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::BackupError;

/// XChaCha20-Poly1305.
pub const SUITE_XCHACHA20_POLY1305: u8 = 1;
const NONCE: usize = 24;
const TAG: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE + TAG;

/// A chunk's name: keyed BLAKE3 of its plaintext.
pub type ChunkId = [u8; 32];

/// The repository's secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    enc: [u8; 32],
    id: [u8; 32],
    /// The chunker's seed.
    pub chunk_seed: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Fresh random keys for a new repository.
    pub fn generate() -> Keys {
        let mut rng = rand::rng();
        let mut k = Keys {
            enc: [0; 32],
            id: [0; 32],
            chunk_seed: rng.next_u64(),
        };
        rng.fill_bytes(&mut k.enc);
        rng.fill_bytes(&mut k.id);
        k
    }

    /// The ID of a chunk with this plaintext.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        *blake3::keyed_hash(&self.id, plain).as_bytes()
    }

    /// Seals `plain`, bound to `aad` (the blob's ID).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.enc).into());
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(SUITE_XCHACHA20_POLY1305);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut out[1 + NONCE..])
            .expect("XChaCha20-Poly1305 seals any length we give it");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a sealed blob bound to `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, BackupError> {
        let (&suite, rest) = sealed.split_first().ok_or(BackupError::Tampered)?;
        if suite != SUITE_XCHACHA20_POLY1305 {
            return Err(BackupError::UnknownSuite(suite));
        }
        if rest.len() < NONCE + TAG {
            return Err(BackupError::Tampered);
        }
        let (nonce, ct) = rest.split_at(NONCE);
        XChaCha20Poly1305::new((&self.enc).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| BackupError::Tampered)
    }

    /// A chunk (or a tree) as it is stored: compressed (zstd), then sealed under its ID.
    pub fn seal_chunk(&self, id: &ChunkId, plain: &[u8]) -> Result<Vec<u8>, BackupError> {
        Ok(self.seal(id, &compress(plain)?))
    }

    /// A stored chunk back to its plaintext, checked against its ID. `max_len` bounds what
    /// decompression may produce (the chunker's maximum, or the largest tree).
    pub fn open_chunk(
        &self,
        id: &ChunkId,
        sealed: &[u8],
        max_len: usize,
    ) -> Result<Vec<u8>, BackupError> {
        let plain = decompress(&self.open(id, sealed)?, max_len)?;
        if &self.chunk_id(&plain) != id {
            return Err(BackupError::Tampered);
        }
        Ok(plain)
    }

    /// A repository file (an index, a snapshot): compressed, sealed, bound to `aad`.
    pub fn seal_file(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, BackupError> {
        Ok(self.seal(aad, &compress(plain)?))
    }

    /// [`Keys::seal_file`] undone; decompression is bounded by `max_len`.
    pub fn open_file(
        &self,
        aad: &[u8],
        sealed: &[u8],
        max_len: usize,
    ) -> Result<Vec<u8>, BackupError> {
        decompress(&self.open(aad, sealed)?, max_len)
    }

    fn to_bytes(&self) -> [u8; 72] {
        let mut b = [0u8; 72];
        b[..32].copy_from_slice(&self.enc);
        b[32..64].copy_from_slice(&self.id);
        b[64..].copy_from_slice(&self.chunk_seed.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Keys> {
        (b.len() == 72).then(|| Keys {
            enc: b[..32].try_into().expect("32 bytes"),
            id: b[32..64].try_into().expect("32 bytes"),
            chunk_seed: u64::from_le_bytes(b[64..].try_into().expect("8 bytes")),
        })
    }
}

/// Argon2id's cost, stored with each key file so it can be raised later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about half a second on a small server core.
    fn default() -> KdfParams {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The keys wrapped for one holder (JSON, see `FORMAT.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u8,
    /// Who holds it ("ministry-ops", "dr-centre"): shown by `key list`.
    pub holder: String,
    pub created_ms: i64,
    pub kdf: String,
    pub params: KdfParams,
    /// Hex.
    pub salt: String,
    /// Hex: the keys sealed with the derived key.
    pub wrapped: String,
}

const KDF_ARGON2ID: &str = "argon2id";
/// What a key file's wrapped keys are bound to.
const KEYFILE_AAD: &[u8] = b"tiandi-backup keyfile v1";

/// zstd level 3 (what restic's `auto` is close to), one compression context per thread: a
/// context costs more to set up than a small file costs to compress.
fn compress(plain: &[u8]) -> Result<Vec<u8>, BackupError> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(
                zstd::bulk::Compressor::new(3)
                    .map_err(|e| BackupError::Compression(e.to_string()))?,
            );
        }
        c.as_mut()
            .expect("set above")
            .compress(plain)
            .map_err(|e| BackupError::Compression(e.to_string()))
    })
}

fn decompress(packed: &[u8], max_len: usize) -> Result<Vec<u8>, BackupError> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| BackupError::Compression(e.to_string()))?,
            );
        }
        d.as_mut()
            .expect("set above")
            .decompress(packed, max_len)
            .map_err(|e| BackupError::Compression(e.to_string()))
    })
}

fn derive(secret: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; 32], BackupError> {
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| BackupError::KeyFile(format!("Argon2id parameters: {e}")))?;
    let mut out = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(secret, salt, &mut out)
        .map_err(|e| BackupError::KeyFile(format!("Argon2id: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// Wraps `keys` for a holder of `secret` (a passphrase, or a key file's bytes). An empty
    /// secret is refused.
    pub fn wrap(
        keys: &Keys,
        holder: &str,
        secret: &[u8],
        params: KdfParams,
        now_ms: i64,
    ) -> Result<KeyFile, BackupError> {
        if secret.is_empty() {
            return Err(BackupError::KeyFile("the passphrase is empty".into()));
        }
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let kek = Keys {
            enc: derive(secret, &salt, params)?,
            id: [0; 32],
            chunk_seed: 0,
        };
        Ok(KeyFile {
            version: crate::FORMAT_VERSION,
            holder: holder.to_string(),
            created_ms: now_ms,
            kdf: KDF_ARGON2ID.into(),
            params,
            salt: hex::encode(salt),
            wrapped: hex::encode(kek.seal(KEYFILE_AAD, &keys.to_bytes())),
        })
    }

    /// The keys, for the holder of `secret`.
    pub fn unwrap(&self, secret: &[u8]) -> Result<Keys, BackupError> {
        if self.version > crate::FORMAT_VERSION {
            return Err(BackupError::Version(self.version));
        }
        if self.kdf != KDF_ARGON2ID {
            return Err(BackupError::KeyFile(format!(
                "unknown key derivation {:?} (argon2id)",
                self.kdf
            )));
        }
        let salt =
            unhex(&self.salt).ok_or_else(|| BackupError::KeyFile("salt is not hex".into()))?;
        let wrapped = unhex(&self.wrapped)
            .ok_or_else(|| BackupError::KeyFile("wrapped is not hex".into()))?;
        let kek = Keys {
            enc: derive(secret, &salt, self.params)?,
            id: [0; 32],
            chunk_seed: 0,
        };
        let plain = kek.open(KEYFILE_AAD, &wrapped).map_err(|e| match e {
            BackupError::Tampered => BackupError::WrongKey,
            e => e,
        })?;
        Keys::from_bytes(&plain)
            .ok_or_else(|| BackupError::KeyFile("wrapped keys have the wrong length".into()))
    }
}

/// Hex fields of a key file are short: a longer one is refused before it is decoded.
fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len() <= 4096).then(|| hex::decode(s).ok())?
}

/// Cheap parameters for tests: they check the wrapping, not Argon2id's cost.
#[cfg(test)]
pub(crate) const TEST_KDF: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = TEST_KDF;

    #[test]
    fn a_key_file_opens_with_its_passphrase_only() {
        let keys = Keys::generate();
        let f = KeyFile::wrap(&keys, "ministry", b"correct horse", FAST, 1).unwrap();
        let json = serde_json::to_string(&f).unwrap();
        let back: KeyFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.unwrap(b"correct horse").unwrap(), keys);
        assert!(matches!(
            back.unwrap(b"wrong horse"),
            Err(BackupError::WrongKey)
        ));
        // Two holders, one set of keys.
        let g = KeyFile::wrap(&keys, "dr-centre", b"another secret", FAST, 1).unwrap();
        assert_eq!(g.unwrap(b"another secret").unwrap(), keys);
        assert_ne!(f.wrapped, g.wrapped);
        assert!(
            KeyFile::wrap(&keys, "x", b"", FAST, 1).is_err(),
            "empty passphrase"
        );
        let mut newer = f.clone();
        newer.version = 9;
        assert!(matches!(
            newer.unwrap(b"correct horse"),
            Err(BackupError::Version(9))
        ));
    }

    #[test]
    fn a_sealed_chunk_opens_under_its_own_id_only() {
        let keys = Keys::generate();
        let plain = b"the province's database dump ".repeat(1000);
        let id = keys.chunk_id(&plain);
        let sealed = keys.seal_chunk(&id, &plain).unwrap();
        assert!(sealed.len() < plain.len() / 4, "compressed first");
        assert_eq!(keys.open_chunk(&id, &sealed, 1 << 20).unwrap(), plain);
        // Another ID, a flipped byte, another repository, an unknown suite: refused.
        let other = keys.chunk_id(b"x");
        assert!(matches!(
            keys.open_chunk(&other, &sealed, 1 << 20),
            Err(BackupError::Tampered)
        ));
        let mut bad = sealed.clone();
        bad[40] ^= 1;
        assert!(matches!(
            keys.open_chunk(&id, &bad, 1 << 20),
            Err(BackupError::Tampered)
        ));
        assert!(Keys::generate().open_chunk(&id, &sealed, 1 << 20).is_err());
        let mut suite = sealed.clone();
        suite[0] = 2;
        assert!(matches!(
            keys.open(&id, &suite),
            Err(BackupError::UnknownSuite(2))
        ));
        assert!(keys.open(&id, &sealed[..10]).is_err(), "truncated");
        // Chunk IDs depend on the repository's key.
        assert_ne!(Keys::generate().chunk_id(&plain), id);
    }
}
