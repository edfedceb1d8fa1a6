//! Loss detection under reordering, without I/O and in virtual time: two quinn-proto endpoints
//! (Tiandi's patched quinn-proto, `vendor/README.md`) with a simulated GEO path between them —
//! 300 ms each way, a 20 Mbit/s serialiser each way — that reorders, loses or passes packets
//! as each test says. The hub sends 6 MB on one stream with Tiandi's committed-rate controller
//! (as toward a site with a `[link_rates]` entry); the site reads it.
//!
//! What must hold: a packet that arrives early (netem-like: it skips the propagation delay and
//! overtakes ~300 ms of packets, both ways) or late (held back 1–20 ms) makes the sender
//! declare packets lost only until its thresholds adapt, those losses are recognised as
//! spurious, the minimum RTT stays the path's, and the transfer takes about as long as on a
//! clean path; real random loss is still detected and repaired.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, ServerConfig,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tiandi_link::LinkProfile;
use tiandi_link::congestion::FixedRateConfig;
use tiandi_link::pki::CONTROLLER_NAME;

mod common;

const ONE_WAY: Duration = Duration::from_millis(300);
const RATE_BYTES_PER_S: f64 = 20e6 / 8.0;
const SIZE: usize = 6_000_000;
/// Bytes a datagram takes on the wire beyond its UDP payload (Ethernet, IPv4, UDP).
const FRAME_OVERHEAD: usize = 42;

#[derive(Clone, Copy, Debug)]
enum Impairment {
    Clean,
    /// This share of packets skips the propagation delay (netem's reordering).
    Early(f64),
    /// This share of packets is held back by 1..=max ms (the common reordering).
    Late(f64, f64),
    /// Random loss.
    Loss(f64),
}

/// One direction of the path.
struct Direction {
    impairment: Impairment,
    busy_until: Instant,
    rng: SmallRng,
}

impl Direction {
    /// When a datagram of `len` bytes offered at `now` arrives (None: lost).
    fn offer(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let start = self.busy_until.max(now);
        let done =
            start + Duration::from_secs_f64((len + FRAME_OVERHEAD) as f64 / RATE_BYTES_PER_S);
        self.busy_until = done;
        let pick = |rng: &mut SmallRng, pct: f64| rng.random::<f64>() * 100.0 < pct;
        match self.impairment {
            Impairment::Clean => Some(done + ONE_WAY),
            Impairment::Early(pct) if pick(&mut self.rng, pct) => Some(done),
            Impairment::Late(pct, max) if pick(&mut self.rng, pct) => {
                let extra = self.rng.random_range(1.0..=max);
                Some(done + ONE_WAY + Duration::from_secs_f64(extra / 1e3))
            }
            Impairment::Loss(pct) if pick(&mut self.rng, pct) => None,
            _ => Some(done + ONE_WAY),
        }
    }
}

/// A datagram on its way: (arrival, order sent, towards the site?, bytes).
type InFlight = (Instant, u64, bool, Vec<u8>);

struct Node {
    endpoint: Endpoint,
    addr: SocketAddr,
    conn: Option<(ConnectionHandle, Connection)>,
}

#[derive(Debug)]
struct Outcome {
    /// Virtual time from the first stream byte written to the last one read.
    transfer: Duration,
    sent_packets: u64,
    lost_packets: u64,
    spurious_lost_packets: u64,
    min_rtt: Duration,
    /// The congestion window at the end.
    cwnd: u64,
}

fn configs(tail_copies: bool) -> (ServerConfig, ClientConfig) {
    let (server_tls, client_tls) = common::tls("reordering test");
    // The hub's transport: GEO windows, the committed-rate controller at the link's rate in
    // UDP payload (as the controller configures it for a site listed in `[link_rates]`).
    let mut hub = LinkProfile::Geo.transport_config();
    hub.congestion_controller_factory(Arc::new(FixedRateConfig::new(
        tiandi_link::congestion::udp_payload_bps(20e6),
    )));
    hub.tail_copies(tail_copies);
    let server = tiandi_link::server_config(server_tls, Arc::new(hub)).expect("server config");
    let client = tiandi_link::client_config(client_tls, LinkProfile::Geo.transport())
        .expect("client config");
    (server, client)
}

