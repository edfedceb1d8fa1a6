//! TOML configuration files shared by every binary: errors name the file and the key.

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Key {
        file: String,
        key: String,
        message: String,
    },
}

/// Parses `text` (read from `file`) into `T`. Unknown keys are errors when `T` says
/// `deny_unknown_fields`, and the error names the key's full path (`admission.handshakes_per_s`).
pub fn parse_toml<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        file: file.to_string(),
        message: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = one_line(&e.inner().to_string());
        if key == "." || key.is_empty() {
            ConfigError::Syntax {
                file: file.to_string(),
                message,
            }
        } else {
            ConfigError::Key {
                file: file.to_string(),
                key,
                message,
            }
        }
    })
}

pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse_toml(&file, &text)
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Inner,
    }
    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        #[serde(default)]
        rate: u32,
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse_toml::<Outer>("a.toml", "name = \"x\"\n[inner]\nrate = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml: key `inner.rate`"), "{e}");
        let e = parse_toml::<Outer>("b.toml", "name = \"x\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("b.toml") && e.contains("bogus"), "{e}");
        let e = parse_toml::<Outer>("c.toml", "name = [\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:"), "{e}");
        let e = parse_toml::<Outer>("d.toml", "").unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
    }
}
