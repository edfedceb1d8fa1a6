//! The link model, free of I/O: what happens to one frame offered to one direction of an
//! emulated link at a given instant. The emulator ([`crate::emu`]) feeds it frames read from a
//! TAP device and writes each frame to the other side at the instant the model gives.
//!
//! In order, like a satellite terminal: the serialiser (rate, drop-tail queue of
//! `queue_bytes`), then the air (loss, corruption), then propagation (one-way delay plus
//! jitter; frames keep their order), then what lies beyond the link (duplication). ARP frames
//! skip rate and delay, as a terminal answers them locally; without that, neighbour discovery
//! would time out on long links. They are never reordered, displaced or duplicated either.
//!
//! Two reordering models, which can be combined:
//!
//! - `reorder_pct`, like netem's: the frame skips the propagation delay altogether and so
//!   overtakes everything queued before it, by up to the whole one-way delay. Rare on real
//!   paths, and harsh: on a GEO hop it moves a frame 300 ms ahead.
//! - `displace_pct` / `displace_ms`, the common reordering of real paths (multi-carrier hubs,
//!   bonded or load-balanced lines): the frame is held back by a bounded extra delay, uniform
//!   in [1, `displace_ms`] ms, so the frames right behind it overtake it. The frames after it
//!   keep their own schedule: the FIFO under jitter follows the time the displaced frame would
//!   have had, not the time it gets.
//!
//! A frame picked by `reorder_pct` is not displaced as well.
//!
//! Duplication (`dup_pct`) happens after the link, as with a misbehaving switch or a short L2
//! loop: the copy does not use the serialiser again and arrives within 1 ms of the original.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One direction's shaping. `rate_kbit == 0` means unlimited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shape {
    /// Link rate in kbit/s, counted on whole Ethernet frames (0: unlimited).
    pub rate_kbit: u64,
    /// One-way propagation delay (ms).
    pub delay_ms: f64,
    /// Uniform jitter, ± this many ms around the delay (order is kept).
    pub jitter_ms: f64,
    /// Random loss (%), applied after the frame used its link time.
    pub loss_pct: f64,
    /// Frames (%) sent without the propagation delay, overtaking every frame queued before
    /// them (netem's reordering).
    pub reorder_pct: f64,
    /// Frames (%) held back by an extra delay of up to `displace_ms`, so that the frames behind
    /// them overtake them; the later frames are not delayed by them (the reordering of
    /// multi-carrier hubs and bonded lines).
    pub displace_pct: f64,
    /// Largest extra delay of a displaced frame (ms): each is held back by a uniform random
    /// delay in [1, `displace_ms`] ms, or by `displace_ms` itself when it is below 1 ms.
    pub displace_ms: f64,
    /// Frames (%) delivered twice, the copy within 1 ms of the original; the copy does not use
    /// the link's rate (duplication beyond the link, as by a faulty switch or an L2 loop).
    pub dup_pct: f64,
    /// Frames (%) with one bit flipped beyond the Ethernet header.
    pub corrupt_pct: f64,
    /// Bytes waiting for the serialiser beyond which frames are dropped (drop-tail).
    pub queue_bytes: u64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            rate_kbit: 20_000,
            delay_ms: 300.0,
            jitter_ms: 0.0,
            loss_pct: 0.0,
            reorder_pct: 0.0,
            displace_pct: 0.0,
            displace_ms: 20.0,
            dup_pct: 0.0,
            corrupt_pct: 0.0,
            queue_bytes: 1_000_000,
        }
    }
}

impl Shape {
    /// A GEO VSAT hop: 300 ms each way.
    pub fn geo(rate_kbit: u64, loss_pct: f64) -> Shape {
        Shape {
            rate_kbit,
            loss_pct,
            ..Shape::default()
        }
    }

