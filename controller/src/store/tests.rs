use super::*;

fn r(first: u64, last: u64) -> SeqRange {
    SeqRange { first, last }
}

/// The database and store a controller keeps in `dir` (`db/`, `history/`).
fn open(dir: &std::path::Path) -> (sled::Db, Arc<Store>) {
    let db = sled::open(dir.join("db")).unwrap();
    let store = Store::open(&db, dir).unwrap();
    (db, store)
}

fn rep(seq: u64) -> Report {
    Report {
        seq,
        taken_ms: 1_000 * seq as i64,
        ..Default::default()
    }
}

/// The sequence numbers of `site`'s history, in time order.
fn seqs(store: &Store, site: &str) -> Vec<u64> {
    store
        .history(site, 0, i64::MAX, 100)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[test]
fn seq_state_tracks_current_first_then_backlog() {
    let mut s = SeqState::default();
    // Current state (seq 100) arrives first, then the backlog 1..=99 in order.
    s.add(r(100, 100));
    assert_eq!(s.acked_through, 0);
    assert!(s.covers(r(100, 100)));
    for i in 1..=99 {
        assert!(!s.covers(r(i, i)));
        s.add(r(i, i));
    }
    assert_eq!(s.acked_through, 100);
    assert!(s.ranges.is_empty());
    // A downsampled range.
    s.add(r(105, 110));
    s.add(r(101, 104));
    assert_eq!((s.acked_through, s.ranges.len()), (110, 0));
    assert!(s.covers(r(50, 60)));
    assert!(!s.covers(r(110, 111)));
}

#[test]
fn what_an_older_version_left_in_sled_and_its_log_moves_into_the_segments_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(LEGACY_LOG);
    {
        // An older version: report 1 in sled's history tree (counted), 1 and 2 in its log.
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree(HISTORY_TREE)
            .unwrap()
            .insert(history_key("a", 1_000, 1), rep(1).encode_to_vec())
            .unwrap();
        let state = SeqState {
            acked_through: 1,
            ranges: vec![],
        };
        db.open_tree("seqs")
            .unwrap()
            .insert("a", serde_json::to_vec(&state).unwrap())
            .unwrap();
        db.flush().unwrap();
        let (mut wal, _) = crate::wal::Wal::open(&log).unwrap();
        let mut buf = Vec::new();
        crate::wal::encode(&mut buf, "a", &rep(1).encode_to_vec());
        crate::wal::encode(&mut buf, "a", &rep(2).encode_to_vec());
        wal.commit(&buf).unwrap();
    }
    let (db, store) = open(dir.path());
    assert_eq!(seqs(&store, "a"), vec![1, 2]);
    assert_eq!(store.history_entries(), 2);
    assert_eq!(store.seq_state("a").unwrap().acked_through, 2);
    assert!(!log.exists(), "the old log is gone");
    assert!(db.open_tree(HISTORY_TREE).unwrap().is_empty());
    drop(store);
    drop(db);
    let (_db, store) = open(dir.path());
    assert_eq!(store.seq_state("a").unwrap().acked_through, 2);
    assert_eq!(seqs(&store, "a"), vec![1, 2]);
    assert_eq!(store.history_entries(), 2, "moved once");
}

#[test]
fn a_commit_makes_reports_durable_in_the_segment_and_releases_their_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open(dir.path());
    let flushed = store.subscribe_flushed();
    let (new, epoch) = store
        .ingest(
            "a",
            &Report {
                seq: 1,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(new);
    assert!(*flushed.borrow() < epoch);
    let on_disk = || {
        let mut n = Vec::new();
        segments::for_each_in(&dir.path().join(HISTORY_DIR), &mut |r| {
            n.push(r.site);
            true
        })
        .unwrap();
        n
    };
    assert!(on_disk().is_empty(), "not written before the commit");
    store.flush().unwrap();
    assert!(*flushed.borrow() >= epoch);
    assert_eq!(on_disk(), vec!["a".to_string()]);
}

#[test]
fn after_a_crash_the_newest_segments_count_their_reports_and_index_their_events_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, store) = open(dir.path());
        store.ingest("a", &rep(1)).unwrap();
        store
            .ingest("a", &with_events(2, &[("on-battery", 1)]))
            .unwrap();
        // Committed (acknowledged), then the "crash": neither the sequence states nor the
        // device events reached sled's disk.
        store.flush().unwrap();
        db.open_tree(DEVICE_EVENTS_TREE).unwrap().clear().unwrap();
        db.open_tree("seqs").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    let (_db, store) = open(dir.path());
    assert_eq!(store.seq_state("a").unwrap().acked_through, 2);
    assert!(!store.ingest("a", &rep(2)).unwrap().0, "stored once");
    let ev = store.device_events("a", 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].name, "on-battery");
    assert_eq!(seqs(&store, "a"), vec![1, 2]);
    assert_eq!(store.latest("a").unwrap().unwrap().seq, 2);
}

