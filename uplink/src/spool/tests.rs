//! The spool's unit tests: numbering, acknowledgement, reopen, rewrite and crash safety.

use super::*;

fn open(dir: &std::path::Path, quota: u64) -> Spool {
    Spool::open_dir(dir, quota, 10_000, false).unwrap()
}

fn rep(t: i64) -> Report {
    let mut r = tiandi_proto::Report {
        taken_ms: t,
        ..Default::default()
    };
    r.host = Some(tiandi_proto::Host {
        cpu_permille: 100,
        ..Default::default()
    });
    r
}

#[test]
fn a_crash_between_the_report_and_its_counter_reuses_no_number() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("s").unwrap();
    {
        let mut s = Spool::open(tree.clone(), b"a\0", 1 << 20, 10_000, false).unwrap();
        for i in 0..3 {
            s.push(rep(i)).unwrap();
        }
        // As if the process died after storing report 3 but before its counter.
        tree.insert(s.meta_key(b"next"), &3u64.to_be_bytes())
            .unwrap();
    }
    let mut s = Spool::open(tree, b"a\0", 1 << 20, 10_000, false).unwrap();
    assert_eq!(s.next_seq(), 4);
    assert_eq!(s.push(rep(3)).unwrap(), 4);
    assert_eq!(s.len(), 4);
}

#[test]
fn push_ack_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path(), 1 << 20);
        for i in 0..10 {
            assert_eq!(s.push(rep(i)).unwrap(), i as u64 + 1);
        }
        // First contact: the controller knows nothing of this site yet.
        assert_eq!(s.apply_welcome(0, &[]).unwrap(), 0);
        assert_eq!(s.ack(3, 5).unwrap(), 3);
        assert_eq!(s.len(), 7);
        s.flush().unwrap();
    }
    let mut s = open(dir.path(), 1 << 20);
    assert_eq!(s.len(), 7);
    assert_eq!(s.next_seq(), 11);
    assert_eq!(s.newest().unwrap().unwrap().seq, 10);
    let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 6, 7, 8, 9, 10]);
    // The controller holds 1..=2 and 10.
    let dropped = s
        .apply_welcome(
            2,
            &[SeqRange {
                first: 10,
                last: 10,
            }],
        )
        .unwrap();
    assert_eq!(dropped, 3);
    let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![6, 7, 8, 9]);
}

#[test]
fn fresh_spool_renumbers_above_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), 1 << 20);
    for i in 0..3 {
        s.push(rep(i)).unwrap();
    }
    // The controller already has 1..=500 from this site's previous installation.
    assert_eq!(s.apply_welcome(500, &[]).unwrap(), 0);
    let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![501, 502, 503]);
    assert_eq!(s.push(rep(4)).unwrap(), 504);
}

#[test]
fn rewrite_keeps_everything_and_a_crash_mid_rewrite_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path(), 1 << 20);
        for i in 0..50 {
            s.push(rep(i * 10_000)).unwrap();
        }
        s.in_flight.insert(3);
        // Merge the oldest into 1-minute buckets until 2 kB are saved; seq 3 is in flight.
        s.rewrite(2_000, 60_000).unwrap();
        assert_eq!(s.compactions, 1);
        assert!(s.merged > 0);
        let all = s.after(0, 100).unwrap();
        let covered: u64 = all.iter().map(|r| r.last_seq() - r.seq + 1).sum();
        assert_eq!(covered, 50);
        assert!(all.iter().any(|r| r.seq == 3 && r.samples <= 1));
        assert_eq!(s.len(), all.len());
        s.flush().unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("CURRENT")).unwrap(),
        "1\n"
    );
    assert!(!dir.path().join("g0").exists());
    // A crash while writing generation 2, and one between the temporary and the rename.
    std::fs::create_dir(dir.path().join("g2")).unwrap();
    std::fs::write(dir.path().join("g2/db"), b"half a copy").unwrap();
    std::fs::write(dir.path().join("CURRENT.tmp"), b"2\n").unwrap();
    let mut s = open(dir.path(), 1 << 20);
    assert!(!dir.path().join("g2").exists());
    assert!(!dir.path().join("CURRENT.tmp").exists());
    let covered: u64 = s
        .after(0, 100)
        .unwrap()
        .iter()
        .map(|r| r.last_seq() - r.seq + 1)
        .sum();
    assert_eq!(covered, 50);
    assert_eq!(s.push(rep(600_000)).unwrap(), 51);
}

#[test]
fn a_corrupt_current_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("CURRENT"), b"banana").unwrap();
    let err = Spool::open_dir(dir.path(), 1 << 20, 10_000, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("CURRENT"), "{err}");
}

mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        Ack(u64, u64),
        Reopen,
        /// The controller says it holds these ranges (after a reconnect).
        Welcome(Vec<(u64, u64)>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Push),
            3 => (1u64..40, 0u64..6).prop_map(|(a, n)| Op::Ack(a, a + n)),
            1 => Just(Op::Reopen),
            1 => proptest::collection::vec((1u64..40, 0u64..4), 0..3)
                .prop_map(|v| Op::Welcome(v.into_iter().map(|(a, n)| (a, a + n)).collect())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the order of pushes, acknowledgements, restarts and welcomes, the spool
        /// holds exactly the reports pushed and not yet acknowledged, in sequence order, and
        /// never hands out a sequence number twice.
        #[test]
        fn the_spool_holds_exactly_what_is_not_acknowledged(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Some(open(dir.path(), 1 << 22));
            // First contact: the controller knows nothing yet (numbers stay as they are).
            s.as_mut().unwrap().apply_welcome(0, &[]).unwrap();
            let mut held: BTreeSet<u64> = BTreeSet::new();
            let mut issued: BTreeSet<u64> = BTreeSet::new();
            for (t, op) in ops.into_iter().enumerate() {
                let sp = s.as_mut().unwrap();
                match op {
                    Op::Push => {
                        let seq = sp.push(rep(t as i64 * 1000)).unwrap();
                        prop_assert!(issued.insert(seq), "sequence {} issued twice", seq);
                        prop_assert!(issued.iter().all(|&x| x <= seq), "numbers go up");
                        held.insert(seq);
                    }
                    Op::Ack(a, b) => {
                        let gone = sp.ack(a, b).unwrap();
                        let expect: Vec<u64> = held.range(a..=b).copied().collect();
                        prop_assert_eq!(gone, expect.len());
                        for x in expect {
                            held.remove(&x);
                        }
                    }
                    Op::Reopen => {
                        sp.flush().unwrap();
                        // Closed before it is opened again (sled holds a lock on it).
                        drop(s.take());
                        s = Some(open(dir.path(), 1 << 22));
                        // Confirmed before: a welcome of nothing renumbers nothing.
                        s.as_mut().unwrap().apply_welcome(0, &[]).unwrap();
                    }
                    Op::Welcome(ranges) => {
                        let ranges: Vec<SeqRange> = ranges
                            .into_iter()
                            .map(|(first, last)| SeqRange { first, last })
                            .collect();
                        sp.apply_welcome(0, &ranges).unwrap();
                        held.retain(|x| !ranges.iter().any(|r| r.first <= *x && *x <= r.last));
                    }
                }
                let sp = s.as_ref().unwrap();
                let now: Vec<u64> = sp.after(0, usize::MAX).unwrap().iter().map(|r| r.seq).collect();
                prop_assert_eq!(&now, &held.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(sp.len(), held.len());
            }
        }
    }
}
