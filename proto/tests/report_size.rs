//! What a report costs on the wire (issue 21): frame bytes (the 4-byte length and the envelope)
//! of a report as the sender encodes it (names table, then delta encoding from minor 3), for a
//! site like the simulated ones (host, satellite modem, UPS, 4-port router) and for a 48-port
//! switch (IF-MIB ifTable/ifXTable: name, alias, speed, oper status, 64-bit octets, errors).
//! `cargo test -p tiandi-proto --test report_size -- --nocapture` prints the figures; the
//! assertions hold the savings. (QUIC adds ~45 bytes of headers and tag per packet, and the
//! ingest benchmark's `wire_bytes_per_report` counts the acknowledgements' packets too.)

use tiandi_proto::delta::DeltaEncoder;
use tiandi_proto::names::NameEncoder;
use tiandi_proto::*;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// One connection's sender: frame bytes of each report, with and without delta encoding.
struct Sender {
    plain: NameEncoder,
    names: NameEncoder,
    delta: DeltaEncoder,
}

impl Sender {
    fn new() -> Sender {
        Sender {
            plain: NameEncoder::default(),
            names: NameEncoder::default(),
            delta: DeltaEncoder::for_peer(MINOR),
        }
    }
    /// (bytes with names only, bytes with names and delta).
    fn send(&mut self, r: &Report) -> (usize, usize) {
        let frame = |r: Report| encode(Body::Report(r)).len() + 4;
        let mut a = r.clone();
        self.plain.compress(&mut a);
        let mut b = r.clone();
        self.delta.encode(&mut b);
        self.names.compress(&mut b);
        (frame(a), frame(b))
    }
}

/// A site as `tiandi-sim` makes one up: its figures after `t` intervals of 10 s.
struct Site {
    rng: Rng,
    rx: [u64; 2],
    router: [(u64, u64); 4],
    uptime: u64,
    cpu: u32,
}

impl Site {
    fn new() -> Site {
        let mut rng = Rng(7);
        Site {
            rx: [rng.range(0, 1 << 36), rng.range(0, 1 << 30)],
            router: std::array::from_fn(|_| (rng.range(0, 1 << 36), rng.range(0, 1 << 35))),
            uptime: 3_600_000,
            cpu: 200,
            rng,
        }
    }