    /// Checks the values are meaningful; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let pct = |name: &str, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be within 0..=100, got {v}"))
            }
        };
        pct("loss_pct", self.loss_pct)?;
        pct("reorder_pct", self.reorder_pct)?;
        pct("displace_pct", self.displace_pct)?;
        pct("dup_pct", self.dup_pct)?;
        pct("corrupt_pct", self.corrupt_pct)?;
        if !(0.0..=10_000.0).contains(&self.displace_ms) {
            return Err(format!(
                "displace_ms must be within 0..=10000, got {}",
                self.displace_ms
            ));
        }
        if !(0.0..=60_000.0).contains(&self.delay_ms) {
            return Err(format!(
                "delay_ms must be within 0..=60000, got {}",
                self.delay_ms
            ));
        }
        if !(0.0..=self.delay_ms.max(0.0)).contains(&self.jitter_ms) {
            return Err(format!(
                "jitter_ms must be within 0..=delay_ms ({}), got {}",
                self.delay_ms, self.jitter_ms
            ));
        }
        Ok(())
    }

    /// Applies `key=value` settings (`rate_kbit`, `rate_mbit`, `delay_ms`, `jitter_ms`,
    /// `loss_pct` or `loss`, `reorder_pct`, `displace_pct`, `displace_ms`, `dup_pct` or
    /// `duplicate_pct`, `corrupt_pct`, `queue_kb`, `queue_bytes`). All or nothing: the shape is
    /// only changed when every setting is known and the result is valid; the error names the
    /// setting.
    pub fn apply(&mut self, settings: &[(String, String)]) -> Result<(), String> {
        let mut next = self.clone();
        for (k, v) in settings {
            let num = || -> Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("{k}: not a non-negative number: {v:?}"))
            };
            match k.as_str() {
                "rate_kbit" => next.rate_kbit = num()? as u64,
                "rate_mbit" => next.rate_kbit = (num()? * 1000.0) as u64,
                "delay_ms" => next.delay_ms = num()?,
                "jitter_ms" => next.jitter_ms = num()?,
                "loss_pct" | "loss" => next.loss_pct = num()?,
                "reorder_pct" => next.reorder_pct = num()?,
                "displace_pct" => next.displace_pct = num()?,
                "displace_ms" => next.displace_ms = num()?,
                "dup_pct" | "duplicate_pct" => next.dup_pct = num()?,
                "corrupt_pct" => next.corrupt_pct = num()?,
                "queue_kb" => next.queue_bytes = (num()? * 1000.0) as u64,
                "queue_bytes" => next.queue_bytes = num()? as u64,
                other => return Err(format!("unknown setting {other:?}")),
            }
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn bytes_per_s(&self) -> f64 {
        self.rate_kbit as f64 * 1000.0 / 8.0
    }
}

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fate {
    /// Deliver at this instant; flip `bit` of byte `byte` first when set; when `dup` is set,
    /// deliver a copy (the same bytes, flipped bit included) at that instant as well.
    Deliver {
        at: Instant,
        flip: Option<(usize, u8)>,
        dup: Option<Instant>,
    },
    /// The serialiser's queue was full.
    QueueFull,
    /// Lost on the air.
    Lost,
    /// The link is cut.
    Cut,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames through the link (a duplicated frame counts once here, once in `duplicated`).
    pub delivered: u64,
    pub queue_drops: u64,
    pub lost: u64,
    pub cut_drops: u64,
    pub corrupted: u64,
    /// Frames sent without the propagation delay (`reorder_pct`).
    pub reordered: u64,
    /// Frames held back by an extra delay (`displace_pct`).
    pub displaced: u64,
    /// Extra copies delivered (`dup_pct`).
    pub duplicated: u64,
}

/// One direction of a link.
pub struct Direction {
    pub shape: Shape,
    pub cut: bool,
    pub counters: Counters,
    /// When the serialiser is free again.
    busy_until: Option<Instant>,
    /// Delivery time of the last in-order frame (FIFO under jitter); for a displaced frame,
    /// the time it would have had, so that it does not hold back the frames after it.
    last_delivery: Option<Instant>,
    rng: SmallRng,
}

