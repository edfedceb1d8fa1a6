//! The satellite-link emulator between real network namespaces: delay, rate, live loss
//! changes, cut and restore, and clean-up. Needs root and /dev/net/tun (as in CI).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tiandi_satlink::control::{self, SiteLinks};
use tiandi_satlink::topo::in_netns;
use tiandi_satlink::{Shape, Spec, Topology};

fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = in_netns(ns, move || UdpSocket::bind(addr))
        .expect("entering the namespace")
        .expect("binding in the namespace");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    s
}

/// Sends `n` datagrams of `size` bytes, `gap` apart, and counts what arrives within `wait`.
fn count_through(
    tx: &UdpSocket,
    rx: &UdpSocket,
    to: SocketAddr,
    n: usize,
    size: usize,
    gap: Duration,
    wait: Duration,
) -> usize {
    let payload = vec![7u8; size];
    for _ in 0..n {
        tx.send_to(&payload, to).expect("send");
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    let deadline = Instant::now() + wait;
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if rx.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    got
}

fn needs_root() {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id -u");
    assert!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0"
            && std::path::Path::new("/dev/net/tun").exists(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
}

/// The best of three round trips from `site` to `ctl` (which echoes), checking that the
/// datagrams come from `site`'s address; `None` when one is lost within `wait`.
fn best_rtt(site: &UdpSocket, ctl: &UdpSocket, wait: Duration) -> Option<Duration> {
    let (from_site, to) = (
        site.local_addr().expect("site address"),
        ctl.local_addr().expect("controller address"),
    );
    let mut buf = [0u8; 2048];
    let mut best: Option<Duration> = None;
    for i in 0..3u8 {
        let t = Instant::now();
        site.send_to(&[i; 100], to).expect("send");
        let deadline = t + wait;
        loop {
            if Instant::now() >= deadline {
                return None;
            }
            if let Ok((n, from)) = ctl.recv_from(&mut buf) {
                assert_eq!(from, from_site, "the datagram took another path");
                ctl.send_to(&buf[..n], from).expect("echo");
                break;
            }
        }
        loop {
            if Instant::now() >= deadline {
                return None;
            }
            if site.recv_from(&mut buf).is_ok() {
                break;
            }
        }
        best = Some(best.map_or(t.elapsed(), |b| b.min(t.elapsed())));
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_links_delay_limit_lose_and_cut() {
    needs_root();
    let shape = Shape {
        rate_kbit: 4_000,
        delay_ms: 100.0,
        queue_bytes: 200_000,
        ..Shape::default()
    };
    let mut spec = Spec::uniform("tdst", 2, shape);
    spec.net = [10, 201, 0];
    spec.seed = Some(42);
    let topo = Topology::up(&spec).expect("topology up (needs root)");
    let ctl = SocketAddr::new(topo.ctl_addr().into(), 5000);
    let site1 = SocketAddr::new(topo.site_addr(1).into(), 5001);
    let ctl_sock = udp_in(&topo.ctl_ns(), ctl);
    let s1 = udp_in(&topo.site_ns(1), site1);

    // Round trip: 2 × 100 ms plus serialisation; the first exchange also resolves ARP.
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2048];
    for i in 0..5u8 {
        let t = Instant::now();
        s1.send_to(&[i; 100], ctl).expect("send");
        let deadline = t + Duration::from_secs(3);
        let from = loop {
            assert!(Instant::now() < deadline, "no datagram crossed the link");
            if let Ok((_, from)) = ctl_sock.recv_from(&mut buf) {
                break from;
            }
        };
        ctl_sock.send_to(&buf[..100], from).expect("echo");
        loop {
            assert!(Instant::now() < deadline, "no echo came back");
            if s1.recv_from(&mut buf).is_ok() {
                break;
            }
        }
        rtts.push(t.elapsed());
    }
    let best = rtts.iter().min().expect("rtts");
    assert!(
        *best >= Duration::from_millis(199) && *best < Duration::from_millis(260),
        "round trip {best:?}, expected ~200 ms"
    );

    // Rate: 1000 datagrams of 1000 bytes offered at once (8 Mbit) to a 4 Mbit/s link with a
    // 200 kB queue: the queue takes ~190, the serialiser ~the rest of what fits.
    let got = count_through(
        &s1,
        &ctl_sock,
        ctl,
        1000,
        1000,
        Duration::ZERO,
        Duration::from_millis(1500),
    );
    let st = topo.link(1).status();
    assert!(st.up_counters.queue_drops > 300, "{st:?}");
    assert!(
        (150..=400).contains(&got),
        "{got} of 1000 passed a full queue"
    );

    // Live change (rain fade): 30 % loss, then restored.
    topo.link(1)
        .set(&[("loss_pct".into(), "30".into())])
        .expect("set");
    let got = count_through(
        &s1,
        &ctl_sock,
        ctl,
        400,
        200,
        Duration::from_millis(2),
        Duration::from_millis(800),
    );
    assert!((220..=340).contains(&got), "{got} of 400 at 30 % loss");
    topo.link(1)
        .set(&[("loss_pct".into(), "0".into())])
        .expect("set");

    // Cut: nothing passes, not even what was already on its way; restore: traffic flows.
    let fifty = || {
        count_through(
            &s1,
            &ctl_sock,
            ctl,
            50,
            200,
            Duration::from_millis(2),
            Duration::from_millis(500),
        )
    };
    topo.link(1).cut();
    assert_eq!(fifty(), 0);
    topo.link(1).restore();
    assert_eq!(fifty(), 50);

    // Site 2 never saw site 1's shaping changes.
    assert_eq!(topo.link(2).status().up.loss_pct, 0.0);
    topo.down();
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("tdst-"), "namespaces left behind: {left}");
}

/// A dual-homed site: a terrestrial line (10 Mbit/s, 10 ms) and a satellite link (4 Mbit/s,
/// 300 ms), each on its own network, shaped, cut and restored apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_links_carry_their_own_path_and_are_cut_apart() {
    needs_root();
    let shape = |rate_kbit, delay_ms| Shape {
        rate_kbit,
        delay_ms,
        queue_bytes: 200_000,
        ..Shape::default()
    };
    let mut spec = Spec::uniform("tdsat2", 1, shape(10_000, 10.0));
    spec.net = [10, 209, 0];
    spec.seed = Some(29);
    spec.second = vec![(shape(4_000, 300.0), shape(4_000, 300.0))];
    let topo = Topology::up(&spec).expect("topology up (needs root)");
    assert!(topo.has_second() && topo.second_link(1).is_some() && topo.second_link(2).is_none());
    assert_eq!(topo.ctl_addr2(), Some([10, 209, 1, 1].into()));
    assert_eq!(topo.site_addr2(1), Some([10, 209, 1, 11].into()));
    let ctl1 = SocketAddr::new(topo.ctl_addr().into(), 5000);
    let ctl2 = SocketAddr::new(topo.ctl_addr2().expect("second network").into(), 5000);
    let ctl1_sock = udp_in(&topo.ctl_ns(), ctl1);
    let ctl2_sock = udp_in(&topo.ctl_ns(), ctl2);
    let site1 = udp_in(
        &topo.site_ns(1),
        SocketAddr::new(topo.site_addr(1).into(), 5001),
    );
    let site2 = udp_in(
        &topo.site_ns(1),
        SocketAddr::new(topo.site_addr2(1).expect("second address").into(), 5001),
    );

    // Each path has its own link's delay: 2 × 10 ms and 2 × 300 ms.
    let wait = Duration::from_secs(3);
    let rtt1 = best_rtt(&site1, &ctl1_sock, wait).expect("the first path works");
    assert!(
        rtt1 >= Duration::from_millis(19) && rtt1 < Duration::from_millis(80),
        "first path round trip {rtt1:?}, expected ~20 ms"
    );
    let rtt2 = best_rtt(&site2, &ctl2_sock, wait).expect("the second path works");
    assert!(
        rtt2 >= Duration::from_millis(599) && rtt2 < Duration::from_millis(680),
        "second path round trip {rtt2:?}, expected ~600 ms"
    );
    let (first, second) = (
        topo.link(1).status(),
        topo.second_link(1).expect("second link").status(),
    );
    assert!(
        first.up_counters != Default::default() && second.up_counters != Default::default(),
        "{first:?} {second:?}"
    );

    // Cut the second link by name, as `tiandi-satlink cut s1b` does: the second path stops,
    // the first carries on; restored, the second path works again.
    let sites = SiteLinks::of(&topo);
    let a = control::handle(&sites, "cut s1b");
    assert_eq!(a["ok"], true, "{a}");
    assert!(topo.second_link(1).expect("second link").status().cut && !topo.link(1).status().cut);
    let fifty = |tx: &UdpSocket, rx: &UdpSocket, to: SocketAddr| {
        count_through(
            tx,
            rx,
            to,
            50,
            200,
            Duration::from_millis(2),
            Duration::from_millis(1000),
        )
    };
    assert_eq!(fifty(&site2, &ctl2_sock, ctl2), 0, "the cut second path");
    assert_eq!(fifty(&site1, &ctl1_sock, ctl1), 50, "the first path");
    assert!(best_rtt(&site1, &ctl1_sock, wait).is_some());
    let a = control::handle(&sites, "restore s1b");
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(
        fifty(&site2, &ctl2_sock, ctl2),
        50,
        "the restored second path"
    );
    assert!(best_rtt(&site2, &ctl2_sock, wait).is_some());

    topo.down();
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("tdsat2-"), "namespaces left behind: {left}");
}
