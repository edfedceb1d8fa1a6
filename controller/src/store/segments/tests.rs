use super::*;

fn put(s: &mut Segments, site: &str, taken_ms: i64, seq: u64) {
    let report = format!("{site}/{seq}").into_bytes();
    s.append(&RecordRef {
        site,
        taken_ms,
        first: seq,
        last: seq,
        has_events: seq.is_multiple_of(7),
        report: &report,
    })
    .unwrap();
}

fn seqs(s: &Segments, site: &str, from: i64, to: i64, limit: usize) -> Vec<u64> {
    s.plan(site, from, to)
        .read(site, from, to, limit)
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.report, format!("{site}/{}", r.first).into_bytes());
            assert_eq!(r.has_events, r.first.is_multiple_of(7));
            r.first
        })
        .collect()
}

fn open(dir: &Path, limits: Limits) -> (Segments, Vec<(String, u64)>) {
    let mut replayed = Vec::new();
    let s = Segments::open(dir, limits, &mut |r| {
        replayed.push((r.site.clone(), r.first))
    })
    .unwrap();
    (s, replayed)
}

const SMALL: Limits = Limits {
    bytes: 1 << 30,
    age_ms: i64::MAX,
};

#[test]
fn a_site_s_records_come_back_by_sample_time_across_sealed_segments_and_unwritten_ones() {
    let t = tempfile::tempdir().unwrap();
    let (mut s, replayed) = open(t.path(), SMALL);
    assert!(replayed.is_empty());
    for seq in 1..=5 {
        put(&mut s, "bj-001", 1000 * seq as i64, seq);
        put(&mut s, "sh-002", 1000 * seq as i64, seq);
    }
    s.write().unwrap();
    s.seal().unwrap();
    // A backlog arriving late: older samples in a newer segment.
    for seq in 6..=8 {
        put(&mut s, "bj-001", 10_000 + 1000 * seq as i64, seq);
    }
    put(&mut s, "bj-001", 500, 100);
    s.write().unwrap();
    s.seal().unwrap();
    put(&mut s, "bj-001", 20_000, 9);
    // Not written yet: still read (from memory).
    assert_eq!(
        seqs(&s, "bj-001", 0, i64::MAX, 100),
        vec![100, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    );
    assert_eq!(seqs(&s, "bj-001", 2000, 4000, 100), vec![2, 3, 4]);
    assert_eq!(seqs(&s, "bj-001", 0, i64::MAX, 3), vec![100, 1, 2]);
    assert_eq!(seqs(&s, "sh-002", 0, i64::MAX, 100), vec![1, 2, 3, 4, 5]);
    assert!(seqs(&s, "gz-003", 0, i64::MAX, 100).is_empty());
    assert_eq!(s.count("bj-001").unwrap(), 10);
    assert_eq!(s.records(), 15);
    assert_eq!(s.latest("bj-001").unwrap().unwrap().first, 9);
    assert_eq!(s.latest("sh-002").unwrap().unwrap().first, 5);
    assert!(s.latest("gz-003").unwrap().is_none());
}

#[test]
fn reopening_rebuilds_the_active_index_replays_what_the_sequence_states_may_lack_and_cuts_a_torn_tail()
 {
    let t = tempfile::tempdir().unwrap();
    let active_path;
    {
        let (mut s, _) = open(t.path(), SMALL);
        put(&mut s, "a", 1000, 1);
        s.write().unwrap();
        s.seal().unwrap();
        put(&mut s, "a", 2000, 2);
        s.write().unwrap();
        s.seal().unwrap();
        put(&mut s, "a", 3000, 3);
        put(&mut s, "b", 3000, 1);
        s.write().unwrap();
        active_path = s.active.path.clone();
    }
    // A commit cut short: half a record at the end.
    let whole = std::fs::metadata(&active_path).unwrap().len();
    {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            &RecordRef {
                site: "a",
                taken_ms: 4000,
                first: 4,
                last: 4,
                has_events: false,
                report: b"a/4",
            },
        );
        let mut f = OpenOptions::new().append(true).open(&active_path).unwrap();
        f.write_all(&buf[..buf.len() / 2]).unwrap();
    }
    let (mut s, replayed) = open(t.path(), SMALL);
    assert_eq!(
        replayed,
        vec![("a".into(), 2), ("a".into(), 3), ("b".into(), 1)],
        "the last sealed segment and the active one"
    );
    assert_eq!(std::fs::metadata(&active_path).unwrap().len(), whole);
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 100), vec![1, 2, 3]);
    // New records follow the last whole one.
    put(&mut s, "a", 4000, 4);
    s.write().unwrap();
    drop(s);
    let (s, _) = open(t.path(), SMALL);
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 100), vec![1, 2, 3, 4]);
    assert_eq!(s.latest("a").unwrap().unwrap().first, 4);
}