const ETH_HEADER: usize = 14;
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

impl Direction {
    pub fn new(shape: Shape, seed: Option<u64>) -> Direction {
        Direction {
            shape,
            cut: false,
            counters: Counters::default(),
            busy_until: None,
            last_delivery: None,
            rng: match seed {
                Some(s) => SmallRng::seed_from_u64(s),
                None => SmallRng::from_os_rng(),
            },
        }
    }

    /// Frames not yet through the serialiser are lost with the link; forget its schedule.
    pub fn set_cut(&mut self, cut: bool) {
        self.cut = cut;
        if cut {
            self.busy_until = None;
            self.last_delivery = None;
        }
    }

    /// Decides the fate of `frame` (its bytes are only read) offered at `now`.
    pub fn offer(&mut self, frame: &[u8], now: Instant) -> Fate {
        self.counters.frames_in += 1;
        self.counters.bytes_in += frame.len() as u64;
        if self.cut {
            self.counters.cut_drops += 1;
            return Fate::Cut;
        }
        let arp = frame.len() >= ETH_HEADER && frame[12..14] == ETHERTYPE_ARP;
        let mut t = now;
        let rate = self.shape.bytes_per_s();
        if rate > 0.0 && !arp {
            let start = self.busy_until.map_or(now, |b| b.max(now));
            let backlog = (start - now).as_secs_f64() * rate;
            if backlog + frame.len() as f64 > self.shape.queue_bytes as f64 {
                self.counters.queue_drops += 1;
                return Fate::QueueFull;
            }
            let done = start + Duration::from_secs_f64(frame.len() as f64 / rate);
            self.busy_until = Some(done);
            t = done;
        }
        if self.shape.loss_pct > 0.0 && self.rng.random::<f64>() * 100.0 < self.shape.loss_pct {
            self.counters.lost += 1;
            return Fate::Lost;
        }
        if !arp {
            let reorder = self.shape.reorder_pct > 0.0
                && self.rng.random::<f64>() * 100.0 < self.shape.reorder_pct;
            if reorder {
                self.counters.reordered += 1;
            } else {
                let jitter = if self.shape.jitter_ms > 0.0 {
                    self.rng.random_range(-1.0..=1.0) * self.shape.jitter_ms
                } else {
                    0.0
                };
                let delay = Duration::from_secs_f64((self.shape.delay_ms + jitter).max(0.0) / 1e3);
                let mut at = t + delay;
                if let Some(last) = self.last_delivery {
                    at = at.max(last);
                }
                self.last_delivery = Some(at);
                t = at;
                if self.shape.displace_pct > 0.0
                    && self.rng.random::<f64>() * 100.0 < self.shape.displace_pct
                {
                    let max = self.shape.displace_ms;
                    let extra = if max < 1.0 {
                        max
                    } else {
                        self.rng.random_range(1.0..=max)
                    };
                    self.counters.displaced += 1;
                    t += Duration::from_secs_f64(extra / 1e3);
                }
            }
        }
        let flip = if self.shape.corrupt_pct > 0.0
            && frame.len() > ETH_HEADER
            && self.rng.random::<f64>() * 100.0 < self.shape.corrupt_pct
        {
            self.counters.corrupted += 1;
            Some((
                self.rng.random_range(ETH_HEADER..frame.len()),
                self.rng.random_range(0..8u8),
            ))
        } else {
            None
        };
        let dup = if !arp
            && self.shape.dup_pct > 0.0
            && self.rng.random::<f64>() * 100.0 < self.shape.dup_pct
        {
            self.counters.duplicated += 1;
            Some(t + Duration::from_secs_f64(self.rng.random_range(0.0..=1.0) / 1e3))
        } else {
            None
        };
        self.counters.delivered += 1;
        Fate::Deliver { at: t, flip, dup }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[12] = 0x08; // IPv4
        f
    }

