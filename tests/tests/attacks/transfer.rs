//! Attacks: transfer (issue 15, findings 1, 7 and 8 on the transfer side). An enrolled site
//! speaks the transfer protocol by hand over its real QUIC connection to the real controller
//! (its certificate from `tiandi-agent enroll`, the session from `tiandi_uplink`): it offers
//! another site's hash, hostile file names, and floods chunk streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiandi_link::LinkProfile;
use tiandi_tests::{AgentProc, ControllerProc, pattern, wait_for};
use tiandi_transfer::Manifest;
use tiandi_transfer::transfer_wire::{self, Frame, Offer};
use tiandi_uplink as uplink;

/// Refusal codes as the wire says them (literal: the same test runs against code that
/// predates the names).
const NEED_MANIFEST: u32 = 8;
const BAD_NAME: u32 = 9;

/// A control stream's two halves, framed by hand (4-byte length, then the frame).
type Writer = quinn::SendStream;
type Reader = quinn::RecvStream;

async fn put(w: &mut Writer, f: Frame) {
    let b = f.encode();
    w.write_all(&(b.len() as u32).to_be_bytes()).await.unwrap();
    w.write_all(&b).await.unwrap();
}

/// The next frame, or None when the stream ends or breaks.
async fn next(r: &mut Reader) -> Option<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len > transfer_wire::MAX_FRAME {
        return None;
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).await.ok()?;
    Frame::decode(bytes::Bytes::from(b)).ok()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Hands the test each controller connection the uplink opens.
struct Hook(tokio::sync::mpsc::UnboundedSender<quinn::Connection>);
impl uplink::SessionHook for Hook {
    fn on_session(
        self: Arc<Self>,
        conn: &quinn::Connection,
        _stop: tokio_util::sync::CancellationToken,
        _route: uplink::Route,
    ) {
        let _ = self.0.send(conn.clone());
    }
}

/// An enrolled site that speaks the transfer protocol by hand: its real certificate, its
/// real session (Hello, Welcome) through `tiandi_uplink`, then raw streams on the connection.
struct RawSite {
    conn: quinn::Connection,
    stop: tokio_util::sync::CancellationToken,
    _agent: AgentProc,
}

impl Drop for RawSite {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Enrolls `site` through the real binaries (blocking: outside the runtime).
fn enroll(ctl: &ControllerProc, dir: &Path, site: &str) -> AgentProc {
    ctl.new_site(dir, site, "GD", "interval_s = 1")
}

async fn connect(ctl_quic: std::net::SocketAddr, agent: AgentProc) -> RawSite {
    let id = uplink::identity::load(&agent.dir.join("data")).unwrap();
    let tls = tiandi_link::tls::site_client_tls(&id.ca_pem, &id.cert_pem, &id.key_pem).unwrap();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let spool =
        uplink::spool::Spool::open(db.open_tree("s").unwrap(), b"", 1 << 24, 100, false).unwrap();
    let shared = uplink::Shared::new(spool);
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(uplink::run(
        tiandi_link::client_endpoint(ctl_quic).unwrap(),
        uplink::UplinkConfig {
            controller: ctl_quic.to_string(),
            standby: Vec::new(),
            site_id: id.info.site_id.clone(),
            client: tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport()).unwrap(),
            interval_ms: 1000,
            connect_timeout: LinkProfile::Terrestrial.connect_timeout(),
            on_session: Some(Arc::new(Hook(tx))),
        },
        shared,
        stop.clone(),
    ));
    let conn = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a session within 20 s")
        .unwrap();
    RawSite {
        conn,
        stop,
        _agent: agent,
    }
}

/// The controller's next frame on a control stream (None: it ended the stream).
async fn frame(r: &mut Reader) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(20), next(r))
        .await
        .expect("an answer within 20 s")
}

async fn offer(conn: &quinn::Connection, o: Offer) -> (Writer, Reader, Option<Frame>) {
    let (mut w, mut r) = conn.open_bi().await.unwrap();
    put(&mut w, Frame::Offer(o)).await;
    let first = frame(&mut r).await;
    (w, r, first)
}

async fn send_chunk(conn: &quinn::Connection, m: &Manifest, i: u32, data: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&transfer_wire::chunk_header(&m.file_hash, i))
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
    let _ = s.finish();
}

fn chunk<'a>(m: &Manifest, data: &'a [u8], i: u32) -> &'a [u8] {
    let s = m.offset(i) as usize;
    &data[s..s + m.chunk_len(i)]
}