/// Runs one transfer hub → site over a path with `down` (hub to site) and `up` impairments.
fn transfer(down: Impairment, up: Impairment, seed: u64) -> Outcome {
    transfer_with(down, up, seed, false)
}

/// [`transfer`], with the hub's tail copies on or off.
fn transfer_with(down: Impairment, up: Impairment, seed: u64, tail_copies: bool) -> Outcome {
    let (server_cfg, client_cfg) = configs(tail_copies);
    let t0 = Instant::now();
    let mut now = t0;
    let ep_cfg = Arc::new(EndpointConfig::default());
    let mut hub = Node {
        endpoint: Endpoint::new(
            ep_cfg.clone(),
            Some(Arc::new(server_cfg)),
            true,
            Some([1; 32]),
        ),
        addr: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 4433)),
        conn: None,
    };
    let mut site = Node {
        endpoint: Endpoint::new(ep_cfg, None, true, Some([2; 32])),
        addr: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 11), 50000)),
        conn: None,
    };
    let (ch, conn) = site
        .endpoint
        .connect(now, client_cfg, hub.addr, CONTROLLER_NAME)
        .expect("connect");
    site.conn = Some((ch, conn));
    let mut dirs = [
        // 0: hub to site; 1: site to hub.
        Direction {
            impairment: down,
            busy_until: t0,
            rng: SmallRng::seed_from_u64(seed),
        },
        Direction {
            impairment: up,
            busy_until: t0,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
        },
    ];
    let mut wire: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut buf = Vec::new();
    let payload = vec![0x5au8; 64 * 1024];
    let (mut written, mut read) = (0usize, 0usize);
    let mut stream = None;
    let mut site_stream = None;
    let mut spins = 0u32;
    let mut started = None;
    let mut finished = None;
    let limit = t0 + Duration::from_secs(120);

    while finished.is_none() {
        if now >= limit {
            let st = hub.conn.as_ref().map(|(_, c)| c.stats());
            panic!(
                "the transfer did not finish in 120 s of virtual time ({read} of {SIZE} bytes): {:?}",
                st.map(|s| s.path)
            );
        }
        // Both ends: application work, then everything they want to send.
        for (is_hub, node) in [(true, &mut hub), (false, &mut site)] {
            let Some((ch, conn)) = node.conn.as_mut() else {
                continue;
            };
            while let Some(ev) = conn.poll_endpoint_events() {
                if let Some(cev) = node.endpoint.handle_event(*ch, ev) {
                    conn.handle_event(cev);
                }
            }
            while let Some(ev) = conn.poll() {
                match ev {
                    Event::Connected if is_hub => {
                        let id = conn.streams().open(Dir::Uni).expect("a stream");
                        stream = Some(id);
                        started = Some(now);
                    }
                    Event::ConnectionLost { reason } => panic!("connection lost: {reason}"),
                    _ => {}
                }
            }
            if is_hub && let Some(id) = stream {
                while written < SIZE {
                    let n = (SIZE - written).min(payload.len());
                    match conn.send_stream(id).write(&payload[..n]) {
                        Ok(w) => written += w,
                        Err(_) => break,
                    }
                }
                if written == SIZE {
                    let _ = conn.send_stream(id).finish();
                    stream = None;
                }
            }
            if !is_hub {
                if site_stream.is_none() {
                    site_stream = conn.streams().accept(Dir::Uni);
                }
                if let Some(id) = site_stream {
                    let mut rs = conn.recv_stream(id);
                    if let Ok(mut chunks) = rs.read(true) {
                        loop {
                            match chunks.next(usize::MAX) {
                                Ok(Some(c)) => read += c.bytes.len(),
                                Ok(None) => {
                                    finished = Some(now);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let _ = chunks.finalize();
                    }
                }
            }
            loop {
                buf.clear();
                let Some(t) = conn.poll_transmit(now, 1, &mut buf) else {
                    break;
                };
                let d = if is_hub { 0 } else { 1 };
                if let Some(at) = dirs[d].offer(now, t.size) {
                    order += 1;
                    wire.push(Reverse((at, order, is_hub, buf[..t.size].to_vec())));
                }
            }
        }
        if finished.is_some() {
            break;
        }
        // Next event: a datagram's arrival or a connection's timer.
        let timers = [&mut hub, &mut site]
            .into_iter()
            .filter_map(|n| n.conn.as_mut().and_then(|(_, c)| c.poll_timeout()))
            .min();
        let arrival = wire.peek().map(|Reverse((at, ..))| *at);
        let next = match (timers, arrival) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a
                .or(b)
                .expect("nothing in flight and no timer: the connection is stuck"),
        };
        if next <= now {
            spins += 1;
            assert!(
                spins < 1_000_000,
                "the simulation does not advance at {:?}",
                now - t0
            );
        } else {
            spins = 0;
        }
        now = now.max(next);
        while wire.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
            let Some(Reverse((_, _, to_site, data))) = wire.pop() else {
                break;
            };
            let (node, from) = if to_site {
                (&mut site, hub.addr)
            } else {
                (&mut hub, site.addr)
            };
            let mut resp = Vec::new();
            match node
                .endpoint
                .handle(now, from, None, None, BytesMut::from(&data[..]), &mut resp)
            {
                Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                    if let Some((_, c)) = node.conn.as_mut() {
                        c.handle_event(ev);
                    }
                }
                Some(DatagramEvent::NewConnection(incoming)) => {
                    let (ch, c) = node
                        .endpoint
                        .accept(incoming, now, &mut resp, None)
                        .expect("accept");
                    node.conn = Some((ch, c));
                }
                Some(DatagramEvent::Response(_)) | None => {}
            }
        }
        for node in [&mut hub, &mut site] {
            if let Some((_, c)) = node.conn.as_mut()
                && c.poll_timeout().is_some_and(|t| t <= now)
            {
                c.handle_timeout(now);
            }
        }
    }
    assert_eq!(read, SIZE, "every byte arrived");
    let stats = hub.conn.as_ref().expect("hub connection").1.stats();
    Outcome {
        transfer: finished.expect("finished") - started.expect("started"),
        sent_packets: stats.path.sent_packets,
        lost_packets: stats.path.lost_packets,
        spurious_lost_packets: stats.path.spurious_lost_packets,
        min_rtt: stats.path.min_rtt,
        cwnd: stats.path.cwnd,
    }
}

