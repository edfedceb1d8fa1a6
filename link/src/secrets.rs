//! Secret files (keys, tokens) and private directories: created owner-only, and checked when
//! they already exist. A secret readable by others is refused with the command that fixes it
//! (a copy may already have leaked: the operator decides); a directory open to others is
//! closed (0700) and said in the log, since its contents are each checked on their own.

use std::path::Path;

use crate::LinkError;

/// Shortest token accepted from a file: 32 characters (128 bits of hex).
pub const MIN_TOKEN_CHARS: usize = 32;

/// The contents of a secret file, or `None` if there is none. Refuses a file that group or
/// others may read or write.
pub fn read_private(path: &Path) -> Result<Option<String>, LinkError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LinkError::io(path, e)),
    };
    check_owner_only(path, &meta)?;
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| LinkError::io(path, e))
}

#[cfg(unix)]
fn check_owner_only(path: &Path, meta: &std::fs::Metadata) -> Result<(), LinkError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(LinkError::Secret(format!(
            "{} holds a secret but its mode is {mode:04o} (group or others may read it): run \
             `chmod 600 {}`, and replace the secret if others could have read it",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_only(_: &Path, _: &std::fs::Metadata) -> Result<(), LinkError> {
    Ok(())
}

/// A bearer token kept in `path`: made on first use (32 random bytes, hex, mode 0600);
/// refused if the file is empty, shorter than [`MIN_TOKEN_CHARS`], or readable by others.
pub fn load_or_create_token(path: &Path, what: &str) -> Result<String, LinkError> {
    if let Some(text) = read_private(path)? {
        let token = text.trim();
        if token.is_empty() {
            return Err(LinkError::Secret(format!(
                "{} ({what}) is empty: an empty token would admit anyone. Delete the file to \
                 have a new token made at start, or write one of at least {MIN_TOKEN_CHARS} \
                 characters",
                path.display()
            )));
        }
        if token.chars().count() < MIN_TOKEN_CHARS || token.chars().any(char::is_whitespace) {
            return Err(LinkError::Secret(format!(
                "{} ({what}) holds a token of {} characters: use at least {MIN_TOKEN_CHARS}, \
                 no spaces (delete the file to have a strong one made at start)",
                path.display(),
                token.chars().count()
            )));
        }
        return Ok(token.to_string());
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    crate::pki::write_private(path, &token)?;
    Ok(token)
}

/// Creates `dir` (and its parents) and makes it owner-only (0700). Returns whether an existing
/// directory was open to others and was closed.
pub fn private_dir(dir: &Path) -> Result<bool, LinkError> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| LinkError::io(dir, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir).map_err(|e| LinkError::io(dir, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| LinkError::io(dir, e))?;
            return Ok(existed && mode & 0o077 != 0);
        }
    }
    Ok(false)
}

/// Equality of two secrets in time that depends only on their lengths' digests: both sides are
/// hashed (SHA-256) and the digests compared in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    same_secret_bytes(a.as_bytes(), b.as_bytes())
}

/// [`same_secret`] of bytes (an SNMP community).
pub fn same_secret_bytes(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let d = |s: &[u8]| ring::digest::digest(&ring::digest::SHA256, s);
    bool::from(d(a).as_ref().ct_eq(d(b).as_ref()))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn token_is_made_owner_only_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin.token");
        let t = load_or_create_token(&p, "admin token").unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(mode(&p), 0o600);
        assert_eq!(load_or_create_token(&p, "admin token").unwrap(), t);
    }

    #[test]
    fn empty_short_or_world_readable_tokens_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin.token");
        for (text, mode_bits, expect) in [
            ("", 0o600, "is empty"),
            ("\n", 0o600, "is empty"),
            ("hunter2", 0o600, "7 characters"),
            (&"a".repeat(40), 0o644, "chmod 600"),
            (&"a".repeat(40), 0o640, "chmod 600"),
        ] {
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode_bits)).unwrap();
            let e = load_or_create_token(&p, "admin token")
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect) && e.contains("admin.token"), "{e}");
        }
    }

    #[test]
    fn private_dirs_are_closed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        assert!(!private_dir(&p).unwrap());
        assert_eq!(mode(&p), 0o700);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&p).unwrap());
        assert_eq!(mode(&p), 0o700);
    }

    #[test]
    fn secrets_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("", "abc"));
    }
}