#[test]
fn sealing_writes_the_sequence_states_first_and_retention_drops_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let limits = segments::Limits {
        bytes: 256,
        age_ms: i64::MAX,
    };
    {
        let store = Store::open_with(&db, dir.path(), limits).unwrap();
        for seq in 1..=20 {
            store.ingest("a", &rep(seq)).unwrap();
            store.flush().unwrap();
        }
        assert_eq!(seqs(&store, "a"), (1..=20).collect::<Vec<_>>());
        // Sealed several times, each after the states were written: they are in sled.
        let on_disk: SeqState =
            serde_json::from_slice(&db.open_tree("seqs").unwrap().get("a").unwrap().unwrap())
                .unwrap();
        assert!(on_disk.acked_through >= 15, "{on_disk:?}");
        let removed = store.prune_history(i64::MAX).unwrap();
        assert!(removed >= 15, "{removed}");
        assert_eq!(store.history_entries() + removed, 20, "whole segments went");
        assert_eq!(store.seq_state("a").unwrap().acked_through, 20);
    }
}

#[test]
fn ingest_is_exactly_once_and_history_is_ordered_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open(dir.path());
    assert!(store.ingest("a", &rep(3)).unwrap().0);
    assert!(store.ingest("a", &rep(1)).unwrap().0);
    assert!(!store.ingest("a", &rep(3)).unwrap().0);
    assert!(store.ingest("a", &rep(2)).unwrap().0);
    assert!(!store.ingest("a", &rep(1)).unwrap().0);
    let h = seqs(&store, "a");
    assert_eq!(h, vec![1, 2, 3]);
    assert_eq!(store.seq_state("a").unwrap().acked_through, 3);
    assert_eq!(store.latest("a").unwrap().unwrap().seq, 3);
    assert!(store.latest("b").unwrap().is_none());
    assert_eq!(store.history_len("a").unwrap(), 3);
    assert_eq!(store.history_len("b").unwrap(), 0);
}

#[test]
fn sparse_sequence_numbers_are_bounded() {
    let mut s = SeqState::default();
    // Every other number: each one a range of its own, up to the bound.
    for i in 0..MAX_SEQ_RANGES as u64 {
        let n = 10 + 2 * i;
        assert!(!s.too_sparse_with(r(n, n)), "{n}");
        s.add(r(n, n));
    }
    assert_eq!(s.ranges.len(), MAX_SEQ_RANGES);
    let far = 10 + 2 * MAX_SEQ_RANGES as u64 + 100;
    assert!(s.too_sparse_with(r(far, far)), "one more gap is refused");
    // What fills a gap, extends a range or continues the prefix is still taken.
    assert!(!s.too_sparse_with(r(11, 11)));
    assert!(!s.too_sparse_with(r(1, 9)));
    let last = 10 + 2 * (MAX_SEQ_RANGES as u64 - 1);
    assert!(!s.too_sparse_with(r(last + 1, last + 1)));
}