/// The clean path's figures: what the others are held against.
fn clean() -> Outcome {
    let o = transfer(Impairment::Clean, Impairment::Clean, 1);
    assert_eq!(o.lost_packets, 0, "{o:?}");
    o
}

#[test]
fn packets_arriving_300_ms_early_cost_one_burst_not_the_transfer() {
    let base = clean();
    let o = transfer(Impairment::Early(1.0), Impairment::Early(1.0), 7);
    eprintln!("clean {base:?}\nearly 1 % both ways {o:?}");
    // The path lost nothing: most losses declared were recognised as spurious (the rest are
    // packets the receiver discarded before its duplicate window grew, and packets whose
    // copies were acknowledged first).
    assert!(
        o.spurious_lost_packets * 5 >= o.lost_packets * 4,
        "losses not recognised as spurious: {o:?}"
    );
    // The thresholds adapted after the first bursts: without adapting, each early packet (1 %
    // of ~4,600) declares ~500 lost, ~20,000 in all, and the transfer never ends.
    assert!(
        o.sent_packets * 100 <= base.sent_packets * 135,
        "spurious losses kept coming: {o:?}"
    );
    // An early packet's sample of half the round trip does not shrink the committed-rate
    // window for good.
    assert!(
        o.cwnd * 100 >= base.cwnd * 85,
        "window {} against {} clean",
        o.cwnd,
        base.cwnd
    );
    assert!(
        o.transfer.as_secs_f64() <= base.transfer.as_secs_f64() * 1.35,
        "early packets slowed the transfer: {:?} against {:?} clean",
        o.transfer,
        base.transfer
    );
}