    fn at(f: Fate) -> Instant {
        match f {
            Fate::Deliver { at, .. } => at,
            other => panic!("expected delivery, got {other:?}"),
        }
    }

    #[test]
    fn rate_and_delay_schedule_frames() {
        let shape = Shape {
            rate_kbit: 12_000, // 1.5 MB/s: a 1500-byte frame takes 1 ms
            delay_ms: 300.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(1));
        let t0 = Instant::now();
        let times: Vec<Instant> = (0..100).map(|_| at(d.offer(&frame(1500), t0))).collect();
        let first = times[0] - t0;
        assert!((first.as_secs_f64() - 0.301).abs() < 1e-6, "{first:?}");
        let last = times[99] - t0;
        assert!((last.as_secs_f64() - 0.400).abs() < 1e-6, "{last:?}");
        for w in times.windows(2) {
            assert!((w[1] - w[0]).as_secs_f64() > 0.000_999);
        }
    }

    #[test]
    fn drop_tail_when_the_queue_is_full() {
        let shape = Shape {
            rate_kbit: 8_000, // 1 MB/s
            queue_bytes: 15_000,
            delay_ms: 0.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(1));
        let t0 = Instant::now();
        let fates: Vec<Fate> = (0..20).map(|_| d.offer(&frame(1500), t0)).collect();
        let delivered = fates
            .iter()
            .filter(|f| matches!(f, Fate::Deliver { .. }))
            .count();
        assert_eq!(delivered, 10);
        assert_eq!(d.counters.queue_drops, 10);
        // Once the serialiser has drained, frames pass again.
        let later = t0 + Duration::from_millis(20);
        assert!(matches!(d.offer(&frame(1500), later), Fate::Deliver { .. }));
    }

    #[test]
    fn loss_rate_is_close_to_the_setting() {
        let shape = Shape {
            rate_kbit: 0,
            delay_ms: 0.0,
            loss_pct: 5.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(7));
        let t0 = Instant::now();
        for _ in 0..100_000 {
            d.offer(&frame(100), t0);
        }
        let lost = d.counters.lost as f64 / 1000.0;
        assert!((4.7..5.3).contains(&lost), "lost {lost} %");
    }

    #[test]
    fn jitter_keeps_order_and_reorder_overtakes() {
        let shape = Shape {
            rate_kbit: 0,
            delay_ms: 100.0,
            jitter_ms: 20.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape.clone(), Some(3));
        let t0 = Instant::now();
        let mut last = t0;
        for i in 0..1000 {
            let t = at(d.offer(&frame(100), t0 + Duration::from_micros(i * 100)));
            assert!(t >= last);
            assert!(t - t0 >= Duration::from_millis(80));
            last = t;
        }
        let mut d = Direction::new(
            Shape {
                jitter_ms: 0.0,
                reorder_pct: 100.0,
                ..shape
            },
            Some(3),
        );
        assert_eq!(at(d.offer(&frame(100), t0)), t0);
        assert_eq!(d.counters.reordered, 1);
    }