#[test]
fn the_alarm_log_comes_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = open(dir.path());
    for i in 0..25i64 {
        store
            .append_alarm(&AlarmEvent {
                at_ms: 1000 + i,
                site_id: if i % 5 == 0 { "gd-001" } else { "bj-001" }.into(),
                province: "X".into(),
                alarm: "site-down".into(),
                state: "raised".into(),
                detail: String::new(),
            })
            .unwrap();
    }
    // All of it, ten at a time, newest first, each event once.
    let (mut seen, mut before) = (Vec::new(), None::<Vec<u8>>);
    loop {
        let (page, next) = store
            .alarms_page(0, before.as_deref(), 10, 1000, |_| true)
            .unwrap();
        assert!(page.len() <= 10);
        seen.extend(page.iter().map(|e| e.at_ms));
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, (1000..1025).rev().collect::<Vec<_>>());
    // A filter that matches few: the scan bound cuts the page short and gives a cursor.
    let (page, next) = store
        .alarms_page(0, None, 10, 7, |e| e.site_id == "gd-001")
        .unwrap();
    assert_eq!(page.iter().map(|e| e.at_ms).collect::<Vec<_>>(), vec![1020]);
    let (page, _) = store
        .alarms_page(0, next.as_deref(), 10, 1000, |e| e.site_id == "gd-001")
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        vec![1015, 1010, 1005, 1000]
    );
}

fn with_events(seq: u64, events: &[(&str, u32)]) -> Report {
    Report {
        events: events
            .iter()
            .enumerate()
            .map(|(i, (name, count))| tiandi_proto::DeviceEvent {
                device: "router".into(),
                name: (*name).into(),
                severity: tiandi_proto::Severity::Major as i32,
                at_ms: 1_000 * seq as i64 + i as i64,
                count: *count,
                detail: "ifIndex 1\n(wan)".into(),
                ..Default::default()
            })
            .collect(),
        ..rep(seq)
    }
}

#[test]
fn device_events_are_kept_once_per_site_bounded_and_made_again_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_db, store) = open(dir.path());
        let r = with_events(1, &[("link-down", 1), ("link-down", 340)]);
        assert!(store.ingest("a", &r).unwrap().0);
        assert!(!store.ingest("a", &r).unwrap().0, "a duplicate");
        store
            .ingest("b", &with_events(1, &[("link-up", 1)]))
            .unwrap();
        let a = store.device_events("a", 10).unwrap();
        assert_eq!(a.len(), 2, "once each: {a:?}");
        assert_eq!(a[0].title(), "link-down ×340", "newest first");
        assert_eq!(a[1].title(), "link-down");
        assert_eq!(
            (a[0].severity.as_str(), a[0].seq, a[0].detail.as_str()),
            ("major", 1, "ifIndex 1(wan)")
        );
        assert_eq!(store.device_events("b", 10).unwrap().len(), 1);
        // Report 2 was committed when the controller "crashed", its events not yet in sled's
        // disk: they come back from the segment.
        store
            .ingest("a", &with_events(2, &[("on-battery", 1)]))
            .unwrap();
        store.flush().unwrap();
        let tree = _db.open_tree(DEVICE_EVENTS_TREE).unwrap();
        let keys: Vec<_> = tree.scan_prefix(site_prefix("a")).keys().collect();
        for k in keys {
            let k = k.unwrap();
            if tree
                .get(&k)
                .unwrap()
                .is_some_and(|v| v.windows(10).any(|w| w == b"on-battery"))
            {
                tree.remove(k).unwrap();
            }
        }
        _db.flush().unwrap();
        assert_eq!(store.device_events("a", 10).unwrap().len(), 2);
    }
    let (_db, store) = open(dir.path());
    let a = store.device_events("a", 10).unwrap();
    assert_eq!(
        a.iter().map(|e| e.title()).collect::<Vec<_>>(),
        ["on-battery", "link-down ×340", "link-down"]
    );
    // At most DEVICE_EVENTS_PER_SITE per site: the oldest go.
    for seq in 3..3 + DEVICE_EVENTS_PER_SITE as u64 {
        store
            .ingest("a", &with_events(seq, &[("link-up", 1)]))
            .unwrap();
    }
    let a = store.device_events("a", usize::MAX).unwrap();
    assert_eq!(a.len(), DEVICE_EVENTS_PER_SITE);
    assert!(a.iter().all(|e| e.name == "link-up"));
    // Older than the retention: gone with the history.
    let removed = store.prune("a", 1_000 * 100).unwrap();
    assert!(removed > 0);
    assert!(
        store
            .device_events("a", usize::MAX)
            .unwrap()
            .iter()
            .all(|e| e.at_ms >= 100_000)
    );
    assert_eq!(
        store.device_events("b", 10).unwrap().len(),
        1,
        "b's are its own"
    );
}