fn held(h: &transfer_wire::Have, m: &Manifest) -> u32 {
    transfer_wire::Bitmap::from_bytes(&h.verified, m.chunk_count()).count()
}

/// Reads acknowledgements until `n` chunks are acknowledged (or the receipt arrives).
async fn acked(r: &mut Reader, n: usize) -> Option<transfer_wire::Receipt> {
    let mut got = 0;
    while got < n {
        match frame(r).await {
            Some(Frame::Acked(a)) => got += a.chunks.len(),
            Some(Frame::Done(d)) => return Some(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    None
}

fn file(dir: &Path, name: &str, len: usize, seed: u32) -> (PathBuf, Vec<u8>, Manifest) {
    let p = dir.join(name);
    let data = pattern(len, seed);
    std::fs::write(&p, &data).unwrap();
    let m = Manifest::of_file(&p).unwrap();
    (p, data, m)
}

/// Every path under `dir`, relative to it, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn site_cannot_complete_another_sites_upload_by_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let a = enroll(&ctl, &tmp.path().join("gd-001"), "gd-001");
    let b = enroll(&ctl, &tmp.path().join("gd-002"), "gd-002");
    let c = enroll(&ctl, &tmp.path().join("gd-003"), "gd-003");
    let (_, data, m) = file(tmp.path(), "budget-2027.xlsx", 8 * 32 * 1024 + 100, 5);
    let inbox = ctl.dir.join("data/inbox");
    let rt = runtime();
    rt.block_on(async {
        let (a, b, c) = (
            connect(ctl.quic, a).await,
            connect(ctl.quic, b).await,
            connect(ctl.quic, c).await,
        );
        // A uploads half of its file, then its link is cut.
        let (mut w, mut r, first) = offer(&a.conn, Offer::new(&m, "a-1", "normal", "gd-001")).await;
        assert!(matches!(first, Some(Frame::Have(_))), "{first:?}");
        for i in 0..4 {
            send_chunk(&a.conn, &m, i, chunk(&m, &data, i)).await;
        }
        assert!(acked(&mut r, 4).await.is_none());
        w.finish().unwrap();
        drop((w, r));

        // B offers A's hash (and says it is A): it must not learn which chunks A holds.
        let (mut w, mut r, first) = offer(&b.conn, Offer::new(&m, "b-1", "normal", "gd-001")).await;
        match &first {
            Some(Frame::Have(h)) => assert_eq!(held(h, &m), 0, "B learnt A's chunks: {h:?}"),
            other => panic!("unexpected {other:?}"),
        }
        // B sends garbage for A's held chunks and real data for the rest: were its chunks
        // routed into A's transfer, A's file would be completed by B (and B handed A's receipt).
        for i in 0..4 {
            send_chunk(&b.conn, &m, i, &vec![0xEE; m.chunk_len(i)]).await;
        }
        for i in 4..m.chunk_count() {
            send_chunk(&b.conn, &m, i, chunk(&m, &data, i)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Whatever B gets, it is never a receipt naming A's file.
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(200), next(&mut r)).await
        {
            if let Frame::Done(d) = f {
                assert!(
                    !d.path.contains("gd-001"),
                    "B was handed A's receipt: {d:?}"
                );
            }
        }
        let _ = w.finish();
        drop((w, r));
        assert!(
            !inbox.join("gd-001/budget-2027.xlsx").exists(),
            "B completed A's upload"
        );

        // A resumes from its own Have (its four chunks, nothing of B's) and completes.
        let (mut w, mut r, first) =
            offer(&a.conn, Offer::new(&m, "a-1", "normal", "gd-001").short()).await;
        let h = match first {
            Some(Frame::Have(h)) => h,
            other => panic!("A's resume: {other:?}"),
        };
        let have = transfer_wire::Bitmap::from_bytes(&h.verified, m.chunk_count());
        assert_eq!(
            (0..m.chunk_count())
                .filter(|i| have.get(*i))
                .collect::<Vec<_>>(),
            [0, 1, 2, 3],
            "A's own chunks, and only those"
        );
        for i in have.missing().collect::<Vec<_>>() {
            send_chunk(&a.conn, &m, i, chunk(&m, &data, i)).await;
        }
        let receipt = acked(&mut r, usize::MAX).await.expect("A's receipt");
        assert_eq!(receipt.file_hash, m.id_hex());
        let _ = w.finish();
        drop((w, r));
        assert_eq!(
            std::fs::read(inbox.join("gd-001/budget-2027.xlsx")).unwrap(),
            data
        );

        // C, who never had the file, offers its hash: no receipt, no sign that it exists
        // (first without the chunk hashes, as a resume would: no transfer of C's is found).
        let (_w, _r, first) =
            offer(&c.conn, Offer::new(&m, "c-2", "normal", "gd-003").short()).await;
        match &first {
            Some(Frame::Failed(f)) => assert_eq!(f.code, NEED_MANIFEST, "{f:?}"),
            other => panic!("C's short offer found A's transfer: {other:?}"),
        }
        let (_w, _r, first) = offer(&c.conn, Offer::new(&m, "c-1", "normal", "gd-003")).await;
        match &first {
            Some(Frame::Have(h)) => assert_eq!(held(h, &m), 0, "C learnt of A's file"),
            other => panic!("C learnt of A's file: {other:?}"),
        }
    });
    // The controller's view: A's file, from A.
    let v = ctl.api("/api/transfers").unwrap();
    let from_a: Vec<_> = v["received"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["file"] == "budget-2027.xlsx" && r["receipt"].is_object())
        .map(|r| r["from"].as_str().unwrap().to_string())
        .collect();
    assert!(from_a.contains(&"gd-001".to_string()), "{v}");
}

#[test]
fn receipt_names_are_relative_to_the_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agent = ctl.new_site(&tmp.path().join("sc-001"), "sc-001", "SC", "interval_s = 1");
    agent.start();
    // Site → controller, through `tiandi-agent send`.
    let src = tmp.path().join("sc-001/survey.csv");
    std::fs::write(&src, pattern(300_000, 3)).unwrap();
    let out = agent.cli(&["send", src.to_str().unwrap(), "--wait", "60"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = ctl.api("/api/transfers").unwrap();
    let got = v["received"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == "survey.csv")
        .cloned()
        .unwrap();
    let path = got["receipt"]["path"].as_str().unwrap().to_string();
    assert_eq!(path, "sc-001/survey.csv", "{got}");
    // The site's own view of its receipt: the same relative name.
    let status =
        std::fs::read_to_string(tmp.path().join("sc-001/data/outgoing/status.json")).unwrap();
    assert!(
        !status.contains(ctl.dir.to_str().unwrap()),
        "the site learnt the controller's directories: {status}"
    );

    // Controller → site: the site's receipt names the file inside its inbox.
    let policy = tmp.path().join("ctl/policy.bin");
    std::fs::write(&policy, pattern(200_000, 4)).unwrap();
    let out = ctl.cli(&["send", policy.to_str().unwrap(), "--to", "site:sc-001"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = wait_for("the site's receipt", Duration::from_secs(60), || {
        let v = ctl.api("/api/transfers")?;
        v["transfers"]
            .as_array()?
            .iter()
            .find(|t| t["file"] == "policy.bin" && t["receipt"].is_object())
            .cloned()
    });
    assert_eq!(job["receipt"]["path"], "policy.bin", "{job}");
    agent.stop();
}

#[test]
fn upload_with_hostile_file_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let raw = enroll(&ctl, &tmp.path().join("gd-009"), "gd-009");
    let data_dir = ctl.dir.join("data");
    let (_, data, m) = file(tmp.path(), "ok.bin", 70_000, 9);
    let long201 = "n".repeat(201);
    let long256 = "n".repeat(256);
    let hostile = [
        "../x",
        "../../admin.token",
        ".bashrc",
        "a/b",
        "a\\b",
        "x\0y",
        "x\u{1b}[2J",
        long201.as_str(),
        long256.as_str(),
    ];
    let rt = runtime();
    let before: Vec<PathBuf> = tree(&data_dir)
        .into_iter()
        .filter(|p| !p.starts_with("db") && !p.starts_with("inbox"))
        .collect();
    rt.block_on(async {
        let s = connect(ctl.quic, raw).await;
        for name in hostile {
            let mut o = Offer::new(&m, "t", "normal", "gd-009");
            o.name = name.to_string();
            let (_w, _r, first) = offer(&s.conn, o).await;
            match first {
                Some(Frame::Failed(f)) => {
                    assert_eq!(f.code, BAD_NAME, "{name:?}: a clear refusal, not {f:?}");
                    assert!(f.message.contains("file name"), "{name:?}: {}", f.message);
                }
                other => panic!("{name:?} was not refused: {other:?}"),
            }
        }
        // A name to forward to is a site ID, and passes the same grammar.
        let mut o = Offer::new(&m, "t", "normal", "gd-009");
        o.forward_to = vec!["../../etc".into()];
        let (_w, _r, first) = offer(&s.conn, o).await;
        match first {
            Some(Frame::Failed(f)) => assert_eq!(f.code, BAD_NAME, "{f:?}"),
            other => panic!("a hostile forward destination was not refused: {other:?}"),
        }
        // The connection goes on: a good file on the same connection arrives.
        let (mut w, mut r, first) = offer(&s.conn, Offer::new(&m, "t", "normal", "gd-009")).await;
        assert!(matches!(first, Some(Frame::Have(_))), "{first:?}");
        for i in 0..m.chunk_count() {
            send_chunk(&s.conn, &m, i, chunk(&m, &data, i)).await;
        }
        assert!(acked(&mut r, usize::MAX).await.is_some());
        let _ = w.finish();
    });
    // Nothing outside the site's inbox directory, and in it only the good file.
    let after: Vec<PathBuf> = tree(&data_dir)
        .into_iter()
        .filter(|p| !p.starts_with("db") && !p.starts_with("inbox"))
        .collect();
    assert_eq!(before, after, "files appeared beside the inbox");
    assert_eq!(
        tree(&data_dir.join("inbox")),
        [PathBuf::from("gd-009"), PathBuf::from("gd-009/ok.bin")]
    );
    assert!(!tmp.path().join("x").exists() && !ctl.dir.join("x").exists());

    // Through `tiandi-agent send`: a hidden file and a name over 200 bytes are refused at the
    // site with the reason, and never reach the controller.
    let mut agent = ctl.new_site(&tmp.path().join("gd-010"), "gd-010", "GD", "interval_s = 1");
    agent.start();
    for name in [".bashrc", long201.as_str()] {
        let p = tmp.path().join("gd-010").join(name);
        std::fs::write(&p, b"export PATH=/tmp/evil:$PATH\n").unwrap();
        let out = agent.cli(&["send", p.to_str().unwrap(), "--wait", "20"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{name:?} was sent");
        assert!(err.contains("file name"), "{name:?}: {err}");
    }
    assert!(
        !data_dir.join("inbox/gd-010").exists() || tree(&data_dir.join("inbox/gd-010")).is_empty()
    );
    agent.stop();
}

/// The controller's process ID (its command line names its config file).
fn pid_of(config: &Path) -> u32 {
    let want = config.to_str().unwrap();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("tiandi-controller") && cmd.contains(want) {
            return pid;
        }
    }
    panic!("no controller process with {want}");
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// What the controller's peak RSS may grow by under the flood: the inbox holds at most
/// 32 MiB of chunks per connection (256 MiB for all together), and QUIC buffers at most a
/// connection's flow-control window unread; before the fix it read all 400 MiB sent here.
const FLOOD_GROWTH_LIMIT_MIB: u64 = 160;

#[test]
fn many_streams_and_large_chunks_do_not_exhaust_the_controller() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let hostile = enroll(&ctl, &tmp.path().join("gd-666"), "gd-666");
    let mut good = ctl.new_site(&tmp.path().join("gd-001"), "gd-001", "GD", "interval_s = 1");
    good.start();
    let pid = pid_of(&ctl.config);
    let base = proc_kib(pid, "VmHWM");
    // A manifest of 200 chunks of 2 MiB (400 MiB) with made-up hashes: valid as a manifest.
    const CHUNK: u32 = 2 * 1024 * 1024;
    const CHUNKS: u32 = 200;
    let m = Manifest {
        name: "flood.bin".into(),
        size: u64::from(CHUNK) * u64::from(CHUNKS),
        chunk_size: CHUNK,
        file_hash: [0x66; 32],
        chunks: (0..CHUNKS).map(|i| [i as u8; 32]).collect(),
    };
    let rt = runtime();
    let oversized = rt.block_on(async {
        let h = connect(ctl.quic, hostile).await;
        let (_w, _r, first) = offer(&h.conn, Offer::new(&m, "f", "bulk", "gd-666")).await;
        assert!(matches!(first, Some(Frame::Have(_))), "{first:?}");
        // An oversized chunk stream: more bytes than any chunk has.
        let oversized = async {
            let mut s = h.conn.open_uni().await.ok()?;
            s.write_all(&transfer_wire::chunk_header(&[0x66; 32], 0))
                .await
                .ok()?;
            let big = vec![1u8; 3 * CHUNK as usize];
            let r = tokio::time::timeout(Duration::from_secs(5), s.write_all(&big)).await;
            Some(matches!(r, Ok(Err(quinn::WriteError::Stopped(_)))))
        }
        .await;
        // Every chunk stream at once, each all but its last byte, never finished; and more
        // streams for transfers that do not exist.
        let junk = bytes::Bytes::from(vec![0x5A; CHUNK as usize - 1]);
        let mut tasks = Vec::new();
        for i in 0..CHUNKS + 100 {
            let (conn, junk, hash) = (h.conn.clone(), junk.clone(), m.file_hash);
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = conn.open_uni().await else {
                    return;
                };
                let hash = if i < CHUNKS { hash } else { [i as u8; 32] };
                let _ = s
                    .write_all(&transfer_wire::chunk_header(&hash, i % CHUNKS))
                    .await;
                let _ = s.write_all(&junk).await;
                // Held open: the stream never ends.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(s);
            }));
        }
        // Let the flood run.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let peak = proc_kib(pid, "VmHWM");
        h.conn.close(0u32.into(), b"done");
        for t in tasks {
            t.abort();
        }
        (peak, oversized)
    });
    let (peak, oversized) = oversized;
    let grew_mib = peak.saturating_sub(base) / 1024;
    assert!(
        grew_mib < FLOOD_GROWTH_LIMIT_MIB,
        "the controller's peak RSS grew by {grew_mib} MiB under one site's flood (limit {FLOOD_GROWTH_LIMIT_MIB} MiB; from {} MiB)",
        base / 1024
    );
    assert_eq!(
        oversized,
        Some(true),
        "a chunk stream longer than its chunk was not stopped"
    );
    // The controller still serves: the good site's file arrives.
    let src = tmp.path().join("gd-001/ok.csv");
    std::fs::write(&src, pattern(100_000, 1)).unwrap();
    let out = good.cli(&["send", src.to_str().unwrap(), "--wait", "15"]);
    assert!(
        out.status.success(),
        "another site could not send during the flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ctl.dir.join("data/inbox/gd-001/ok.csv").exists());
    good.stop();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// Leases on backup repositories (issue 17: no stale locks): a site takes the lease on its own
/// repository over its real connection; a second holder is refused with the first one named;
/// it cannot take another site's; the lease shows in `GET /api/backups` while held, and once
/// released the next holder takes it.
#[test]
fn a_site_leases_only_its_own_repositories_one_holder_at_a_time() {
    use tiandi_transfer::lease::{LeaseError, ask};
    use tiandi_transfer::transfer_wire::Lease;
    let tmp = tempfile::tempdir().unwrap();
    let jobs = r#"
[[backup_jobs]]
name = "gd-db"
site = "gd-001"
repo = "db"
paths = ["/nonexistent"]
password_file = "/nonexistent"
schedule = "daily 02:00+08:00"
"#;
    let ctl = ControllerProc::start_with(&tmp.path().join("ctl"), None, jobs);
    let agent = enroll(&ctl, &tmp.path().join("gd-001"), "gd-001");
    let rt = runtime();
    let site = rt.block_on(connect(ctl.quic, agent));
    let lease = |key: &str, holder: &str, release: bool| Lease {
        key: key.into(),
        holder: holder.into(),
        ttl_s: if release { 0 } else { 120 },
        release,
        ..Default::default()
    };
    let t = Duration::from_secs(10);
    let held = rt
        .block_on(ask(
            &site.conn,
            lease("gd-001/db", "gd-db/backup/1", false),
            t,
        ))
        .expect("the site's own repository");
    assert!(held.expires_ms > tiandi_link::clock::now_ms() + 100_000);
    let v = ctl.api("/api/backups").unwrap();
    assert_eq!(v["jobs"][0]["lease"]["holder"], "gd-db/backup/1", "{v}");
    match rt.block_on(ask(
        &site.conn,
        lease("gd-001/db", "gd-db/backup/2", false),
        t,
    )) {
        Err(LeaseError::Held(why)) => assert!(why.contains("gd-db/backup/1"), "{why}"),
        other => panic!("a second holder must be refused: {other:?}"),
    }
    match rt.block_on(ask(&site.conn, lease("gd-002/db", "x", false), t)) {
        Err(LeaseError::Unreachable(why)) => assert!(why.contains("only its own"), "{why}"),
        other => panic!("another site's lease must be refused: {other:?}"),
    }
    rt.block_on(ask(
        &site.conn,
        lease("gd-001/db", "gd-db/backup/1", true),
        t,
    ))
    .unwrap();
    assert!(ctl.api("/api/backups").unwrap()["jobs"][0]["lease"].is_null());
    rt.block_on(ask(
        &site.conn,
        lease("gd-001/db", "gd-db/backup/2", false),
        t,
    ))
    .expect("free again");
    drop(site);
}
