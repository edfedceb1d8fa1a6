//! The spool's disk quota: 30 days of reports at a 10 s interval (259,200 reports) while the
//! link is down must fit in 64 MB on disk, with the oldest data downsampled, not dropped.

use tiandi_sim::SimSite;
use tiandi_uplink::spool::{Spool, dir_size};

#[test]
fn thirty_days_at_ten_seconds_fit_in_64_mb() {
    let dir = tempfile::tempdir().unwrap();
    let quota: u64 = 64 * 1024 * 1024;
    let start_ms: i64 = 1_790_000_000_000;
    let n: i64 = 30 * 86_400 / 10;
    let mut spool = Spool::open_dir(dir.path(), quota, 10_000, false).unwrap();
    let mut peak = 0u64;
    let mut site = SimSite::new(3, start_ms, false);
    let mut raw_bytes = 0usize;
    for i in 0..n {
        let t = start_ms + i * 10_000;
        let r = site.sample(t, 10.0);
        raw_bytes += tiandi_proto::Message::encoded_len(&r);
        spool.push(r).unwrap();
        if i % 1000 == 0 {
            peak = peak.max(dir_size(dir.path()));
        }
    }
    spool.flush().unwrap();
    let on_disk = dir_size(dir.path());
    peak = peak.max(on_disk).max(spool.peak_on_disk);
    let all = spool.after(0, usize::MAX).unwrap();
    let oldest = all.first().unwrap();
    let newest = all.last().unwrap();
    eprintln!(
        "reports={n} raw_bytes={raw_bytes} entries={} logical={} on_disk={on_disk} peak={peak} merged={} dropped={} compactions={}",
        all.len(),
        spool.bytes(),
        spool.merged,
        spool.dropped,
        spool.compactions,
    );
    // 57 MB of raw reports take several times that on disk in sled: downsampling must happen.
    assert!(spool.merged > 0, "nothing was downsampled");
    assert_eq!(spool.dropped, 0, "nothing dropped");
    assert!(on_disk <= quota, "spool uses {on_disk} bytes on disk");
    assert!(peak <= quota, "spool peaked at {peak} bytes on disk");
    // The whole 30 days are still covered, from the very first sequence number to the last.
    assert_eq!(oldest.seq, 1);
    assert_eq!(oldest.taken_ms, start_ms);
    assert_eq!(newest.last_seq(), n as u64);
    let covered: u64 = all.iter().map(|r| r.last_seq() - r.seq + 1).sum();
    assert_eq!(
        covered, n as u64,
        "every sequence number is covered exactly once"
    );
    // Recent data stays at full resolution; old data is downsampled.
    assert!(newest.samples <= 1);
    assert!(oldest.samples > 1);
}
