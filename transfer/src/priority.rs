//! A transfer's priority class: `alarm`, `normal`, `bulk` or `backup`, parsed once at the edge
//! ([`std::str::FromStr`]) and written back the same way ([`std::fmt::Display`], serde).

/// A transfer's priority class. Its string forms are `"alarm"`, `"normal"`, `"bulk"` and
/// `"backup"` (serde
/// too). Jobs, offers and inbox states carry it as the string; [`Priority::class_of`] reads
/// such a string as the drivers and stream priorities do (anything unknown is normal).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Goes first: one alarm transfer never waits behind another class.
    Alarm,
    #[default]
    Normal,
    Bulk,
    /// Backup repositories shipped to their partner: below everything else, so a backup never
    /// holds back a report, an alarm or an operator's file.
    Backup,
}

/// A string that names no priority class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?}: alarm, normal, bulk or backup")]
pub struct UnknownPriority(pub String);

impl Priority {
    /// Every class, highest first (the drivers' rank order).
    pub const ALL: [Priority; 4] = [
        Priority::Alarm,
        Priority::Normal,
        Priority::Bulk,
        Priority::Backup,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Alarm => "alarm",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
            Priority::Backup => "backup",
        }
    }

    /// The class a stored or offered priority string is sent in: normal unless it names
    /// another (lenient, as the drivers have always been).
    pub fn class_of(s: &str) -> Priority {
        s.parse().unwrap_or_default()
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = UnknownPriority;
    fn from_str(s: &str) -> Result<Priority, UnknownPriority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPriority(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_parse_display_and_serialise_by_name() {
        for p in Priority::ALL {
            assert_eq!(p.to_string().parse::<Priority>(), Ok(p));
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
            assert_eq!(
                serde_json::from_str::<Priority>(&format!("\"{p}\"")).unwrap(),
                p
            );
        }
        assert_eq!(
            Priority::ALL.map(Priority::as_str),
            crate::outbox::CLASSES,
            "the drivers' classes are the priorities, in rank order"
        );
        assert!("Alarm".parse::<Priority>().is_err());
        assert!("".parse::<Priority>().is_err());
        assert_eq!(Priority::class_of("urgent"), Priority::Normal);
        assert_eq!(Priority::class_of("bulk"), Priority::Bulk);
        assert_eq!(Priority::class_of("backup"), Priority::Backup);
    }
}
