//! Daily time windows (`22:00-06:00`, `01:00-06:00+08:00`) a job may be sent in.

/// A daily time window `HH:MM-HH:MM`, in UTC or, with an offset after it, in that zone's
/// local time (`22:00-06:00+08:00`: China Standard Time, which has no daylight saving); it
/// may wrap past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub start_min: u16,
    pub end_min: u16,
    /// Minutes east of UTC of the clock the window is written in (jobs stored before offsets
    /// existed have none: UTC).
    #[serde(default)]
    pub utc_offset_min: i16,
}

impl std::str::FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Window, String> {
        let parse = |t: &str| -> Result<u16, String> {
            let (h, m) = t
                .split_once(':')
                .ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
                m.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
            );
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let form =
            || format!("window {s:?} is not HH:MM-HH:MM (or HH:MM-HH:MM+HH:MM, with a UTC offset)");
        let (a, rest) = s.trim().split_once('-').ok_or_else(form)?;
        // The end time, then the offset if any: `06:00`, `06:00Z`, `06:00+08:00`, `06:00-05:00`.
        let (b, offset) = match rest.find(['+', '-', 'Z']) {
            None => (rest, 0),
            Some(i) => {
                let (b, o) = rest.split_at(i);
                let offset = match o {
                    "Z" => 0,
                    _ => {
                        let sign = if o.starts_with('-') { -1 } else { 1 };
                        let m = parse(&o[1..]).map_err(|_| {
                            format!("window {s:?}: offset {o:?} is not +HH:MM or -HH:MM")
                        })?;
                        if m > 14 * 60 {
                            return Err(format!("window {s:?}: offset {o:?} is beyond ±14:00"));
                        }
                        sign * m as i16
                    }
                };
                (b, offset)
            }
        };
        Ok(Window {
            start_min: parse(a.trim())?,
            end_min: parse(b.trim())?,
            utc_offset_min: offset,
        })
    }
}

/// The form [`Window`]'s `FromStr` reads: `HH:MM-HH:MM`, then the UTC offset if it has one
/// (`22:00-06:00`, `01:00-06:00+08:00`, `22:00-02:00-05:00`).
impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_min), hm(self.end_min))?;
        if self.utc_offset_min != 0 {
            let sign = if self.utc_offset_min < 0 { '-' } else { '+' };
            write!(f, "{sign}{}", hm(self.utc_offset_min.unsigned_abs()))?;
        }
        Ok(())
    }
}

impl Window {
    /// `ms` (Unix time) on the window's clock.
    fn local(&self, ms: i64) -> i64 {
        ms + i64::from(self.utc_offset_min) * 60_000
    }

    /// Whether `ms` (Unix time) falls in the window.
    pub fn contains(&self, ms: i64) -> bool {
        let m = (self.local(ms).div_euclid(60_000).rem_euclid(1440)) as u16;
        if self.start_min <= self.end_min {
            (self.start_min..self.end_min).contains(&m)
        } else {
            m >= self.start_min || m < self.end_min
        }
    }

    /// The first instant at or after `ms` inside the window (`None` for an empty window).
    pub fn next_open(&self, ms: i64) -> Option<i64> {
        if self.contains(ms) {
            return Some(ms);
        }
        if self.start_min == self.end_min {
            return None;
        }
        let local = self.local(ms);
        let day = local.div_euclid(86_400_000) * 86_400_000;
        let start = day + i64::from(self.start_min) * 60_000;
        let open = if start > local {
            start
        } else {
            start + 86_400_000
        };
        Some(open - (local - ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap_midnight() {
        let w: Window = "22:00-06:00".parse().unwrap();
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000 + 20_000 * 86_400_000;
        assert!(w.contains(at(23, 0)));
        assert!(w.contains(at(2, 30)));
        assert!(!w.contains(at(6, 0)));
        assert!(!w.contains(at(12, 0)));
        let d: Window = "09:30-17:00".parse().unwrap();
        assert!(d.contains(at(9, 30)) && !d.contains(at(17, 0)));
        // When a closed window next opens: later today, or tomorrow.
        assert_eq!(w.next_open(at(12, 0)), Some(at(22, 0)));
        assert_eq!(w.next_open(at(2, 0)), Some(at(2, 0)));
        assert_eq!(d.next_open(at(17, 0)), Some(at(9, 30) + 86_400_000));
        assert_eq!(d.next_open(at(8, 0)), Some(at(9, 30)));
        let never: Window = "10:00-10:00".parse().unwrap();
        assert_eq!(never.next_open(at(8, 0)), None);
        for bad in [
            "22-06",
            "25:00-01:00",
            "10:00",
            "aa:bb-cc:dd",
            "22:00-06:00+8",
            "22:00-06:00+15:00",
            "22:00-06:00+08:00x",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        // Written without an offset, or with Z: UTC, as before offsets existed.
        assert_eq!("22:00-06:00Z".parse::<Window>(), Ok(w));
        assert_eq!(w.utc_offset_min, 0);
    }

    #[test]
    fn a_window_with_an_offset_is_in_that_zones_local_time() {
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000 + 20_000 * 86_400_000;
        // 01:00–06:00 in Beijing is 17:00–22:00 UTC the day before.
        let bj: Window = "01:00-06:00+08:00".parse().unwrap();
        assert_eq!(bj.utc_offset_min, 480);
        assert!(bj.contains(at(17, 0)) && bj.contains(at(21, 59)));
        assert!(!bj.contains(at(1, 0)) && !bj.contains(at(22, 0)));
        assert_eq!(bj.next_open(at(12, 0)), Some(at(17, 0)));
        assert_eq!(bj.next_open(at(22, 0)), Some(at(17, 0) + 86_400_000));
        // West of UTC, wrapping midnight locally: 22:00–02:00 at UTC−05:00 is 03:00–07:00 UTC.
        let ny: Window = "22:00-02:00-05:00".parse().unwrap();
        assert_eq!(ny.utc_offset_min, -300);
        assert!(ny.contains(at(3, 0)) && ny.contains(at(6, 59)));
        assert!(!ny.contains(at(7, 0)) && !ny.contains(at(2, 59)));
        assert_eq!(ny.next_open(at(8, 0)), Some(at(3, 0) + 86_400_000));
        // A job stored before offsets existed reads as UTC.
        let old: Window = serde_json::from_str(r#"{"start_min":60,"end_min":360}"#).unwrap();
        assert_eq!(old.utc_offset_min, 0);
    }

    #[test]
    fn a_window_displays_as_it_is_parsed() {
        for s in [
            "22:00-06:00",
            "09:30-17:00",
            "00:00-24:00",
            "01:00-06:00+08:00",
            "22:00-02:00-05:00",
            "10:00-10:00+14:00",
        ] {
            let w: Window = s.parse().unwrap();
            assert_eq!(w.to_string(), s);
            assert_eq!(w.to_string().parse::<Window>(), Ok(w));
        }
        // UTC written with a Z, or with +00:00, displays without an offset.
        assert_eq!(
            "22:00-06:00Z".parse::<Window>().unwrap().to_string(),
            "22:00-06:00"
        );
        assert_eq!(
            "22:00-06:00+00:00".parse::<Window>().unwrap().to_string(),
            "22:00-06:00"
        );
    }
}

/// Serde of an optional window as its text (`22:00-06:00`, `01:00-06:00+08:00`): how requests
/// and status carry it (jobs store it as minutes).
pub mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Window;

    pub fn serialize<S: Serializer>(w: &Option<Window>, s: S) -> Result<S::Ok, S::Error> {
        match w {
            Some(w) => s.collect_str(w),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Window>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}
