//! The seed corpus: real encodings of what each decoder reads, made with the crates' own
//! encoders, plus regression inputs for what fuzzing and review found. `examples/seeds.rs`
//! writes them to `fuzz/seeds/<target>/<name>`; `scripts/fuzz` hands that directory to
//! libFuzzer next to the working corpus.

use bytes::{BufMut, BytesMut};
use tiandi_proto as proto;
use tiandi_transfer::manifest::{self, MIN_CHUNK, Manifest};
use tiandi_transfer::transfer_wire as tw;
use tiandi_video::conference_wire as cw;
use tiandi_video::fec;

/// One seed: its target, its file name, its bytes.
pub type Seed = (&'static str, String, Vec<u8>);

pub fn all() -> Vec<Seed> {
    let mut v = Vec::new();
    report_stream(&mut v);
    transfer_frame(&mut v);
    manifest_seeds(&mut v);
    conference_wire(&mut v);
    fec_seeds(&mut v);
    enroll_token(&mut v);
    admin_json(&mut v);
    replica_frame(&mut v);
    v
}

fn framed(bodies: &[bytes::Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    out
}

fn sample_report(seq: u64) -> proto::Report {
    use proto::*;
    Report {
        seq,
        taken_ms: 1_790_000_000_000,
        host: Some(Host {
            cpu_permille: 231,
            load1_c: 42,
            mem_used_mib: 2900,
            mem_total_mib: 7900,
            uptime_s: 8_640_000,
            filesystems: vec![Filesystem {
                mount: "/var".into(),
                used_mib: 150_000,
                total_mib: 400_000,
                ..Default::default()
            }],
            interfaces: vec![Interface {
                name: "eth0".into(),
                rx_bytes: 81_234_567_890,
                ..Default::default()
            }],
            ..Default::default()
        }),
        link: Some(LinkStats {
            rtt_ms: 612,
            lost_packets: 12,
            cwnd_bytes: 1_500_000,
            ..Default::default()
        }),
        devices: vec![Device {
            name: "modem".into(),
            profile: Profile::VsatModem as i32,
            status: DeviceStatus::Ok as i32,
            interfaces: vec![DeviceInterface {
                index: 1,
                name: "sat0".into(),
                oper_up: true,
                ..Default::default()
            }],
            modem: Some(Modem {
                esno_db_x10: 92,
                rx_level_dbm_x10: -452,
                modcod: "QPSK 3/4".into(),
                ..Default::default()
            }),
            ups: Some(Ups {
                on_battery: true,
                charge_pct: 80,
                runtime_s: 2400,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Reports 1..=n of a site as a sender of this version encodes them: figures changing a little
/// each time, delta-encoded against the one before (all but the first), names compressed.
fn sent_reports(n: u64) -> Vec<bytes::Bytes> {
    use proto::*;
    let mut names = names::NameEncoder::default();
    let mut delta = delta::DeltaEncoder::for_peer(MINOR);
    (1..=n)
        .map(|seq| {
            let mut r = sample_report(seq);
            r.taken_ms += seq as i64 * 10_000;
            let host = r.host.as_mut().expect("sample has a host");
            host.uptime_s += seq * 10;
            host.interfaces[0].rx_bytes += seq * 1_234_567;
            host.cpu_permille += (seq as u32 * 37) % 100;
            delta.encode(&mut r);
            names.compress(&mut r);
            encode(Body::Report(r))
        })
        .collect()
}

fn report_stream(v: &mut Vec<Seed>) {
    use proto::*;
    let reports = sent_reports(3);
    let hello = encode(Body::Hello(Hello {
        site_id: "gd-001".into(),
        major: MAJOR,
        minor: MINOR,
        agent_version: "0.1.0".into(),
        interval_ms: 10_000,
        epoch: 0,
        path: "ground".into(),
    }));
    let welcome = encode(Body::Welcome(Welcome {
        major: MAJOR,
        minor: MINOR,
        acked_through: 7,
        acked_ranges: vec![SeqRange { first: 9, last: 12 }],
        server_time_ms: 1_790_000_000_000,
        epoch: 1,
        path_policy: Some(PathPolicy {
            classes: vec![ClassRule {
                class: "bulk".into(),
                paths: vec!["ground".into(), "sky@window".into()],
            }],
            critical_on_all: true,
        }),
    }));
    let ack = encode(Body::Ack(Ack { first: 1, last: 3 }));
    let refused = encode(Body::Refused(Refused {
        code: codes::IDENTITY,
        reason: "site ID does not match the certificate".into(),
    }));
    let paths = encode(Body::Paths(Paths {
        paths: vec![PathStatus {
            name: "sky".into(),
            kind: "sky".into(),
            state: "up".into(),
            rtt_ms: 612,
            loss_permille: 10,
            tx_kbps: 2,
            rx_kbps: 3,
            budget_kbps: 512,
            since_ms: 1_790_000_000_000,
        }],
        uses: vec![ClassUse {
            class: "reports".into(),
            path: "sky".into(),
        }],
        switches: vec![PathSwitch {
            at_ms: 1_790_000_000_000,
            class: "reports".into(),
            from: "ground".into(),
            to: "sky".into(),
            reason: "path down".into(),
        }],
        run: 7,
        version: 2,
    }));
    let mut session = vec![hello, paths];
    session.extend(reports);
    // The first byte is the size of the pieces the stream arrives in.
    let mut s = vec![63];
    s.extend(framed(&session));
    v.push(("report_stream", "session".into(), s));
    let mut s = vec![255];
    s.extend(framed(&[welcome, ack, refused]));
    v.push(("report_stream", "controller-frames".into(), s));
    // Regression (review, issue 15 finding 10): one 16 KiB name, then a frame of 12,000
    // references to it expanded to 190 MB of names before `names::MAX_EXPANDED_BYTES`.
    let long = proto::Filesystem {
        mount: "m".repeat(16 * 1024),
        ..Default::default()
    };
    let refs = proto::Filesystem {
        mount_ref: 1,
        ..Default::default()
    };
    let with = |fs: Vec<proto::Filesystem>| {
        encode(Body::Report(Report {
            seq: 1,
            host: Some(Host {
                filesystems: fs,
                ..Default::default()
            }),
            ..Default::default()
        }))
    };
    let mut s = vec![255];
    s.extend(framed(&[with(vec![long]), with(vec![refs; 12_000])]));
    v.push(("report_stream", "regression-names-amplify".into(), s));
    // Delta reports: a connection's reports in order, and one with nothing before it.
    v.push(("report_delta", "session".into(), framed(&sent_reports(4))));
    let mut orphan = sample_report(2);
    orphan.delta = proto::DeltaMode::ByKey as i32;
    v.push((
        "report_delta",
        "delta-first".into(),
        framed(&[encode(Body::Report(orphan))]),
    ));
}

fn sample_manifest() -> Manifest {
    let data: Vec<u8> = (0..(MIN_CHUNK as usize * 2 + 1000))
        .map(|i| (i * 7) as u8)
        .collect();
    let c = MIN_CHUNK as usize;
    Manifest {
        name: "政策-2026.pdf".into(),
        size: data.len() as u64,
        chunk_size: MIN_CHUNK,
        file_hash: *blake3::hash(&data).as_bytes(),
        chunks: data
            .chunks(c)
            .map(|b| *blake3::hash(b).as_bytes())
            .collect(),
    }
}

fn transfer_frame(v: &mut Vec<Seed>) {
    use tw::*;
    let m = sample_manifest();
    let mut offer = Offer::new(&m, "t-42", "normal", "controller");
    offer.forward_to = vec!["gd-002".into(), "gd-003".into()];
    let receipt = Receipt {
        file_hash: m.id_hex(),
        size: m.size,
        path: "inbox/gd-001/政策-2026.pdf".into(),
        verified_ms: 1_790_000_000_000,
        node: "gd-001".into(),
    };
    let frames = [
        ("offer", Frame::Offer(offer.clone())),
        ("offer-short", Frame::Offer(offer.short())),
        (
            "have",
            Frame::Have(Have {
                verified: vec![0b101],
                partial: vec![PartialChunk {
                    index: 1,
                    ranges: vec![0, 1200, 2400, 9000],
                }],
            }),
        ),
        ("acked", Frame::Acked(Acked { chunks: vec![0, 2] })),
        (
            "resend",
            Frame::Resend(Resend {
                chunk: 1,
                reason: "hash mismatch".into(),
            }),
        ),
        ("done", Frame::Done(receipt.clone())),
        (
            "failed",
            Frame::Failed(Failed {
                code: codes::DISK_FULL,
                message: "disk full".into(),
                retry_after_ms: 60_000,
            }),
        ),
        (
            "forwarded",
            Frame::Forwarded(Forwarded {
                items: vec![ForwardStatus {
                    file_hash: m.id_hex(),
                    site: "gd-002".into(),
                    state: "delivered".into(),
                    acked_bytes: m.size,
                    sent_bytes: m.size,
                    receipt: Some(receipt),
                    ..Default::default()
                }],
            }),
        ),
        (
            "lease",
            Frame::Lease(tw::Lease {
                key: "gd-002/db".into(),
                holder: "gd-db/backup/1796540000000".into(),
                ttl_s: 120,
                release: false,
                expires_ms: 0,
            }),
        ),
        (
            "check-site",
            Frame::CheckSite(CheckSite {
                site: "gd-002".into(),
                serial: "0a1b2c".into(),
                province: "gd".into(),
            }),
        ),
    ];
    for (name, f) in frames {
        v.push(("transfer_frame", name.into(), f.encode().to_vec()));
    }
    // Regression (review, issue 15 finding 10; fails until `Ranges::from_wire` is linear):
    // a receiver's `Have` listing 100,000 disjoint byte ranges of one partial chunk (600 KB,
    // well inside MAX_FRAME) kept the sender's task busy for ~20 s of CPU (a full frame: minutes), since each range
    // re-sorted and re-merged every range before it.
    let ranges: Vec<u32> = (0..100_000u32)
        .flat_map(|i| [70_000 + 2 * i, 70_001 + 2 * i])
        .collect();
    let have = Frame::Have(Have {
        verified: Vec::new(),
        partial: vec![PartialChunk {
            index: 2 * 1024 * 1024 - 1,
            ranges,
        }],
    });
    v.push((
        "transfer_frame",
        "regression-have-ranges-quadratic".into(),
        have.encode().to_vec(),
    ));
    v.push((
        "transfer_frame",
        "chunk-header".into(),
        chunk_header(&m.file_hash, 2).to_vec(),
    ));
    v.push((
        "transfer_frame",
        "piece-header".into(),
        piece_header(&m.file_hash, 1, 1200).to_vec(),
    ));
}

fn manifest_seeds(v: &mut Vec<Seed>) {
    let m = sample_manifest();
    v.push(("manifest", "three-chunks".into(), manifest::encode(&m)));
    let empty = Manifest {
        name: "empty.txt".into(),
        size: 0,
        chunk_size: MIN_CHUNK,
        file_hash: *blake3::hash(b"").as_bytes(),
        chunks: Vec::new(),
    };
    v.push(("manifest", "empty-file".into(), manifest::encode(&empty)));
}

fn conference_wire(v: &mut Vec<Seed>) {
    use cw::*;
    let track = TrackInfo {
        id: 3,
        publisher: "gd-001".into(),
        kind: "video".into(),
        codec: "h264".into(),
        rendition: "720p".into(),
        bitrate_kbps: 1500,
        width: 1280,
        height: 720,
        extradata: vec![1, 0x64, 0, 0x1f],
        via: vec!["relay-gd".into()],
        ..Default::default()
    };
    let controls = [
        (
            "hello",
            Control::Hello(Hello {
                version: VERSION,
                room: "drill".into(),
                role: "site".into(),
                path: vec!["relay-gd".into()],
                link_kbps: 2048,
                fec_rtt_ms: 200,
                ..Default::default()
            }),
        ),
        (
            "welcome",
            Control::Welcome(Welcome {
                version: VERSION,
                relay: "controller".into(),
                you: "gd-001".into(),
                chair: "bj-000".into(),
                fec_rtt_ms: 200,
            }),
        ),
        (
            "announce",
            Control::Announce(Announce {
                track: Some(track.clone()),
            }),
        ),
        (
            "tracks",
            Control::Tracks(Tracks {
                tracks: vec![track],
            }),
        ),
        (
            "subscribe",
            Control::Subscribe(Subscribe {
                publisher: "gd-001".into(),
                kind: "video".into(),
                rendition: "720p".into(),
                ..Default::default()
            }),
        ),
        (
            "floor",
            Control::Floor(Floor {
                holder: "gd-001".into(),
            }),
        ),
        (
            "rollcall",
            Control::RollCall(RollCall {
                id: 7,
                deadline_ms: 1_790_000_030_000,
            }),
        ),
        ("present", Control::Present(Present { id: 7 })),
        (
            "health",
            Control::Health(Health {
                publisher: "gd-001".into(),
                kind: "audio".into(),
                kbps: 64,
                frames: 500,
                latency_ms: 640,
                ..Default::default()
            }),
        ),
        (
            "error",
            Control::Error(ErrorMsg {
                code: codes::NO_FLOOR,
                message: "publishing without the floor".into(),
            }),
        ),
    ];
    for (name, c) in controls {
        v.push(("conference_wire", name.into(), c.encode().to_vec()));
    }
    let mut group = GroupHeader {
        track: 3,
        group: 42,
    }
    .encode()
    .to_vec();
    for (i, n) in [300usize, 40, 0].into_iter().enumerate() {
        group.extend_from_slice(
            &Object {
                pts_us: 1_000_000 + 40_000 * i as i64,
                flags: if i == 0 { flags::KEY } else { 0 },
                payload: vec![i as u8; n].into(),
            }
            .encode(),
        );
    }
    v.push(("conference_wire", "group-stream".into(), group));
}

fn fec_seeds(v: &mut Vec<Seed>) {
    let p = fec::Params { t: 256, pct: 25 };
    let data: Vec<u8> = (0..2000).map(|i| (i * 7 % 251) as u8).collect();
    let repairs = fec::protect(4, 100, &data, p, true);
    for (i, r) in repairs.iter().enumerate().take(3) {
        v.push(("fec_datagram", format!("repair-{i}"), r.encode().to_vec()));
    }
    v.push((
        "fec_datagram",
        "final-size".into(),
        fec::Repair::end(4, 2100).encode().to_vec(),
    ));
    // Reassembly scripts: stream length (u16), symbol size (u8), then operations
    // (0: a segment, 1: an honest repair, 2: a datagram of the peer's own, 3: wrong bytes).
    let mut s = BytesMut::new();
    s.put_u16(5000);
    s.put_u8(3); // t = 256
    for (off, n) in [(0u16, 1200u16), (2400, 1200), (3600, 1400)] {
        s.put_u8(0);
        s.put_u16(off);
        s.put_u16(n - 1);
    }
    for i in 0..8u16 {
        s.put_u8(1);
        s.put_u16(i);
    }
    v.push(("fec_reassembly", "lost-packet-repaired".into(), s.to_vec()));
    let mut s = BytesMut::new();
    s.put_u16(3000);
    s.put_u8(1);
    s.put_u8(2);
    let d = fec::protect(5, 0, &data[..1000], fec::Params { t: 128, pct: 25 }, false)[0].encode();
    s.put_u16(d.len() as u16);
    s.put_slice(&d);
    s.put_u8(3);
    s.put_u16(100);
    s.put_u16(50);
    s.put_u8(0xAA);
    v.push(("fec_reassembly", "hostile-peer".into(), s.to_vec()));
}

fn enroll_token(v: &mut Vec<Seed>) {
    let token = format!("T1.{}.{}", "0f".repeat(16), "AB".repeat(32));
    v.push(("enroll_token", "token".into(), token.clone().into_bytes()));
    let req = tiandi_link::enroll::EnrollRequest {
        token,
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
    };
    v.push((
        "enroll_token",
        "request".into(),
        serde_json::to_vec(&req).unwrap(),
    ));
    for (name, resp) in [
        (
            "issued",
            tiandi_link::enroll::EnrollResponse::Issued {
                site_id: "gd-001".into(),
                province: "gd".into(),
                cert_pem: "-----BEGIN CERTIFICATE-----\n".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            },
        ),
        (
            "refused",
            tiandi_link::enroll::EnrollResponse::Refused {
                reason: "unknown or already used enrollment token".into(),
            },
        ),
    ] {
        v.push((
            "enroll_token",
            name.into(),
            serde_json::to_vec(&resp).unwrap(),
        ));
    }
    for (i, n) in ["gd-001", "..", "政策.pdf", "a/b", ".hidden"]
        .iter()
        .enumerate()
    {
        v.push(("enroll_token", format!("name-{i}"), n.as_bytes().to_vec()));
    }
}

fn admin_json(v: &mut Vec<Seed>) {
    let bodies: [(&str, u8, &str); 12] = [
        (
            "enroll",
            0,
            r#"{"site_id":"gd-001","province":"gd","ttl_hours":24}"#,
        ),
        (
            "enroll-batch",
            1,
            r#"{"sites":[{"site_id":"gd-001","province":"gd"},{"site_id":"gd-002","province":"gd"}]}"#,
        ),
        ("revoke", 2, r#"{"site_id":"gd-001"}"#),
        ("transfers", 3, "{}"),
        (
            "conference-create",
            4,
            r#"{"op":"create","room":"drill","chair":"bj-000"}"#,
        ),
        (
            "conference-record",
            4,
            r#"{"op":"record","room":"drill","site":"gd-001","stop":false,"format":"ts"}"#,
        ),
        (
            "conference-rollcall",
            4,
            r#"{"op":"rollcall","room":"drill","seconds":30}"#,
        ),
        ("registry", 5, "{}"),
        (
            "send",
            6,
            r#"{"path":"/srv/outgoing/policy.pdf","to":"province:gd","priority":"alarm","window":"01:00-06:00+08:00","rate_limit_mbit":2.5}"#,
        ),
        ("send-minimal", 6, r#"{"path":"a.bin","to":"all"}"#),
        ("window", 7, "22:00-02:00-05:00"),
        ("priority", 7, "bulk"),
    ];
    for (name, which, body) in bodies {
        let mut b = vec![which];
        b.extend_from_slice(body.as_bytes());
        v.push(("admin_json", name.into(), b));
    }
}

fn replica_frame(v: &mut Vec<Seed>) {
    use prost::Message;
    use tiandi_controller::replica::wire::{self, Change, FileRec, Item, Msg, ReportRec, TreeOp};
    let item = |c: Change| Item { change: Some(c) }.encode_to_vec();
    let tree = item(Change::Tree(TreeOp {
        tree: "sites".into(),
        key: b"gd-002".to_vec(),
        value: b"{\"site_id\":\"gd-002\"}".to_vec(),
        remove: false,
    }));
    let report = item(Change::Report(ReportRec {
        site: "gd-002".into(),
        report: sample_report(7).encode_to_vec(),
    }));
    let file = item(Change::File(FileRec {
        name: "admin.token".into(),
        data: b"0123456789abcdef0123456789abcdef".to_vec(),
        mode: 0o600,
        remove: false,
    }));
    let g = wire::genesis(42);
    let h1 = wire::chain(&g, 1, &tree);
    let msgs = [
        (
            "follow",
            Msg::Follow(wire::Follow {
                version: wire::VERSION,
                run: 42,
                next_seq: 2,
                hash: h1.to_vec(),
                epoch: 1,
                epoch_only: false,
            }),
        ),
        (
            "start",
            Msg::Start(wire::Start {
                run: 42,
                epoch: 1,
                snapshot: true,
                seq: 1,
                hash: g.to_vec(),
                primary: String::new(),
            }),
        ),
        ("item-tree", Msg::Item(tree.clone())),
        ("item-file", Msg::Item(file)),
        (
            "rec-report",
            Msg::Rec(wire::Rec {
                seq: 2,
                hash: wire::chain(&h1, 2, &report).to_vec(),
                at_ms: 1_796_540_000_000,
                item: report,
            }),
        ),
        (
            "snap-end",
            Msg::SnapEnd(wire::SnapEnd {
                items: 1,
                digest: blake3::hash(&tree).as_bytes().to_vec(),
            }),
        ),
        ("beat", Msg::Beat(wire::Beat { tip: 2, at_ms: 1 })),
        ("applied", Msg::Applied(wire::Applied { seq: 2 })),
        (
            "refused",
            Msg::Refused(wire::Refused {
                reason: "superseded".into(),
                epoch: 2,
            }),
        ),
    ];
    for (name, m) in msgs {
        v.push(("replica_frame", name.into(), wire::encode(m)[4..].to_vec()));
    }
}
