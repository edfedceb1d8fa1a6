//! The satellite-link emulator between real network namespaces: delay, rate, live loss
//! changes, cut and restore, and clean-up. Needs root and /dev/net/tun (as in CI).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_links_delay_limit_lose_and_cut() {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id -u");
    assert!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0"
            && std::path::Path::new("/dev/net/tun").exists(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
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
