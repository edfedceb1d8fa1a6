//! Calendar schedules for backup jobs: when a job (or its verify, or its drill) next runs.
//!
//! One string, as an operator writes it in the controller's configuration:
//!
//! - a 5-field cron expression, `"30 1 * * *"` (minute hour day-of-month month day-of-week;
//!   day-of-month and day-of-week combine with OR, as in Vixie cron; parsed by `croner`);
//! - the aliases `@hourly`, `@daily`, `@weekly` (Sunday 00:00), `@monthly`, `@yearly`;
//! - the readable forms `hourly`, `daily HH:MM`, `weekly SUN HH:MM` (mon…sun);
//! - an interval, `every 6h` / `every 30m` / `every 1d`, aligned to the epoch of the zone
//!   (so `every 6h +08:00` runs at 00:00, 06:00, 12:00 and 18:00 Beijing time, whenever the
//!   scheduler started): 1 minute to 366 days;
//!
//! each optionally followed by a UTC offset, `+08:00`, the zone its times are in (default UTC).
//! Fixed offsets only: the ministry's sites keep Beijing time, which has no daylight saving,
//! and a fixed offset makes every next time a pure function of its inputs.
//!
//! A schedule no time matches (`"0 0 30 2 *"`) is refused when parsed, not discovered when a
//! job silently never runs.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest schedule text accepted.
pub const MAX_LEN: usize = 200;
/// Shortest interval: a scheduler that ticks more often than once a minute is misconfigured.
pub const MIN_INTERVAL_MS: i64 = 60_000;
/// Longest interval: a year and a day (a job rarer than that is not a schedule).
pub const MAX_INTERVAL_MS: i64 = 366 * 86_400_000;

const FORMS: &str = "a 5-field cron expression (\"30 1 * * *\"), @hourly, @daily, @weekly, \
                     @monthly, \"hourly\", \"daily HH:MM\", \"weekly SUN HH:MM\" or \"every 6h\", \
                     optionally followed by a UTC offset such as +08:00";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("an empty schedule: give {FORMS}")]
    Empty,
    #[error("a schedule of {0} characters: at most {MAX_LEN}")]
    TooLong(usize),
    #[error("schedule {schedule:?}: UTC offset {offset:?}: {why}")]
    Offset {
        schedule: String,
        offset: String,
        why: String,
    },
    #[error("schedule {schedule:?}: cron expression: {why}")]
    Cron { schedule: String, why: String },
    #[error("schedule {schedule:?}: interval: {why}")]
    Interval { schedule: String, why: String },
    #[error("schedule {schedule:?}: {why}")]
    Form { schedule: String, why: String },
    #[error("schedule {0:?}: no time matches it, so it would never run")]
    Never(String),
}

#[derive(Clone, Debug)]
enum Kind {
    Cron(Box<Cron>),
    /// Every `period_ms`, counted from the epoch of the schedule's zone.
    Every {
        period_ms: i64,
    },
}

/// A parsed schedule; its text (whitespace normalised) is what it serialises as.
#[derive(Clone, Debug)]
pub struct Schedule {
    text: String,
    kind: Kind,
    offset: FixedOffset,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        self.text == other.text
    }
}
impl Eq for Schedule {}

