//! Retention: which snapshots a `forget` keeps, the way restic's `--keep-*` options read.
//! Pure: times in, decisions out, in the repository owner's time zone (Beijing by default).
//!
//! `last N` keeps the N newest. `hourly N` keeps, for each of the N newest hours that have a
//! snapshot, the newest snapshot of that hour; daily, weekly (ISO weeks, Monday first),
//! monthly and yearly likewise. A snapshot is kept if any rule keeps it, and every reason is
//! reported. With no rule at all, everything is kept (a forget with no policy deletes nothing).

use serde::{Deserialize, Serialize};

/// How many of each to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    #[serde(default)]
    pub last: u32,
    #[serde(default)]
    pub hourly: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
    #[serde(default)]
    pub yearly: u32,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }
}

/// One snapshot's fate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub time_ms: i64,
    /// Why it is kept ("last", "daily", …); empty: it goes.
    pub reasons: Vec<&'static str>,
}

/// A rule: its name, how many to keep, and a snapshot time's bucket.
type Rule<'a> = (&'static str, u32, &'a dyn Fn(i64) -> i64);

/// Beijing time, the default zone for buckets.
pub const BEIJING_OFFSET_S: i64 = 8 * 3600;

/// The civil date (year, month) of a day counted from 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// Decides for each snapshot `(id, time_ms)`; the answer is newest first.
pub fn apply(snapshots: &[(String, i64)], keep: &Keep, offset_s: i64) -> Vec<Decision> {
    let mut out: Vec<Decision> = snapshots
        .iter()
        .map(|(id, t)| Decision {
            id: id.clone(),
            time_ms: *t,
            reasons: Vec::new(),
        })
        .collect();
    out.sort_by(|a, b| b.time_ms.cmp(&a.time_ms).then_with(|| b.id.cmp(&a.id)));
    if keep.is_empty() {
        for d in &mut out {
            d.reasons.push("no policy");
        }
        return out;
    }
    let local_s = |t: i64| t.div_euclid(1000) + offset_s;
    let day = |t: i64| local_s(t).div_euclid(86_400);
    let rules: [Rule; 6] = [
        ("last", keep.last, &|_| 0),
        ("hourly", keep.hourly, &|t| local_s(t).div_euclid(3600)),
        ("daily", keep.daily, &|t| day(t)),
        // 1970-01-01 was a Thursday: +3 puts Mondays on multiples of 7.
        ("weekly", keep.weekly, &|t| (day(t) + 3).div_euclid(7)),
        ("monthly", keep.monthly, &|t| {
            let (y, m) = civil(day(t));
            y * 12 + m
        }),
        ("yearly", keep.yearly, &|t| civil(day(t)).0),
    ];
    for (name, n, bucket) in rules {
        let mut left = n;
        let mut last_bucket = None;
        for (i, d) in out.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            // `last` counts snapshots; the others, buckets (the newest of each).
            let b = if name == "last" {
                i as i64
            } else {
                bucket(d.time_ms)
            };
            if last_bucket != Some(b) {
                last_bucket = Some(b);
                d.reasons.push(name);
                left -= 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;
    const D: i64 = 24 * H;

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter(|d| !d.reasons.is_empty())
            .map(|d| d.id.as_str())
            .collect()
    }

    #[test]
    fn calendar() {
        assert_eq!(civil(0), (1970, 1));
        assert_eq!(civil(31), (1970, 2));
        assert_eq!(civil(20_788), (2026, 12)); // 2026-12-01
        assert_eq!(civil(20_787), (2026, 11));
        assert_eq!(civil(-1), (1969, 12));
    }

    #[test]
    fn hourly_backups_thinned_to_days_weeks_and_months() {
        // Hourly snapshots for 100 days, from 2026-08-27 00:00 Beijing.
        let start = 20_692 * D - BEIJING_OFFSET_S * 1000;
        let snaps: Vec<(String, i64)> = (0..100 * 24)
            .map(|h| (format!("s{h:04}"), start + h * H))
            .collect();
        let keep = Keep {
            last: 3,
            daily: 7,
            weekly: 4,
            monthly: 3,
            ..Keep::default()
        };
        let d = apply(&snaps, &keep, BEIJING_OFFSET_S);
        let k = kept(&d);
        // Newest first: the last three hours, then each day's last (23:00) snapshot.
        assert_eq!(&k[..3], ["s2399", "s2398", "s2397"]);
        assert!(d[0].reasons.contains(&"daily") && d[0].reasons.contains(&"monthly"));
        let daily: Vec<_> = d
            .iter()
            .filter(|d| d.reasons.contains(&"daily"))
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(
            daily,
            [
                "s2399", "s2375", "s2351", "s2327", "s2303", "s2279", "s2255"
            ]
        );
        assert_eq!(
            d.iter().filter(|d| d.reasons.contains(&"weekly")).count(),
            4
        );
        assert_eq!(
            d.iter().filter(|d| d.reasons.contains(&"monthly")).count(),
            3
        );
        // Weekly buckets end on Sunday 23:00 Beijing time.
        for w in d.iter().filter(|d| d.reasons.contains(&"weekly")).skip(1) {
            let local = (w.time_ms / 1000 + BEIJING_OFFSET_S).div_euclid(86_400);
            assert_eq!((local + 3).rem_euclid(7), 6, "{} is a Sunday", w.id);
            assert_eq!(
                (w.time_ms / 1000 + BEIJING_OFFSET_S).rem_euclid(86_400),
                23 * 3600
            );
        }
        assert!(k.len() < 20, "{k:?}");
    }

    #[test]
    fn no_policy_keeps_everything_and_last_counts_snapshots() {
        let snaps = vec![
            ("a".to_string(), 1),
            ("b".to_string(), 2),
            ("c".to_string(), 2),
        ];
        assert_eq!(kept(&apply(&snaps, &Keep::default(), 0)).len(), 3);
        let d = apply(
            &snaps,
            &Keep {
                last: 2,
                ..Keep::default()
            },
            0,
        );
        assert_eq!(kept(&d), ["c", "b"]);
        assert!(d[2].reasons.is_empty());
    }
}
