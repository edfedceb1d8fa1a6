//! Properties of what a receiver says it holds: the chunk [`Bitmap`] (whole chunks, verified
//! and durable) and the byte [`Ranges`] of a chunk received in part, against a plain model.

use proptest::prelude::*;
use tiandi_transfer::Bitmap;
use tiandi_transfer::transfer_wire::Ranges;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Setting chunks in any order, repeated or out of range: the bitmap holds exactly the
    /// chunks in range, counts them, lists the rest as missing, and survives the wire.
    #[test]
    fn a_bitmap_holds_exactly_the_chunks_set(
        len in 0u32..600,
        sets in proptest::collection::vec(0u32..700, 0..400),
    ) {
        let mut b = Bitmap::new(len);
        let mut model = std::collections::BTreeSet::new();
        for i in &sets {
            let fresh = i < &len && model.insert(*i);
            prop_assert_eq!(b.set(*i), fresh, "set({}) on {} chunks", i, len);
        }
        for i in 0..len + 8 {
            prop_assert_eq!(b.get(i), model.contains(&i));
        }
        prop_assert_eq!(b.count() as usize, model.len());
        prop_assert_eq!(b.len(), len);
        prop_assert_eq!(b.complete(), model.len() == len as usize);
        let missing: Vec<u32> = b.missing().collect();
        let expected: Vec<u32> = (0..len).filter(|i| !model.contains(i)).collect();
        prop_assert_eq!(&missing, &expected);
        // The receiver's Have: what a resumed sender reads back is what was held.
        prop_assert_eq!(Bitmap::from_bytes(b.as_bytes(), len), b.clone());
        // Held and missing together are every chunk, once.
        prop_assert_eq!(missing.len() + b.count() as usize, len as usize);
    }

    /// Bits past the length on the wire (garbage from a peer) are ignored.
    #[test]
    fn a_bitmap_from_the_wire_ignores_bits_past_its_length(
        len in 0u32..200,
        bytes in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let b = Bitmap::from_bytes(&bytes, len);
        for i in 0..len {
            let on_wire = bytes.get((i / 8) as usize).is_some_and(|x| x & (1 << (i % 8)) != 0);
            prop_assert_eq!(b.get(i), on_wire);
        }
        prop_assert!(!b.get(len));
        prop_assert_eq!(b.count() as usize, (0..len).filter(|i| b.get(*i)).count());
    }

    /// Pieces of a chunk arriving in any order, overlapping or not: the ranges are sorted,
    /// merged and exactly what arrived; what is missing is exactly the rest (what a resumed
    /// sender sends again); they survive the wire; and the chunk is covered only once every
    /// byte arrived.
    #[test]
    fn ranges_hold_exactly_the_bytes_that_arrived(
        len in 1u32..5000,
        pieces in proptest::collection::vec((0u32..5000, 0u32..1200), 0..30),
    ) {
        let pieces: Vec<(u32, u32)> = pieces
            .into_iter()
            .map(|(s, n)| (s.min(len), (s + n).min(len)))
            .collect();
        let mut r = Ranges::default();
        let mut model = vec![false; len as usize];
        for (s, e) in &pieces {
            r.add(*s, *e);
            for b in &mut model[*s as usize..*e as usize] {
                *b = true;
            }
        }
        // Sorted, non-empty, and merged (neither overlapping nor touching).
        for (s, e) in &r.0 {
            prop_assert!(s < e && *e <= len);
        }
        for w in r.0.windows(2) {
            prop_assert!(w[0].1 < w[1].0, "{:?}", r.0);
        }
        let held = |i: u32| r.0.iter().any(|(s, e)| (*s..*e).contains(&i));
        for i in 0..len {
            prop_assert_eq!(held(i), model[i as usize], "byte {}", i);
        }
        let count = model.iter().filter(|b| **b).count() as u64;
        prop_assert_eq!(r.len(), count);
        prop_assert_eq!(r.is_empty(), count == 0);
        prop_assert_eq!(r.covers(len), count == u64::from(len));
        // What is missing is exactly the rest, in order, merged too.
        let missing = r.missing(len);
        let mut gap = 0u64;
        for w in missing.windows(2) {
            prop_assert!(w[0].1 < w[1].0);
        }
        for (s, e) in &missing {
            prop_assert!(s < e && *e <= len);
            for i in *s..*e {
                prop_assert!(!model[i as usize], "byte {} held yet listed missing", i);
            }
            gap += u64::from(e - s);
        }
        prop_assert_eq!(gap + count, u64::from(len));
        // The wire form reads back the same (and is refused for a shorter chunk if it ends
        // past it).
        prop_assert_eq!(Ranges::from_wire(&r.to_wire(), len), Some(r.clone()));
        if let Some((_, end)) = r.0.last() {
            prop_assert_eq!(Ranges::from_wire(&r.to_wire(), end - 1), None);
        }
        // Sending what is missing completes the chunk.
        let mut resumed = r.clone();
        for (s, e) in &missing {
            resumed.add(*s, *e);
        }
        prop_assert!(resumed.covers(len));
        prop_assert_eq!(resumed.0, vec![(0, len)]);
    }

    /// The order pieces arrive in does not matter.
    #[test]
    fn ranges_do_not_depend_on_arrival_order(
        pieces in proptest::collection::vec((0u32..3000, 1u32..500), 0..20),
        seed in any::<u64>(),
    ) {
        let mut a = Ranges::default();
        for (s, n) in &pieces {
            a.add(*s, s + n);
        }
        let mut shuffled = pieces.clone();
        // A simple deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut b = Ranges::default();
        for (s, n) in &shuffled {
            b.add(*s, s + n);
        }
        prop_assert_eq!(a, b);
    }
}