impl Schedule {
    /// The first time strictly after `after_ms` (ms since the epoch) the schedule fires;
    /// `None` past the calendar's end (year 9999 or thereabouts).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match &self.kind {
            Kind::Every { period_ms } => {
                let off = i64::from(self.offset.local_minus_utc()) * 1000;
                let local = after_ms.checked_add(off)?;
                let next = local
                    .div_euclid(*period_ms)
                    .checked_add(1)?
                    .checked_mul(*period_ms)?;
                next.checked_sub(off)
            }
            Kind::Cron(cron) => {
                // Whole seconds: a cron time is on a whole minute, so any match after the
                // second `after_ms` falls in is also after `after_ms` itself.
                let t = DateTime::from_timestamp(after_ms.div_euclid(1000), 0)?
                    .with_timezone(&self.offset);
                cron.find_next_occurrence(&t, false)
                    .ok()
                    .map(|t| t.timestamp_millis())
            }
        }
    }

    /// The zone the schedule's times are in, in seconds east of UTC.
    pub fn offset_s(&self) -> i32 {
        self.offset.local_minus_utc()
    }

    /// The interval of an `every …` schedule.
    pub fn interval_ms(&self) -> Option<i64> {
        match self.kind {
            Kind::Every { period_ms } => Some(period_ms),
            Kind::Cron(_) => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `+08:00` / `-03:30` / `+00:00`: seconds east of UTC.
fn parse_offset(schedule: &str, s: &str) -> Result<FixedOffset, ScheduleError> {
    let err = |why: &str| ScheduleError::Offset {
        schedule: schedule.to_string(),
        offset: s.to_string(),
        why: why.to_string(),
    };
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(err("write it as +HH:MM or -HH:MM")),
    };
    let (h, m) = parse_hh_mm(rest).ok_or_else(|| err("write it as +HH:MM or -HH:MM"))?;
    let secs = sign * (h * 3600 + m * 60);
    // Real zones run from UTC-12 to UTC+14.
    if !(-12 * 3600..=14 * 3600).contains(&secs) {
        return Err(err("a zone is between -12:00 and +14:00"));
    }
    FixedOffset::east_opt(secs).ok_or_else(|| err("out of range"))
}

/// `HH:MM` with HH 0–23 and MM 0–59 (one- or two-digit hours, two-digit minutes).
fn parse_hh_mm(s: &str) -> Option<(i32, i32)> {
    let (h, m) = s.split_once(':')?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || h.len() > 2 || !digits(m) || m.len() != 2 {
        return None;
    }
    let (h, m) = (h.parse().ok()?, m.parse().ok()?);
    ((0..24).contains(&h) && (0..60).contains(&m)).then_some((h, m))
}

/// Day of the week as cron numbers it (0 = Sunday).
fn weekday(s: &str) -> Option<u8> {
    let s = s.to_ascii_lowercase();
    let days = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let full = [
        "sunday",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
    ];
    (0..7u8).find(|&i| s == days[i as usize] || s == full[i as usize])
}

fn cron(schedule: &str, expr: &str) -> Result<Kind, ScheduleError> {
    // Exactly five fields: a sixth (seconds or year) is refused rather than guessed at.
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(ScheduleError::Cron {
            schedule: schedule.to_string(),
            why: format!(
                "{fields} fields: a cron expression has 5 (minute hour day-of-month month \
                 day-of-week)"
            ),
        });
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map(|c| Kind::Cron(Box::new(c)))
        .map_err(|e| ScheduleError::Cron {
            schedule: schedule.to_string(),
            why: e.to_string(),
        })
}

fn interval(schedule: &str, s: &str) -> Result<Kind, ScheduleError> {
    let err = |why: String| ScheduleError::Interval {
        schedule: schedule.to_string(),
        why,
    };
    let d = humantime::parse_duration(s)
        .map_err(|e| err(format!("{s:?}: {e} (write it as 30m, 6h or 1d)")))?;
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) {
        return Err(err(format!(
            "{s:?}: an interval is between 1 minute and 366 days"
        )));
    }
    Ok(Kind::Every { period_ms: ms })
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        if s.len() > MAX_LEN {
            return Err(ScheduleError::TooLong(s.len()));
        }
        let mut words: Vec<&str> = s.split_whitespace().collect();
        if words.is_empty() {
            return Err(ScheduleError::Empty);
        }
        // `02:00+08:00` (a time with its zone attached, as transfer windows are written) is
        // the time and the zone.
        if let Some(w) = words.last().copied()
            && w.len() > 6
            && w.as_bytes()[2] == b':'
            && matches!(w.as_bytes()[5], b'+' | b'-')
        {
            words.pop();
            words.push(&w[..5]);
            words.push(&w[5..]);
        }
        let text = words.join(" ");
        // No form starts with a sign, and no cron field does: a last word with one is the zone.
        let offset = match words.last() {
            Some(w) if words.len() > 1 && w.starts_with(['+', '-']) => {
                let o = parse_offset(&text, w)?;
                words.pop();
                o
            }
            _ => FixedOffset::east_opt(0).expect("UTC is a valid offset"),
        };
        let form = |why: String| ScheduleError::Form {
            schedule: text.clone(),
            why,
        };
        let first = words[0].to_ascii_lowercase();
        let kind = match (first.as_str(), &words[1..]) {
            ("@hourly" | "hourly", []) => cron(&text, "0 * * * *")?,
            ("@daily" | "@midnight", []) => cron(&text, "0 0 * * *")?,
            ("@weekly", []) => cron(&text, "0 0 * * 0")?,
            ("@monthly", []) => cron(&text, "0 0 1 * *")?,
            ("@yearly" | "@annually", []) => cron(&text, "0 0 1 1 *")?,
            (w, []) if w.starts_with('@') => {
                return Err(form(format!(
                    "{w}: not an alias (@hourly, @daily, @weekly, @monthly, @yearly)"
                )));
            }
            (w, _) if w.starts_with('@') => {
                return Err(form(format!("{w} takes nothing after it but a UTC offset")));
            }
            ("hourly", _) => return Err(form("write \"hourly\" alone".into())),
            ("daily", [t]) => {
                let (h, m) = parse_hh_mm(t)
                    .ok_or_else(|| form(format!("{t:?}: a time of day is HH:MM, 00:00-23:59")))?;
                cron(&text, &format!("{m} {h} * * *"))?
            }
            ("daily", _) => return Err(form("write \"daily HH:MM\"".into())),
            ("weekly", [d, t]) => {
                let day = weekday(d)
                    .ok_or_else(|| form(format!("{d:?}: a day of the week is MON..SUN")))?;
                let (h, m) = parse_hh_mm(t)
                    .ok_or_else(|| form(format!("{t:?}: a time of day is HH:MM, 00:00-23:59")))?;
                cron(&text, &format!("{m} {h} * * {day}"))?
            }
            ("weekly", _) => return Err(form("write \"weekly SUN HH:MM\"".into())),
            ("every", [d]) => interval(&text, d)?,
            ("every", _) => return Err(form("write \"every 6h\" or \"every 30m\"".into())),
            _ if words.len() == 5
                || words[0].starts_with(|c: char| c.is_ascii_digit() || c == '*') =>
            {
                cron(&text, &words.join(" "))?
            }
            (w, _) => return Err(form(format!("{w:?} starts no schedule: give {FORMS}"))),
        };
        let schedule = Schedule { text, kind, offset };
        // From 2000-01-01 (so 29 February is found): a pattern with no match anywhere in
        // the search is refused now.
        if schedule.next_after(946_684_800_000).is_none() {
            return Err(ScheduleError::Never(schedule.text));
        }
        Ok(schedule)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ms since the epoch of a UTC date and time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        chrono::NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
    }

    fn next(s: &str, after: i64) -> i64 {
        s.parse::<Schedule>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .next_after(after)
            .unwrap()
    }

    #[test]
    fn cron_and_aliases_in_utc() {
        let t = utc(2026, 3, 14, 12, 0); // a Saturday
        assert_eq!(next("30 1 * * *", t), utc(2026, 3, 15, 1, 30));
        assert_eq!(next("*/15 * * * *", t), utc(2026, 3, 14, 12, 15));
        assert_eq!(next("@hourly", t), utc(2026, 3, 14, 13, 0));
        assert_eq!(next("hourly", t), utc(2026, 3, 14, 13, 0));
        assert_eq!(next("@daily", t), utc(2026, 3, 15, 0, 0));
        assert_eq!(next("@weekly", t), utc(2026, 3, 15, 0, 0)); // Sunday
        assert_eq!(next("@monthly", t), utc(2026, 4, 1, 0, 0));
        assert_eq!(next("daily 02:05", t), utc(2026, 3, 15, 2, 5));
        assert_eq!(next("weekly mon 03:00", t), utc(2026, 3, 16, 3, 0));
        assert_eq!(next("Weekly FRIDAY 23:59", t), utc(2026, 3, 20, 23, 59));
        assert_eq!(next("0 4 * * MON-FRI", t), utc(2026, 3, 16, 4, 0));
    }

    #[test]
    fn strictly_after() {
        let at = utc(2026, 3, 15, 1, 30);
        assert_eq!(next("30 1 * * *", at), utc(2026, 3, 16, 1, 30));
        assert_eq!(next("30 1 * * *", at - 1), at);
        assert_eq!(next("30 1 * * *", at + 1), utc(2026, 3, 16, 1, 30));
        assert_eq!(next("every 6h", at), utc(2026, 3, 15, 6, 0));
        assert_eq!(
            next("every 6h", utc(2026, 3, 15, 6, 0)),
            utc(2026, 3, 15, 12, 0)
        );
    }

    #[test]
    fn beijing_time() {
        // 01:30 Beijing is 17:30 UTC the day before.
        let t = utc(2026, 3, 14, 12, 0);
        assert_eq!(next("30 1 * * * +08:00", t), utc(2026, 3, 14, 17, 30));
        assert_eq!(next("daily 01:30 +08:00", t), utc(2026, 3, 14, 17, 30));
        assert_eq!(next("daily 01:30+08:00", t), utc(2026, 3, 14, 17, 30));
        // Sunday 02:00 Beijing = Saturday 18:00 UTC.
        assert_eq!(next("weekly SUN 02:00 +08:00", t), utc(2026, 3, 14, 18, 0));
        // Midnight Beijing on the 1st = 16:00 UTC on the last day of the month before.
        assert_eq!(next("@monthly +08:00", t), utc(2026, 3, 31, 16, 0));
        // Intervals align to Beijing's midnight: 00/06/12/18 local = 16/22/04/10 UTC.
        assert_eq!(next("every 6h +08:00", t), utc(2026, 3, 14, 16, 0));
        assert_eq!(
            next("every 30m -03:30", utc(2026, 1, 1, 0, 10)),
            utc(2026, 1, 1, 0, 30)
        );
        let s: Schedule = "daily 01:30 +08:00".parse().unwrap();
        assert_eq!(s.offset_s(), 8 * 3600);
    }

    #[test]
    fn month_and_year_rollover() {
        assert_eq!(
            next("0 0 1 * *", utc(2026, 12, 15, 0, 0)),
            utc(2027, 1, 1, 0, 0)
        );
        assert_eq!(
            next("daily 23:00", utc(2026, 12, 31, 23, 0)),
            utc(2027, 1, 1, 23, 0)
        );
        // 31 December 23:30 UTC is already 1 January in Beijing.
        assert_eq!(
            next("daily 08:00 +08:00", utc(2026, 12, 31, 23, 30)),
            utc(2027, 1, 1, 0, 0)
        );
        assert_eq!(
            next("0 3 31 * *", utc(2026, 4, 1, 0, 0)),
            utc(2026, 5, 31, 3, 0)
        );
        // 29 February: the next leap year.
        assert_eq!(
            next("0 0 29 2 *", utc(2026, 3, 1, 0, 0)),
            utc(2028, 2, 29, 0, 0)
        );
        assert_eq!(
            next("every 1d", utc(2026, 2, 28, 5, 0)),
            utc(2026, 3, 1, 0, 0)
        );
    }

    #[test]
    fn text_round_trips_through_serde() {
        let s: Schedule = "  weekly   sun 02:00  +08:00 ".parse().unwrap();
        assert_eq!(s.to_string(), "weekly sun 02:00 +08:00");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"weekly sun 02:00 +08:00\"");
        let back: Schedule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            "every 30m".parse::<Schedule>().unwrap().interval_ms(),
            Some(1_800_000)
        );
        let err = serde_json::from_str::<Schedule>("\"every 5s\"").unwrap_err();
        assert!(
            err.to_string().contains("between 1 minute and 366 days"),
            "{err}"
        );
    }

    #[test]
    fn bad_schedules_refused_with_what_is_wrong() {
        let cases = [
            ("", "an empty schedule"),
            ("   ", "an empty schedule"),
            (
                "every 30s",
                "interval: \"30s\": an interval is between 1 minute and 366 days",
            ),
            ("every 400d", "between 1 minute and 366 days"),
            ("every 0m", "between 1 minute and 366 days"),
            ("every fortnight", "interval: \"fortnight\""),
            ("every", "write \"every 6h\""),
            ("daily 25:00", "\"25:00\": a time of day is HH:MM"),
            ("daily 1:5", "a time of day is HH:MM"),
            ("daily", "write \"daily HH:MM\""),
            (
                "weekly funday 02:00",
                "\"funday\": a day of the week is MON..SUN",
            ),
            ("weekly 02:00", "write \"weekly SUN HH:MM\""),
            (
                "daily 01:30 +15:00",
                "UTC offset \"+15:00\": a zone is between -12:00 and +14:00",
            ),
            ("daily 01:30 +8", "UTC offset \"+8\": write it as +HH:MM"),
            ("@reboot", "@reboot: not an alias"),
            (
                "@daily 01:00",
                "@daily takes nothing after it but a UTC offset",
            ),
            ("nightly", "\"nightly\" starts no schedule"),
            (
                "30 1 * *",
                "cron expression: 4 fields: a cron expression has 5",
            ),
            ("0 30 1 * * *", "cron expression: 6 fields"),
            ("61 1 * * *", "cron expression:"),
            ("0 0 30 2 *", "no time matches it"),
        ];
        for (s, want) in cases {
            match s.parse::<Schedule>() {
                Ok(_) => panic!("{s:?} was accepted"),
                Err(e) => assert!(e.to_string().contains(want), "{s:?}: {e}"),
            }
        }
        let long = "1 ".repeat(150);
        assert_eq!(
            long.parse::<Schedule>().unwrap_err(),
            ScheduleError::TooLong(300)
        );
    }
}