    #[test]
    fn arp_skips_rate_and_delay_and_cut_drops_everything() {
        let mut d = Direction::new(Shape::default(), Some(1));
        let t0 = Instant::now();
        let mut arp = frame(60);
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP);
        assert_eq!(at(d.offer(&arp, t0)), t0);
        d.set_cut(true);
        assert_eq!(d.offer(&frame(100), t0), Fate::Cut);
        assert_eq!(d.offer(&arp, t0), Fate::Cut);
        d.set_cut(false);
        assert!(matches!(d.offer(&frame(100), t0), Fate::Deliver { .. }));
    }

    #[test]
    fn corruption_flips_a_bit_beyond_the_header() {
        let mut d = Direction::new(
            Shape {
                corrupt_pct: 100.0,
                ..Shape::default()
            },
            Some(9),
        );
        match d.offer(&frame(200), Instant::now()) {
            Fate::Deliver {
                flip: Some((byte, bit)),
                ..
            } => {
                assert!((ETH_HEADER..200).contains(&byte));
                assert!(bit < 8);
            }
            other => panic!("expected a flipped bit, got {other:?}"),
        }
    }

    fn dup(f: Fate) -> Option<Instant> {
        match f {
            Fate::Deliver { dup, .. } => dup,
            other => panic!("expected delivery, got {other:?}"),
        }
    }

    #[test]
    fn displaced_frames_fall_behind_their_successors_without_delaying_them() {
        // 1500-byte frames offered every 1 ms on a link that takes 1 ms for one: each frame
        // leaves the serialiser 1 ms after it came, and is due 100 ms later.
        let shape = Shape {
            rate_kbit: 12_000,
            delay_ms: 100.0,
            displace_pct: 10.0,
            displace_ms: 20.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(5));
        let t0 = Instant::now();
        let n = 5_000u64;
        let times: Vec<Instant> = (0..n)
            .map(|i| at(d.offer(&frame(1500), t0 + Duration::from_millis(i))))
            .collect();
        let mut displaced = 0;
        let mut overtaken = 0;
        for (i, t) in times.iter().enumerate() {
            let due = t0 + Duration::from_millis(i as u64 + 101);
            let late = t.saturating_duration_since(due).as_secs_f64() * 1e3;
            assert!(*t + Duration::from_nanos(10) >= due, "frame {i} early");
            if late < 1e-3 {
                continue; // not displaced: on time (to the µs), whatever came before it
            }
            displaced += 1;
            assert!(
                (1.0 - 1e-6..=20.0 + 1e-6).contains(&late),
                "frame {i}: {late} ms"
            );
            // Overtaken by its successor when that one is on time (the frames behind a
            // displaced one keep their schedule), by at most displace_ms less the successor's
            // serialisation.
            let next_due = due + Duration::from_millis(1);
            if let Some(&next) = times
                .get(i + 1)
                .filter(|n| **n < next_due + Duration::from_micros(1))
            {
                assert!(next < *t, "frame {i} not overtaken");
                assert!((*t - next).as_secs_f64() * 1e3 <= 19.0 + 1e-6);
                overtaken += 1;
            }
        }
        assert_eq!(displaced, d.counters.displaced);
        assert!(overtaken > 400, "{overtaken} frames overtaken");
        assert_eq!(d.counters.delivered, n);

        // Below 1 ms, the extra delay is displace_ms itself.
        let mut d = Direction::new(
            Shape {
                rate_kbit: 0,
                delay_ms: 10.0,
                displace_pct: 100.0,
                displace_ms: 0.5,
                ..Shape::default()
            },
            Some(5),
        );
        let t = at(d.offer(&frame(100), t0)) - t0;
        assert!((t.as_secs_f64() - 0.0105).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn displacement_share_is_close_to_the_setting() {
        let shape = Shape {
            rate_kbit: 0,
            delay_ms: 0.0,
            displace_pct: 5.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(11));
        let t0 = Instant::now();
        let late = (0..100_000)
            .filter(|_| at(d.offer(&frame(100), t0)) > t0)
            .count() as u64;
        assert_eq!(late, d.counters.displaced);
        let share = late as f64 / 1000.0;
        assert!((4.7..5.3).contains(&share), "displaced {share} %");
    }

    #[test]
    fn duplicates_arrive_just_after_the_original_and_are_counted() {
        let shape = Shape {
            rate_kbit: 12_000,
            delay_ms: 100.0,
            dup_pct: 100.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(2));
        let t0 = Instant::now();
        let fates: Vec<Fate> = (0..10).map(|_| d.offer(&frame(1500), t0)).collect();
        for (i, f) in fates.iter().enumerate() {
            let (t, copy) = (at(*f), dup(*f).expect("a copy"));
            // The copy does not take the serialiser: the originals stay 1 ms apart.
            let due = t0 + Duration::from_micros(101_000 + 1000 * i as u64);
            assert!(
                (t.max(due) - t.min(due)) < Duration::from_nanos(10),
                "frame {i}"
            );
            assert!(
                copy >= t && copy - t <= Duration::from_millis(1),
                "copy {i}"
            );
        }
        assert_eq!((d.counters.delivered, d.counters.duplicated), (10, 10));
    }

    #[test]
    fn duplication_share_is_close_to_the_setting() {
        let shape = Shape {
            rate_kbit: 0,
            delay_ms: 0.0,
            dup_pct: 2.0,
            ..Shape::default()
        };
        let mut d = Direction::new(shape, Some(13));
        let t0 = Instant::now();
        let copies = (0..100_000)
            .filter(|_| dup(d.offer(&frame(100), t0)).is_some())
            .count() as u64;
        assert_eq!(copies, d.counters.duplicated);
        let share = copies as f64 / 1000.0;
        assert!((1.85..2.15).contains(&share), "duplicated {share} %");
    }

    #[test]
    fn arp_is_never_displaced_duplicated_or_reordered() {
        let mut d = Direction::new(
            Shape {
                displace_pct: 100.0,
                dup_pct: 100.0,
                reorder_pct: 100.0,
                ..Shape::default()
            },
            Some(1),
        );
        let t0 = Instant::now();
        let mut arp = frame(60);
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP);
        assert_eq!(
            d.offer(&arp, t0),
            Fate::Deliver {
                at: t0,
                flip: None,
                dup: None
            }
        );
        let c = d.counters;
        assert_eq!((c.displaced, c.duplicated, c.reordered), (0, 0, 0));
    }

    #[test]
    fn settings_are_checked_and_named() {
        let mut s = Shape::default();
        s.apply(&[
            ("loss_pct".into(), "2".into()),
            ("rate_mbit".into(), "2".into()),
        ])
        .expect("valid");
        assert_eq!((s.loss_pct, s.rate_kbit), (2.0, 2000));
        let e = s.apply(&[("loss_pct".into(), "200".into())]).unwrap_err();
        assert!(e.contains("loss_pct"), "{e}");
        let e = s.apply(&[("speed".into(), "1".into())]).unwrap_err();
        assert!(e.contains("speed"), "{e}");
        assert_eq!(s.loss_pct, 2.0, "a failed update changes nothing");

        s.apply(&[
            ("displace_pct".into(), "3".into()),
            ("displace_ms".into(), "10".into()),
            ("duplicate_pct".into(), "0.5".into()),
        ])
        .expect("valid");
        assert_eq!((s.displace_pct, s.displace_ms, s.dup_pct), (3.0, 10.0, 0.5));
        for (key, value) in [
            ("displace_pct", "101"),
            ("displace_ms", "20000"),
            ("displace_ms", "-1"),
            ("dup_pct", "200"),
        ] {
            let e = s.apply(&[(key.into(), value.into())]).unwrap_err();
            assert!(e.contains(key), "{key}={value}: {e}");
        }
        let e = s
            .apply(&[("duplicate_pct".into(), "200".into())])
            .unwrap_err();
        assert!(e.contains("dup_pct"), "{e}");
        assert_eq!((s.displace_pct, s.displace_ms, s.dup_pct), (3.0, 10.0, 0.5));
    }

    #[test]
    fn new_settings_default_to_off_in_json() {
        let s: Shape = serde_json::from_str(r#"{"displace_pct": 2}"#).expect("valid");
        assert_eq!((s.displace_pct, s.displace_ms, s.dup_pct), (2.0, 20.0, 0.0));
        assert!(serde_json::from_str::<Shape>(r#"{"displace": 2}"#).is_err());
    }
}
