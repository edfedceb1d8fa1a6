//! The one grammar for names that come from outside (a certificate, a token, the network, a
//! form, a config) and the one way a path is built from such a name.
//!
//! - Identifiers (site IDs, province codes, room names, relay names): [`validate_name`], 1–64 of
//!   `[A-Za-z0-9._-]`, first a letter or a digit. ASCII only, so no Unicode look-alike of `.`
//!   or `/` passes; no leading `.`, so `.`, `..` and hidden names never do.
//! - File names (what a transfer or a recording is called): [`validate_file_name`], 1–200 bytes
//!   of UTF-8 (a part file `NAME.<hash>.part` still fits in 255), no `/`, `\`, NUL or control
//!   character, not starting with `.`. Chinese file names pass: the ministry's files have them.
//! - Paths: [`join`] checks the name as a file name (every identifier is one) and refuses a
//!   symlink already there; it never leaves its directory, because a valid name is one
//!   component that is neither `.` nor `..`.

use std::path::{Path, PathBuf};

use crate::LinkError;

/// Longest file name accepted: 200 bytes leaves room for the suffixes part files carry.
pub const MAX_FILE_NAME: usize = 200;
/// Longest identifier (site ID, province, room).
pub const MAX_ID: usize = 64;

/// Site IDs, province codes, room and relay names.
pub fn validate_name(what: &str, s: &str) -> Result<(), LinkError> {
    let ok = s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LinkError::BadName(format!(
            "{what} {}: use 1-{MAX_ID} letters, digits, '.', '_' or '-', starting with a letter \
             or a digit",
            shown(s)
        )))
    }
}

/// File names: one path component, 1–200 bytes, no `/`, `\`, NUL or control character, not
/// starting with `.`.
pub fn validate_file_name(what: &str, s: &str) -> Result<(), LinkError> {
    let why = if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_FILE_NAME {
        Some("is longer than 200 bytes")
    } else if s.starts_with('.') {
        Some("starts with '.'")
    } else if s.contains(['/', '\\']) {
        Some("contains '/' or '\\'")
    } else if s.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(LinkError::BadName(format!("{what} {} {why}", shown(s)))),
    }
}

/// `dir/name`, for a `name` from outside: the name must pass [`validate_file_name`] (so the
/// path stays in `dir`), and what is already at the path must not be a symlink (we never make
/// one; one that is there was planted).
pub fn join(dir: &Path, what: &str, name: &str) -> Result<PathBuf, LinkError> {
    validate_file_name(what, name)?;
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => Err(LinkError::BadName(format!(
            "{}: is a symbolic link (Tiandi never makes one here); refusing to follow it",
            path.display()
        ))),
        _ => Ok(path),
    }
}

/// A name in an error message: quoted, escaped, cut at 80 characters (a hostile name may be
/// long or carry terminal escapes).
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    if cut.len() < s.len() {
        format!("{cut:?}… ({} bytes)", s.len())
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(validate_name("site ID", "site-01.a_b").is_ok());
        assert!(validate_name("site ID", "GD").is_ok());
        assert!(validate_name("site ID", &"x".repeat(64)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-rf",
            "_x",
            "a/b",
            "a\\b",
            "%2e%2e",
            "..%2f",
            "\u{ff0e}\u{ff0e}",
            "\u{2024}\u{2024}",
            "a\u{2215}b",
            "caf\u{e9}",
            "a\0b",
            "a b",
        ] {
            assert!(validate_name("site ID", bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("site ID", &"x".repeat(65)).is_err());
        assert!(validate_name("site ID", &"x".repeat(256)).is_err());
    }

    #[test]
    fn file_names() {
        for good in [
            "report.pdf",
            "年度报告.docx",
            "a..b",
            "x%2e",
            &"y".repeat(200),
        ] {
            assert!(validate_file_name("file", good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".bashrc",
            "a/b",
            "../x",
            "a\\b",
            "a\0b",
            "a\nb",
            "\u{1b}[2J",
            &"y".repeat(201),
            &"y".repeat(256),
        ] {
            assert!(validate_file_name("file", bad).is_err(), "{bad:?}");
        }
        // 200 bytes of three-byte characters is 66 characters; 67 is over.
        assert!(validate_file_name("file", &"报".repeat(66)).is_ok());
        assert!(validate_file_name("file", &"报".repeat(67)).is_err());
    }

    #[test]
    fn join_stays_in_its_directory_and_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(join(d.path(), "file", "a").unwrap(), d.path().join("a"));
        assert!(join(d.path(), "file", "..").is_err());
        assert!(join(d.path(), "file", "../a").is_err());
        assert!(join(d.path(), "file", "/etc/passwd").is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", d.path().join("planted")).unwrap();
            let e = join(d.path(), "file", "planted").unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
        }
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        let e = validate_name("site ID", &"z".repeat(5000))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("5000 bytes"), "{e}");
    }
}
