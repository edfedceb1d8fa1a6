use super::*;
use crate::names::{NameDecoder, NameEncoder, strip_for_minor};
use crate::{Body, DeviceEvent, MINOR, decode, encode};

/// splitmix64: the random reports below, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    /// Zero, small, large, near the top (a counter about to wrap), anything.
    fn u64(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => self.below(100),
            2 => self.below(1 << 40),
            3 => u64::MAX - self.below(100),
            4 => self.below(1 << 20),
            _ => self.next(),
        }
    }
    fn u32(&mut self) -> u32 {
        match self.below(4) {
            0 => u32::MAX - self.below(100) as u32,
            _ => self.u64() as u32,
        }
    }
    fn i64(&mut self) -> i64 {
        match self.below(3) {
            0 => -(self.below(1 << 20) as i64),
            1 => i64::MIN + self.below(100) as i64,
            _ => self.u64() as i64,
        }
    }
    fn i32(&mut self) -> i32 {
        self.i64() as i32
    }
    fn bool(&mut self) -> bool {
        self.chance(50)
    }
    fn pick(&mut self, pool: &[&str]) -> String {
        pool[self.below(pool.len() as u64) as usize].to_string()
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        if self.chance(80) { Some(f(self)) } else { None }
    }
    /// Mostly a few entries, now and then many (the hashed matching).
    fn vec<T>(&mut self, f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
        let n = if self.chance(10) {
            self.below(40)
        } else {
            self.below(5)
        };
        let mut f = f;
        (0..n).map(|_| f(self)).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

// Small pools of keys, so that entries match, go missing, come new and repeat.
const MOUNTS: &[&str] = &["/", "/srv", "/var", ""];
const IFACES: &[&str] = &["eth0", "eth1", "wan", "lan", ""];
const DEVICES: &[&str] = &["modem", "ups", "router", "switch", ""];
const OBJECTS: &[&str] = &["output_load", "battery_status", "temp", "x"];
const TEXTS: &[&str] = &["", "low", "normal", "QPSK 3/4", "n/a"];

// Every message is written out field by field (no `..Default::default()`): a field added to
// `messages.rs` does not compile here until the generator fills it too. Name references are 0,
// as they are in a report before compression and after expansion.

fn report(r: &mut Rng) -> Report {
    Report {
        seq: r.u64(),
        seq_last: r.u64(),
        taken_ms: r.i64(),
        span_ms: r.u32(),
        samples: r.u32(),
        host: r.opt(host),
        link: r.opt(link),
        devices: r.vec(device),
        events: r.vec(event),
        probes: r.vec(probe),
        traps: r.opt(traps),
        delta: DeltaMode::Whole as i32,
        federation: None,
    }
}

fn host(r: &mut Rng) -> Host {
    Host {
        cpu_permille: r.u32(),
        load1_c: r.u32(),
        load5_c: r.u32(),
        load15_c: r.u32(),
        mem_used_mib: r.u64(),
        mem_total_mib: r.u64(),
        uptime_s: r.u64(),
        filesystems: r.vec(|r| Filesystem {
            mount: r.pick(MOUNTS),
            mount_ref: 0,
            used_mib: r.u64(),
            total_mib: r.u64(),
        }),
        interfaces: r.vec(|r| Interface {
            name: r.pick(IFACES),
            name_ref: 0,
            rx_bytes: r.u64(),
            tx_bytes: r.u64(),
            rx_errors: r.u64(),
            tx_errors: r.u64(),
        }),
    }
}

fn link(r: &mut Rng) -> LinkStats {
    LinkStats {
        rtt_ms: r.u32(),
        lost_packets: r.u64(),
        cwnd_bytes: r.u64(),
        tx_bytes: r.u64(),
        rx_bytes: r.u64(),
        sent_packets: r.u64(),
    }
}

fn port(r: &mut Rng) -> DeviceInterface {
    DeviceInterface {
        // Up to 48 ports, some of them named alike.
        index: r.below(48) as u32,
        name: r.pick(IFACES),
        name_ref: 0,
        oper_up: r.bool(),
        in_octets: r.u64(),
        out_octets: r.u64(),
        in_errors: r.u64(),
        out_errors: r.u64(),
        alias: r.pick(TEXTS),
        alias_ref: 0,
        speed_mbps: r.u32(),
    }
}

fn device(r: &mut Rng) -> Device {
    Device {
        name: r.pick(DEVICES),
        name_ref: 0,
        profile: r.i32(),
        status: r.below(5) as i32,
        error: r.pick(TEXTS),
        interfaces: r.vec(port),
        ups: r.opt(|r| Ups {
            on_battery: r.bool(),
            charge_pct: r.u32(),
            runtime_s: r.u32(),
            missing: r.u32(),
        }),
        modem: r.opt(|r| Modem {
            esno_db_x10: r.i32(),
            rx_level_dbm_x10: r.i32(),
            modcod: r.pick(TEXTS),
            modcod_ref: 0,
            tx_power_dbm_x10: r.i32(),
            rx_rate_kbps: r.u32(),
            tx_rate_kbps: r.u32(),
            missing: r.u32(),
        }),
        values: r.vec(|r| ObjectValue {
            name: r.pick(OBJECTS),
            name_ref: 0,
            num: r.i64(),
            exp: r.i32(),
            text: r.pick(TEXTS),
            text_ref: 0,
            unit: r.pick(&["", "%", "V"]),
            unit_ref: 0,
            has_num: r.bool(),
        }),
        problems: r.vec(|r| ObjectProblem {
            name: r.pick(OBJECTS),
            name_ref: 0,
            kind: r.i32(),
            detail: r.pick(TEXTS),
            essential: r.bool(),
        }),
        alarms: r.vec(|r| DeviceAlarm {
            name: r.pick(OBJECTS),
            name_ref: 0,
            severity: r.i32(),
            detail: r.pick(TEXTS),
        }),
        profile_name: r.pick(&["", "if-mib", "ups-mib"]),
        profile_name_ref: 0,
        reach: r.opt(probe),
    }
}

fn event(r: &mut Rng) -> DeviceEvent {
    DeviceEvent {
        device: r.pick(DEVICES),
        device_ref: 0,
        name: r.pick(OBJECTS),
        name_ref: 0,
        severity: r.i32(),
        at_ms: r.i64(),
        count: r.u32(),
        detail: r.pick(TEXTS),
        inform: r.bool(),
    }
}

fn probe(r: &mut Rng) -> Probe {
    Probe {
        target: r.pick(DEVICES),
        target_ref: 0,
        kind: r.below(3) as i32,
        ok: r.bool(),
        rtt_us: r.u32(),
        error: r.pick(TEXTS),
        error_ref: 0,
    }
}

fn traps(r: &mut Rng) -> TrapStats {
    TrapStats {
        received: r.u64(),
        forwarded: r.u64(),
        summarised: r.u64(),
        unknown_source: r.u64(),
        rejected: r.u64(),
        ignored: r.u64(),
    }
}

/// Changes a list as reports do: reordered, an entry gone, a duplicate, a new one, one
/// replaced.
fn churn<T: Clone>(r: &mut Rng, v: &mut Vec<T>, new: impl Fn(&mut Rng) -> T) {
    if r.chance(30) {
        r.shuffle(v);
    }
    if !v.is_empty() && r.chance(20) {
        let i = r.below(v.len() as u64) as usize;
        v.remove(i);
    }
    if !v.is_empty() && r.chance(10) {
        let i = r.below(v.len() as u64) as usize;
        v.push(v[i].clone());
    }
    if r.chance(20) {
        v.push(new(r));
    }
    if !v.is_empty() && r.chance(30) {
        let i = r.below(v.len() as u64) as usize;
        v[i] = new(r);
    }
}

/// The next report of a site: often the same entries in the same order with some figures
/// changed, else entries gone, new, reordered or repeated too, now and then another report.
fn next(r: &mut Rng, prev: &Report) -> Report {
    if r.chance(10) {
        return report(r);
    }
    // The same keys in the same order (what a site sends most of the time).
    let steady = r.chance(50);
    let mut n = prev.clone();
    n.seq = prev.seq.wrapping_add(1);
    n.taken_ms = prev.taken_ms.wrapping_add(10_000);
    if !steady && r.chance(20) {
        n.host = r.opt(host);
    }
    if let Some(h) = n.host.as_mut() {
        h.uptime_s = h.uptime_s.wrapping_add(10);
        h.cpu_permille = r.u32();
        if !steady {
            churn(r, &mut h.interfaces, |r| {
                host(r).interfaces.pop().unwrap_or_default()
            });
        }
        for i in &mut h.interfaces {
            i.rx_bytes = i.rx_bytes.wrapping_add(r.below(1 << 20));
        }
    }
    if r.chance(20) {
        n.link = r.opt(link);
    }
    if !steady {
        churn(r, &mut n.devices, device);
    }
    for d in &mut n.devices {
        if !steady {
            churn(r, &mut d.interfaces, port);
        }
        for p in &mut d.interfaces {
            p.in_octets = p.in_octets.wrapping_add(r.below(1 << 20));
            p.oper_up ^= r.chance(10);
        }
        for v in &mut d.values {
            v.num = v.num.wrapping_add(r.i64() >> r.below(64));
        }
        d.status = r.below(5) as i32;
        if r.chance(20) {
            let fresh = device(r);
            (d.ups, d.modem, d.reach) = (fresh.ups, fresh.modem, fresh.reach);
            if !steady {
                d.values = fresh.values;
            }
        }
    }
    n.events = r.vec(event);
    if !steady {
        churn(r, &mut n.probes, probe);
    }
    if r.chance(20) {
        n.traps = r.opt(traps);
    }
    n
}

/// The sender's and the receiver's state of one connection, with the real frames between them.
struct Conn {
    names_out: NameEncoder,
    delta_out: DeltaEncoder,
    names_in: NameDecoder,
    delta_in: DeltaDecoder,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            names_out: NameEncoder::default(),
            delta_out: DeltaEncoder::for_peer(MINOR),
            names_in: NameDecoder::default(),
            delta_in: DeltaDecoder::for_peer(MINOR),
        }
    }

    /// What the sender puts on the wire for `r`.
    fn send(&mut self, r: &Report) -> bytes::Bytes {
        let mut wire = r.clone();
        strip_for_minor(&mut wire, MINOR);
        self.delta_out.encode(&mut wire);
        self.names_out.compress(&mut wire);
        encode(Body::Report(wire))
    }

    fn receive(&mut self, frame: &[u8]) -> Result<Report, ProtoError> {
        let Body::Report(mut r) = decode(frame)? else {
            panic!("not a report")
        };
        self.names_in.expand(&mut r)?;
        self.delta_in.decode(&mut r)?;
        Ok(r)
    }

    /// The report as received, the frame's length, its delta mode.
    fn roundtrip(&mut self, r: &Report) -> (Report, usize, DeltaMode) {
        let frame = self.send(r);
        let Body::Report(sent) = decode(&frame).unwrap() else {
            unreachable!()
        };
        let mode = DeltaMode::try_from(sent.delta).unwrap();
        (self.receive(&frame).unwrap(), frame.len(), mode)
    }
}

