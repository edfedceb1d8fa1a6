//! Objects waiting for their time to play.

use std::time::Duration;

use crate::conference_wire::Object;

/// Objects waiting for their time to play, earliest first (at most [`PLAYOUT_MAX`]: beyond
/// that the earliest is played at once).
#[derive(Default)]
pub(super) struct Playout {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u64, usize)>>,
    objects: std::collections::HashMap<u64, Object>,
    n: u64,
    /// The readers are gone: what is left is played at once.
    pub(super) closed: bool,
}

/// Objects a player holds for their time to play (~10 s of video and sound).
pub const PLAYOUT_MAX: usize = 4096;

impl Playout {
    pub(super) fn push(&mut self, index: usize, o: Object, at: i64) {
        self.n += 1;
        self.heap.push(std::cmp::Reverse((at, self.n, index)));
        self.objects.insert(self.n, o);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// How long until the earliest is due (None: nothing held).
    pub(super) fn wait(&self) -> Option<Duration> {
        let std::cmp::Reverse((at, _, _)) = self.heap.peek()?;
        Some(Duration::from_micros(
            u64::try_from(at - crate::now_us()).unwrap_or(0),
        ))
    }

    pub(super) fn pop_due(&mut self) -> Option<(usize, Object)> {
        let std::cmp::Reverse((at, _, _)) = *self.heap.peek()?;
        if !self.closed && self.heap.len() <= PLAYOUT_MAX && at > crate::now_us() {
            return None;
        }
        let std::cmp::Reverse((_, n, i)) = self.heap.pop()?;
        Some((i, self.objects.remove(&n)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_played_in_the_order_of_their_time() {
        let o = |pts: i64| Object {
            pts_us: pts,
            flags: 0,
            payload: bytes::Bytes::new(),
        };
        let now = crate::now_us();
        let mut p = Playout::default();
        // Sound for a moment arrives before the picture of that moment.
        p.push(1, o(2), now + 60_000);
        p.push(0, o(1), now + 20_000);
        p.push(1, o(3), now - 5_000);
        assert_eq!(
            p.pop_due().map(|(i, o)| (i, o.pts_us)),
            Some((1, 3)),
            "late: at once"
        );
        assert!(p.pop_due().is_none(), "the rest is not due yet");
        assert!(p.wait().unwrap() <= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(p.pop_due().map(|(i, _)| i), Some(0));
        assert!(p.pop_due().is_none());
        p.closed = true;
        assert_eq!(
            p.pop_due().map(|(i, _)| i),
            Some(1),
            "closed: what is left at once"
        );
        assert!(p.is_empty());
    }
}