    fn sample(&mut self, seq: u64) -> Report {
        let r = &mut self.rng;
        self.uptime += 10;
        self.cpu = (self.cpu + r.range(0, 80) as u32)
            .saturating_sub(40)
            .min(900);
        for x in &mut self.rx {
            *x += r.range(200_000, 4_000_000);
        }
        for (i, o) in &mut self.router {
            *i += r.range(500_000, 6_000_000);
            *o += r.range(100_000, 2_000_000);
        }
        let esno = r.range(85, 115) as i32;
        Report {
            seq,
            taken_ms: 1_800_000_000_000 + seq as i64 * 10_000 + r.range(0, 40) as i64,
            host: Some(Host {
                cpu_permille: self.cpu,
                load1_c: self.cpu * 4 / 10,
                load5_c: self.cpu * 36 / 100,
                load15_c: self.cpu * 33 / 100,
                mem_used_mib: 4096 + r.range(0, 80),
                mem_total_mib: 8192,
                uptime_s: self.uptime,
                filesystems: vec![
                    Filesystem {
                        mount: "/".into(),
                        used_mib: 30_000,
                        total_mib: 60_000,
                        ..Default::default()
                    },
                    Filesystem {
                        mount: "/srv".into(),
                        used_mib: 200_000 + r.range(0, 2),
                        total_mib: 400_000,
                        ..Default::default()
                    },
                ],
                interfaces: ["eth0", "eth1"]
                    .iter()
                    .zip(self.rx)
                    .map(|(n, rx)| Interface {
                        name: (*n).into(),
                        rx_bytes: rx,
                        tx_bytes: rx / 4,
                        ..Default::default()
                    })
                    .collect(),
            }),
            link: None,
            devices: vec![
                Device {
                    name: "modem".into(),
                    profile: Profile::VsatModem as i32,
                    status: DeviceStatus::Ok as i32,
                    modem: Some(Modem {
                        esno_db_x10: esno,
                        rx_level_dbm_x10: -600 + esno * 3 / 2,
                        modcod: "QPSK 3/4".into(),
                        tx_power_dbm_x10: -90,
                        rx_rate_kbps: 4_000,
                        tx_rate_kbps: 1_024,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "ups".into(),
                    profile: Profile::UpsMib as i32,
                    status: DeviceStatus::Ok as i32,
                    ups: Some(Ups {
                        on_battery: false,
                        charge_pct: 100,
                        runtime_s: 3600,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "router".into(),
                    profile: Profile::IfMib as i32,
                    status: DeviceStatus::Ok as i32,
                    interfaces: ["wan", "lan", "lan2", "lan3"]
                        .iter()
                        .zip(self.router)
                        .enumerate()
                        .map(|(i, (n, (inb, outb)))| DeviceInterface {
                            index: i as u32 + 1,
                            name: (*n).into(),
                            oper_up: true,
                            in_octets: inb,
                            out_octets: outb,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }
}

/// How much of a 48-port switch's traffic changes from one report to the next.
#[derive(Clone, Copy, Debug)]
enum Traffic {
    /// Nothing: every counter as it was.
    Idle,
    /// The two uplinks and six access ports carry traffic; the other ports' counters stand.
    Steady,
    /// Every port's octets change (by 10 kB to 100 MB), now and then its errors too.
    All,
}

struct Switch {
    rng: Rng,
    ports: Vec<DeviceInterface>,
}

impl Switch {
    fn new() -> Switch {
        let mut rng = Rng(48);
        let ports = (1..=48u32)
            .map(|i| DeviceInterface {
                index: i,
                name: format!("GigabitEthernet1/0/{i}"),
                // Some ports named by the operator (ifAlias), the uplinks at 10 Gbit/s.
                alias: match i {
                    47 => "uplink to the county network".into(),
                    48 => "uplink to the satellite router".into(),
                    i if i % 4 == 1 => format!("office {i}"),
                    _ => String::new(),
                },
                speed_mbps: if i >= 47 { 10_000 } else { 1_000 },
                oper_up: i % 3 != 0,
                in_octets: rng.range(0, 1 << 40),
                out_octets: rng.range(0, 1 << 40),
                in_errors: rng.range(0, 50),
                out_errors: rng.range(0, 5),
                ..Default::default()
            })
            .collect();
        Switch { rng, ports }
    }

    fn sample(&mut self, seq: u64, traffic: Traffic) -> Report {
        for p in &mut self.ports {
            let busy = match traffic {
                Traffic::Idle => false,
                Traffic::Steady => p.index >= 47 || (1..=6).contains(&p.index),
                Traffic::All => true,
            };
            if busy {
                p.in_octets += self.rng.range(10_000, 100_000_000);
                p.out_octets += self.rng.range(10_000, 100_000_000);
                if matches!(traffic, Traffic::All) && self.rng.range(0, 10) == 0 {
                    p.in_errors += 1;
                }
            }
        }
        Report {
            seq,
            taken_ms: 1_800_000_000_000 + seq as i64 * 10_000,
            devices: vec![Device {
                name: "switch".into(),
                profile: Profile::IfMib as i32,
                profile_name: "if-mib".into(),
                status: DeviceStatus::Ok as i32,
                interfaces: self.ports.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

/// Mean frame bytes over reports 2..=n of a connection (the first carries the names as text):
/// (the first report, names only, names and delta).
fn measure(n: u64, mut sample: impl FnMut(u64) -> Report) -> (usize, f64, f64) {
    let mut s = Sender::new();
    let (first, _) = s.send(&sample(1));
    let (mut plain, mut delta) = (0, 0);
    for seq in 2..=n {
        let (a, b) = s.send(&sample(seq));
        plain += a;
        delta += b;
    }
    let k = (n - 1) as f64;
    (first, plain as f64 / k, delta as f64 / k)
}

/// About what a report takes in memory (its structs, lists and strings; not the allocator's
/// rounding): what a receiver keeps per connection for the next delta.
fn held(r: &Report) -> usize {
    use std::mem::size_of;
    let s = |x: &String| x.capacity();
    let probe = |p: &Probe| s(&p.target) + s(&p.error);
    let mut n = size_of::<Report>();
    if let Some(h) = &r.host {
        n += size_of::<Host>();
        n += h
            .filesystems
            .iter()
            .map(|f| size_of::<Filesystem>() + s(&f.mount))
            .sum::<usize>();
        n += h
            .interfaces
            .iter()
            .map(|i| size_of::<Interface>() + s(&i.name))
            .sum::<usize>();
    }
    n += r.link.as_ref().map_or(0, |_| size_of::<LinkStats>());
    for d in &r.devices {
        n += size_of::<Device>() + s(&d.name) + s(&d.error) + s(&d.profile_name);
        n += d
            .interfaces
            .iter()
            .map(|i| size_of::<DeviceInterface>() + s(&i.name) + s(&i.alias))
            .sum::<usize>();
        n += d.ups.as_ref().map_or(0, |_| size_of::<Ups>());
        n += d
            .modem
            .as_ref()
            .map_or(0, |m| size_of::<Modem>() + s(&m.modcod));
        n += d
            .values
            .iter()
            .map(|v| size_of::<ObjectValue>() + s(&v.name) + s(&v.text) + s(&v.unit))
            .sum::<usize>();
        n += d
            .problems
            .iter()
            .map(|p| size_of::<ObjectProblem>() + s(&p.name) + s(&p.detail))
            .sum::<usize>();
        n += d
            .alarms
            .iter()
            .map(|a| size_of::<DeviceAlarm>() + s(&a.name) + s(&a.detail))
            .sum::<usize>();
        n += d
            .reach
            .as_ref()
            .map_or(0, |p| size_of::<Probe>() + probe(p));
    }
    n += r
        .events
        .iter()
        .map(|e| size_of::<DeviceEvent>() + s(&e.device) + s(&e.name) + s(&e.detail))
        .sum::<usize>();
    n += r
        .probes
        .iter()
        .map(|p| size_of::<Probe>() + probe(p))
        .sum::<usize>();
    n + r.traps.as_ref().map_or(0, |_| size_of::<TrapStats>())
}

#[test]
fn report_sizes() {
    eprintln!(
        "held per connection: site {} B, 48-port switch {} B",
        held(&Site::new().sample(1)),
        held(&Switch::new().sample(1, Traffic::Idle))
    );
    let mut site = Site::new();
    let (first, whole, delta) = measure(60, |seq| site.sample(seq));
    eprintln!(
        "site (host, modem, UPS, 4-port router): first {first} B, then whole {whole:.0} B, delta {delta:.0} B per report"
    );
    assert!(delta < whole * 0.6, "{delta} vs {whole}");

    let (first, whole, _) = measure(30, |seq| Switch::new().sample(seq, Traffic::All));
    eprintln!("48-port switch: first {first} B (names as text), then whole {whole:.0} B");
    let mut figures = Vec::new();
    for traffic in [Traffic::Idle, Traffic::Steady, Traffic::All] {
        let mut sw = Switch::new();
        let (_, whole, delta) = measure(30, |seq| sw.sample(seq, traffic));
        eprintln!("48-port switch, {traffic:?}: whole {whole:.0} B, delta {delta:.0} B");
        figures.push((whole, delta));
    }
    let [(whole, idle), (_, steady), (_, all)] = figures[..] else {
        unreachable!()
    };
    // Every port costs its entry's framing (and its alias's name reference) at least.
    assert!(idle < whole / 8.0, "{idle} vs {whole}");
    assert!(steady < whole / 5.0, "{steady} vs {whole}");
    assert!(all < whole * 0.5, "{all} vs {whole}");
}