/// Random sequences of reports (entries added, gone, reordered, repeated; counters that wrap;
/// whole new reports) over one connection: the receiver gets every report exactly as sent.
#[test]
fn random_report_sequences_roundtrip() {
    let mut modes = [0usize; 3];
    for seed in 0..400 {
        let mut rng = Rng(seed);
        let mut conn = Conn::new();
        let mut r = report(&mut rng);
        for _ in 0..12 {
            let (back, _, mode) = conn.roundtrip(&r);
            assert_eq!(back, r, "seed {seed}");
            modes[mode as usize] += 1;
            r = next(&mut rng, &r);
        }
    }
    // Each mode often enough that the test is not vacuous.
    let total: usize = modes.iter().sum();
    assert!(modes.iter().all(|m| m * 10 > total), "{modes:?}");
}

/// Encoding against a report, then decoding against it, is the identity for any pair (the
/// wire's bytes in between), whatever the entries' keys.
#[test]
fn random_pairs_roundtrip_through_the_rules() {
    let mut positional = 0;
    for seed in 0..2000 {
        let mut rng = Rng(seed ^ 0xde17a);
        let prev = report(&mut rng);
        let cur = if rng.chance(50) {
            next(&mut rng, &prev)
        } else {
            report(&mut rng)
        };
        for by in [Match::Key, Match::Position] {
            let mut d = cur.clone();
            if d.diff(&prev, enc(by)).is_err() {
                // Only by position, when a list's keys differ.
                assert_eq!(by, Match::Position);
                continue;
            }
            positional += usize::from(by == Match::Position);
            let bytes = d.encode_to_vec();
            let mut back = Report::decode(bytes.as_slice()).unwrap();
            back.diff(&prev, dec(by)).unwrap();
            assert_eq!(back, cur, "seed {seed}, {by:?}");
        }
    }
    assert!(positional > 300, "{positional} by position");
}