#[test]
fn a_sealed_segment_s_lost_or_damaged_index_is_rebuilt_and_an_orphan_index_removed() {
    let t = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(t.path(), SMALL);
        for seq in 1..=3 {
            put(&mut s, "a", 1000 * seq as i64, seq);
        }
        s.seal().unwrap();
        put(&mut s, "a", 9000, 9);
        s.seal().unwrap();
    }
    std::fs::remove_file(idx_path(t.path(), 1)).unwrap();
    let mut b = std::fs::read(idx_path(t.path(), 2)).unwrap();
    b[20] ^= 0xff;
    std::fs::write(idx_path(t.path(), 2), &b).unwrap();
    std::fs::write(idx_path(t.path(), 77), b"orphan").unwrap();
    let (s, _) = open(t.path(), SMALL);
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 100), vec![1, 2, 3, 9]);
    assert!(idx_path(t.path(), 1).exists());
    assert!(!idx_path(t.path(), 77).exists());
}

#[test]
fn segments_are_sealed_by_size_and_retention_drops_whole_sealed_segments() {
    let t = tempfile::tempdir().unwrap();
    let limits = Limits {
        bytes: 300,
        age_ms: i64::MAX,
    };
    let (mut s, _) = open(t.path(), limits);
    let mut seals = 0;
    for seq in 1..=40u64 {
        put(&mut s, "a", 1000 * seq as i64, seq);
        s.write().unwrap();
        if s.seal_due() {
            s.seal().unwrap();
            seals += 1;
        }
    }
    assert!(seals >= 3, "{seals}");
    assert_eq!(s.sealed.len(), seals);
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 1000).len(), 40);
    // Nothing was sealed before this cutoff; then everything sealed so far goes.
    assert_eq!(s.prune(0).unwrap(), 0);
    let in_active = s.active.records;
    let removed = s.prune(now_ms() + 1).unwrap();
    assert_eq!(removed + in_active, 40);
    assert!(s.sealed.is_empty());
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 1000).len() as u64, in_active);
    let files: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "only the active segment is left: {files:?}");
}

#[test]
fn every_record_is_listed_oldest_segment_first_and_clear_empties_the_history() {
    let t = tempfile::tempdir().unwrap();
    let (mut s, _) = open(t.path(), SMALL);
    put(&mut s, "a", 1000, 1);
    s.seal().unwrap();
    put(&mut s, "b", 500, 1);
    put(&mut s, "a", 2000, 2);
    s.write().unwrap();
    // Not written yet: not in the files.
    put(&mut s, "a", 3000, 3);
    let list = |stop_after: usize| {
        let mut got = Vec::new();
        for_each_in(t.path(), &mut |r| {
            got.push((r.site, r.first));
            got.len() < stop_after
        })
        .unwrap();
        got
    };
    assert_eq!(
        list(usize::MAX),
        vec![("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]
    );
    assert_eq!(list(1), vec![("a".into(), 1)], "the sink can stop it");
    assert!(
        for_each_in(&t.path().join("none"), &mut |_| true).is_ok(),
        "no history yet"
    );

    s.clear().unwrap();
    assert_eq!(s.records(), 0);
    assert!(seqs(&s, "a", 0, i64::MAX, 100).is_empty());
    assert!(list(usize::MAX).is_empty());
    drop(s);
    let (s, replayed) = open(t.path(), SMALL);
    assert!(replayed.is_empty());
    assert_eq!(s.records(), 0);
}

#[test]
fn a_write_that_failed_keeps_its_records_pending_at_the_same_offsets() {
    let t = tempfile::tempdir().unwrap();
    let (mut s, _) = open(t.path(), SMALL);
    put(&mut s, "a", 1000, 1);
    // The file replaced by a read-only handle: the write fails.
    let good = s.active.file.clone();
    s.active.file = Arc::new(File::open(&s.active.path).unwrap());
    assert!(s.write().is_err());
    assert!(s.to_sync().is_none(), "nothing written");
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 100), vec![1], "still readable");
    s.active.file = good;
    put(&mut s, "a", 2000, 2);
    s.write().unwrap();
    let target = s.to_sync().expect("written, not synced");
    // Written after the sync target was handed out: not covered by its sync.
    put(&mut s, "a", 3000, 3);
    s.write().unwrap();
    target.file.sync_data().unwrap();
    s.synced(&target);
    assert!(s.to_sync().is_some(), "the later write still wants a sync");
    let target = s.to_sync().unwrap();
    s.synced(&target);
    assert!(s.to_sync().is_none());
    drop(s);
    let (s, _) = open(t.path(), SMALL);
    assert_eq!(seqs(&s, "a", 0, i64::MAX, 100), vec![1, 2, 3]);
}