#[test]
fn packets_held_back_up_to_20_ms_are_not_declared_lost_for_long() {
    let base = clean();
    let o = transfer(Impairment::Late(5.0, 20.0), Impairment::Late(5.0, 20.0), 11);
    eprintln!("clean {base:?}\nlate 5 % both ways {o:?}");
    assert!(
        o.lost_packets - o.spurious_lost_packets <= o.lost_packets / 20 + 5,
        "losses not recognised as spurious: {o:?}"
    );
    // A packet held back 20 ms is overtaken by ~35 at this rate: once the threshold is above
    // that, no more spurious losses.
    assert!(
        o.lost_packets < o.sent_packets / 50,
        "spurious losses kept coming: {o:?}"
    );
    assert!(
        o.min_rtt >= Duration::from_millis(590),
        "min RTT {:?}",
        o.min_rtt
    );
    assert!(
        o.cwnd * 100 >= base.cwnd * 95,
        "window {} against {}",
        o.cwnd,
        base.cwnd
    );
    assert!(
        o.transfer.as_secs_f64() <= base.transfer.as_secs_f64() * 1.1,
        "late packets slowed the transfer: {:?} against {:?} clean",
        o.transfer,
        base.transfer
    );
}

#[test]
fn random_loss_is_still_detected_and_repaired() {
    let base = clean();
    let o = transfer(Impairment::Loss(1.0), Impairment::Loss(1.0), 3);
    eprintln!("clean {base:?}\nloss 1 % both ways {o:?}");
    // ~1 % of the hub's packets were lost and each was declared so; none was spurious.
    assert!(
        o.lost_packets * 200 >= o.sent_packets,
        "losses went undetected: {o:?}"
    );
    assert!(o.spurious_lost_packets <= o.lost_packets / 20, "{o:?}");
    assert!(
        o.transfer.as_secs_f64() <= base.transfer.as_secs_f64() * 1.25,
        "loss recovery too slow: {:?} against {:?} clean",
        o.transfer,
        base.transfer
    );
}

#[test]
fn tail_copies_end_a_lossy_transfer_sooner_for_at_most_a_window_more() {
    // The same five paths (5 % loss both ways, one seed each) with and without tail copies.
    let (mut plain, mut copied) = (Duration::ZERO, Duration::ZERO);
    let (mut plain_sent, mut copied_sent) = (0, 0);
    for seed in 20..25 {
        let a = transfer_with(Impairment::Loss(5.0), Impairment::Loss(5.0), seed, false);
        let b = transfer_with(Impairment::Loss(5.0), Impairment::Loss(5.0), seed, true);
        eprintln!("seed {seed}: without {a:?}\n         with {b:?}");
        plain += a.transfer;
        copied += b.transfer;
        plain_sent += a.sent_packets;
        copied_sent += b.sent_packets;
    }
    eprintln!("5 transfers: {plain:?} without tail copies, {copied:?} with");
    // The tail (one or two round trips of a ~4 s transfer) is what copies shorten: by at least
    // half a round trip per transfer on average.
    assert!(
        copied + Duration::from_millis(5 * 300) <= plain,
        "tail copies did not shorten the transfers: {copied:?} against {plain:?}"
    );
    // At most a window (~1,000 packets at 20 Mbit/s and 600 ms) more per transfer, and the
    // duplicated retransmissions of the tail.
    assert!(
        copied_sent <= plain_sent + 5 * 1_300,
        "{copied_sent} packets against {plain_sent}"
    );
}