fn enc(by: Match) -> How {
    How {
        dir: Dir::Encode,
        by,
    }
}
fn dec(by: Match) -> How {
    How {
        dir: Dir::Decode,
        by,
    }
}

/// Both ways of matching entries by key give the same pairs.
#[test]
fn small_and_hashed_matching_agree() {
    for seed in 0..3000 {
        let mut rng = Rng(seed ^ 0x9a125);
        let (a, b) = (device(&mut rng).interfaces, device(&mut rng).interfaces);
        assert_eq!(pairs_small(&a, &b), pairs_hashed(&a, &b), "seed {seed}");
        let (a, b) = (host(&mut rng).filesystems, host(&mut rng).filesystems);
        assert_eq!(pairs_small(&a, &b), pairs_hashed(&a, &b), "seed {seed}");
    }
}

fn port_named(index: u32, name: &str, in_octets: u64) -> DeviceInterface {
    DeviceInterface {
        index,
        name: name.into(),
        oper_up: true,
        in_octets,
        ..Default::default()
    }
}

fn router(ports: Vec<DeviceInterface>) -> Report {
    Report {
        seq: 1,
        devices: vec![Device {
            name: "router".into(),
            status: crate::DeviceStatus::Ok as i32,
            interfaces: ports,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An unchanged report costs only its sequence number and its entries' framing; a counter
/// that grew costs its growth.
#[test]
fn unchanged_figures_cost_nothing() {
    let mut conn = Conn::new();
    let first = crate::tests::sample();
    let (_, whole, mode) = conn.roundtrip(&first);
    assert_eq!(mode, DeltaMode::Whole, "the first report of a connection");
    let mut same = first.clone();
    same.seq += 1;
    let (back, len, mode) = conn.roundtrip(&same);
    assert_eq!((mode, &back), (DeltaMode::ByPosition, &same));
    // The frame's envelope, seq, the mode, and per entry its tag and length.
    assert!(len < 40, "{len} bytes (whole: {whole})");
    let mut d = same.clone();
    d.diff(&first, enc(Match::Position)).unwrap();
    let h = d.host.as_ref().unwrap();
    assert_eq!(
        (h.cpu_permille, h.uptime_s, h.interfaces[0].rx_bytes),
        (0, 0, 0)
    );
    assert!(h.interfaces[0].name.is_empty(), "keys are left out");
    assert!(d.devices.iter().all(|x| x.status == 0 && x.profile == 0));
    assert_eq!(d.devices[0].modem.as_ref().unwrap().esno_db_x10, 0);
    // The ModCod is no key: it stays (a name reference once compressed).
    assert_eq!(d.devices[0].modem.as_ref().unwrap().modcod, "QPSK 3/4");
}

/// A 64-bit counter that wraps costs a byte, and comes back right.
#[test]
fn wrapping_counters() {
    let prev = router(vec![port_named(1, "wan", u64::MAX - 5)]);
    let cur = router(vec![port_named(1, "wan", 10)]);
    for by in [Match::Key, Match::Position] {
        let mut d = cur.clone();
        d.diff(&prev, enc(by)).unwrap();
        // 16 more, zigzagged.
        assert_eq!(d.devices[0].interfaces[0].in_octets, 32);
        d.diff(&prev, dec(by)).unwrap();
        assert_eq!(d, cur);
        // And a counter that went back (a device restarted) is a negative difference.
        let mut d = prev.clone();
        d.diff(&cur, enc(by)).unwrap();
        assert_eq!(d.devices[0].interfaces[0].in_octets, 31);
        d.diff(&cur, dec(by)).unwrap();
        assert_eq!(d, prev);
    }
}

/// By key: entries whose key is not unique in either report, and entries the previous report
/// did not have, travel whole; the others against their match, wherever it stands.
#[test]
fn duplicate_and_new_keys_travel_whole() {
    let prev = router(vec![
        port_named(1, "wan", 1000),
        port_named(2, "lan", 2000),
        port_named(2, "lan", 2500),
        port_named(3, "mgmt", 3000),
    ]);
    let cur = router(vec![
        port_named(3, "mgmt", 3001),
        port_named(2, "lan", 2600),
        port_named(1, "wan", 1500),
        port_named(4, "new", 4000),
        port_named(1, "wan", 1600),
    ]);
    let mut d = cur.clone();
    assert!(d.diff(&prev, enc(Match::Position)).is_err());
    let mut d = cur.clone();
    d.diff(&prev, enc(Match::Key)).unwrap();
    let got: Vec<(u64, bool)> = d.devices[0]
        .interfaces
        .iter()
        .map(|p| (p.in_octets, p.oper_up))
        .collect();
    // mgmt: +1 (zigzag 2), up XOR up; lan (twice in prev), new, wan (twice in cur): whole.
    assert_eq!(
        got,
        [
            (2, false),
            (2600, true),
            (1500, true),
            (4000, true),
            (1600, true)
        ]
    );
    assert_eq!(d.devices[0].interfaces[0].name, "mgmt", "keys stay");
    d.diff(&prev, dec(Match::Key)).unwrap();
    assert_eq!(d, cur);
    // Through the whole pipeline too.
    let mut conn = Conn::new();
    conn.roundtrip(&prev);
    let (back, _, mode) = conn.roundtrip(&cur);
    assert_eq!((mode, back), (DeltaMode::ByKey, cur));
}

/// By position: every list with the previous report's keys in the same order, duplicates
/// included; one list that differs (a port more, two swapped) and the report goes by key.
#[test]
fn same_keys_go_by_position() {
    let ports = |octets: u64| {
        vec![
            port_named(1, "wan", octets),
            port_named(2, "lan", octets),
            port_named(2, "lan", octets),
        ]
    };
    let mut conn = Conn::new();
    conn.roundtrip(&router(ports(1000)));
    let next = router(ports(1500));
    let (back, _, mode) = conn.roundtrip(&next);
    assert_eq!((mode, &back), (DeltaMode::ByPosition, &next));
    let mut more = router(ports(1600));
    more.devices[0].interfaces.push(port_named(3, "mgmt", 7));
    let (back, _, mode) = conn.roundtrip(&more);
    assert_eq!((mode, &back), (DeltaMode::ByKey, &more));
    let mut swapped = more.clone();
    swapped.devices[0].interfaces.swap(0, 3);
    let (back, _, mode) = conn.roundtrip(&swapped);
    assert_eq!((mode, &back), (DeltaMode::ByKey, &swapped));
    // A receiver given lists of another length by position refuses the report.
    let mut d = router(ports(1700));
    d.diff(&router(ports(1600)), enc(Match::Position)).unwrap();
    d.devices[0].interfaces.pop();
    assert!(d.diff(&router(ports(1600)), dec(Match::Position)).is_err());
    let mut r = router(ports(0));
    r.delta = DeltaMode::ByPosition as i32;
    r.devices[0].interfaces.clear();
    let mut rx = DeltaDecoder::for_peer(MINOR);
    rx.decode(&mut router(ports(1))).unwrap();
    let err = rx.decode(&mut r).unwrap_err();
    assert!(err.to_string().contains("not as long"), "{err}");
}

/// A singleton the previous report lacked travels whole; one that is gone is gone.
#[test]
fn singletons_come_and_go() {
    let mut conn = Conn::new();
    let mut a = crate::tests::sample();
    a.link = None;
    conn.roundtrip(&a);
    let mut b = crate::tests::sample();
    b.seq += 1;
    b.host = None;
    let (back, _, _) = conn.roundtrip(&b);
    assert_eq!(back, b);
    let mut c = crate::tests::sample();
    c.seq += 2;
    let (back, _, _) = conn.roundtrip(&c);
    assert_eq!(back, c);
}

/// A report whose delta would be no shorter goes whole, and the next is encoded against it.
#[test]
fn a_report_that_gains_nothing_goes_whole() {
    let up = |s: u64| Report {
        seq: 1,
        host: Some(Host {
            uptime_s: s,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut conn = Conn::new();
    conn.roundtrip(&up(0));
    // 2^63 - 1 takes nine bytes; its difference from 0, zigzagged, ten.
    let far = up(i64::MAX as u64);
    let (back, _, mode) = conn.roundtrip(&far);
    assert_eq!((mode, &back), (DeltaMode::Whole, &far));
    let near = up(i64::MAX as u64 + 7);
    let (back, _, mode) = conn.roundtrip(&near);
    assert_eq!((mode, &back), (DeltaMode::ByPosition, &near));
}

/// A controller of an older minor gets whole reports; from an older agent a delta report is
/// refused, and so is one with nothing before it on the connection, or of an unknown mode.
#[test]
fn versions_and_malformed_deltas() {
    let mut enc = DeltaEncoder::for_peer(DELTA_MINOR - 1);
    for i in 0..3 {
        let mut r = crate::tests::sample();
        r.seq += i;
        let whole = r.clone();
        enc.encode(&mut r);
        assert_eq!(r, whole);
    }
    for mode in [DeltaMode::ByKey, DeltaMode::ByPosition] {
        let mut r = crate::tests::sample();
        r.delta = mode as i32;
        let err = DeltaDecoder::for_peer(MINOR).decode(&mut r).unwrap_err();
        assert!(matches!(err, ProtoError::Delta(_)), "{err}");
        assert!(err.to_string().contains("no earlier report"), "{err}");
        assert_eq!(err.code(), crate::codes::PROTOCOL);
    }
    let mut r = crate::tests::sample();
    r.delta = 3;
    let mut rx = DeltaDecoder::for_peer(MINOR);
    rx.decode(&mut crate::tests::sample()).unwrap();
    let err = rx.decode(&mut r).unwrap_err();
    assert!(err.to_string().contains("unknown delta mode"), "{err}");
    let mut old = DeltaDecoder::for_peer(DELTA_MINOR - 1);
    old.decode(&mut crate::tests::sample()).unwrap();
    r.delta = DeltaMode::ByKey as i32;
    let err = old.decode(&mut r).unwrap_err();
    assert!(err.to_string().contains("predates"), "{err}");
    // Nothing is kept for a peer that cannot send deltas.
    assert!(old.prev.is_none());
}

/// The receiver decodes every report, a duplicate it will not store too: were it to skip one,
/// the next delta would decode against the wrong report.
#[test]
fn every_report_moves_the_receivers_state() {
    let mut conn = Conn::new();
    let a = router(vec![port_named(1, "wan", 1000)]);
    let mut b = router(vec![port_named(1, "wan", 2000)]);
    b.seq = 2;
    let mut c = router(vec![port_named(1, "wan", 3000)]);
    c.seq = 3;
    conn.roundtrip(&a);
    // `b` a second time (resent on the same connection): still a delta, against `b`.
    let (back, _, _) = conn.roundtrip(&b);
    assert_eq!(back, b);
    let (back, _, mode) = conn.roundtrip(&b);
    assert_eq!((mode, &back), (DeltaMode::ByPosition, &b));
    let (back, _, _) = conn.roundtrip(&c);
    assert_eq!(back, c);
}
