//! Transfers over real QUIC on loopback: whole, resumed after a broken connection, a corrupt
//! chunk, a source that changes, names that would leave the inbox, a resume told what the
//! inbox already acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tiandi_link::pki::{CONTROLLER_NAME, Ca, site_key_and_csr};
use tiandi_link::tls::{CertPolicy, Rejection};
use tiandi_link::{LinkProfile, SiteIdentity};
use tiandi_transfer::send::Progress;
use tiandi_transfer::transfer_wire::{self, Frame};
use tiandi_transfer::{
    Bitmap, Inbox, Manifest, SendOptions, SendOutcome, TransferError, send_file,
};

#[derive(Debug)]
struct AnySite;
impl CertPolicy for AnySite {
    fn check(&self, _id: &SiteIdentity) -> Result<(), Rejection> {
        Ok(())
    }
}

/// A QUIC connection pair on loopback: (sender side, receiver side).
async fn pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
    let ca = Ca::generate("t").unwrap();
    let (chain, key) = ca.issue_controller().unwrap();
    let stls = tiandi_link::tls::server_tls(chain, key, ca.cert_der(), Arc::new(AnySite)).unwrap();
    let (site_key, csr) = site_key_and_csr("s1").unwrap();
    let issued = ca
        .sign_site(&csr, "s1", "BJ", Duration::from_secs(3600))
        .unwrap();
    let ctls =
        tiandi_link::tls::site_client_tls(ca.cert_pem(), &issued.cert_pem, &site_key).unwrap();
    let server = tiandi_link::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        stls,
        LinkProfile::Terrestrial.transport(),
        b"reset",
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let client = tiandi_link::client_endpoint(addr).unwrap();
    let cfg = tiandi_link::client_config(ctls, LinkProfile::Terrestrial.transport()).unwrap();
    let accept = tokio::spawn(async move {
        let c = server.accept().await.unwrap().await.unwrap();
        (server, c)
    });
    let cconn = client
        .connect_with(cfg, addr, CONTROLLER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (server, sconn) = accept.await.unwrap();
    std::mem::forget(client);
    (server, sconn, cconn)
}

fn inbox(dir: &Path) -> Arc<Inbox> {
    let db = sled::Config::new().temporary(true).open().unwrap();
    Inbox::new(&dir.join("in"), db.open_tree("inbox").unwrap(), "s1", None).unwrap()
}

/// Serves every incoming transfer on `conn`, as agents and the controller do.
fn serve(conn: quinn::Connection, inbox: Arc<Inbox>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(tiandi_transfer::inbox::accept_loop(
        inbox,
        conn,
        None,
        tokio_util::sync::CancellationToken::new(),
    ))
}

fn file(dir: &Path, name: &str, len: usize, seed: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// Sends one chunk on a stream of its own, as the sender does.
async fn send_chunk(conn: &quinn::Connection, m: &Manifest, i: u32, data: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&transfer_wire::chunk_header(&m.file_hash, i))
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
    s.finish().unwrap();
}

fn no_pause() -> bool {
    false
}

/// What nearly every test starts from: a source file in a temporary directory, its manifest,
/// an inbox in `<dir>/in`, and a loopback connection whose receiving end that inbox serves.
struct Setup {
    dir: tempfile::TempDir,
    src: PathBuf,
    m: Manifest,
    ib: Arc<Inbox>,
    /// The server endpoint: kept so the connection lives.
    _ep: quinn::Endpoint,
    /// The sender's side.
    sconn: quinn::Connection,
    /// The receiver's side (the inbox serves it; closing it cuts the link).
    cconn: quinn::Connection,
    /// The inbox's accept loop on `cconn`.
    served: tokio::task::JoinHandle<()>,
}

async fn setup(name: &str, len: usize, seed: u8) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), name, len, seed);
    let m = Manifest::of_file(&src).unwrap();
    let ib = inbox(dir.path());
    let (_ep, sconn, cconn) = pair().await;
    let served = serve(cconn.clone(), ib.clone());
    Setup {
        dir,
        src,
        m,
        ib,
        _ep,
        sconn,
        cconn,
        served,
    }
}

type Writer =
    tokio_util::codec::FramedWrite<quinn::SendStream, tokio_util::codec::LengthDelimitedCodec>;
type Reader =
    tokio_util::codec::FramedRead<quinn::RecvStream, tokio_util::codec::LengthDelimitedCodec>;

/// A control stream of a hand-written sender.
async fn control(conn: &quinn::Connection) -> (Writer, Reader) {
    let (send, recv) = conn.open_bi().await.unwrap();
    (
        tokio_util::codec::FramedWrite::new(send, transfer_wire::codec()),
        tokio_util::codec::FramedRead::new(recv, transfer_wire::codec()),
    )
}

/// The receiver's next frame.
async fn frame(r: &mut Reader) -> Frame {
    Frame::decode(r.next().await.unwrap().unwrap().freeze()).unwrap()
}

/// Chunk `i` of `data` as the manifest cuts it.
fn chunk<'a>(m: &Manifest, data: &'a [u8], i: u32) -> &'a [u8] {
    let s = m.offset(i) as usize;
    &data[s..s + m.chunk_len(i)]
}

/// `send_file` with default options and no pause.
async fn send_default(
    conn: &quinn::Connection,
    src: &Path,
    m: &Manifest,
    progress: &Arc<Progress>,
) -> Result<SendOutcome, TransferError> {
    send_file(conn, src, m, &SendOptions::default(), progress, &no_pause).await
}

/// Sends `src` until a third of it is acknowledged, then cuts the connection (`cconn`, the
/// receiver's side); returns what the sender saw.
async fn send_cut_at_a_third(
    sconn: &quinn::Connection,
    cconn: quinn::Connection,
    src: &Path,
    m: &Manifest,
) -> Arc<Progress> {
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let third = m.size / 3;
    let breaker = tokio::spawn(async move {
        while p.acked_bytes.load(std::sync::atomic::Ordering::Relaxed) < third {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cconn.close(0u32.into(), b"link cut");
    });
    let opts = SendOptions {
        rate_limit_bps: Some(200_000_000),
        ..SendOptions::default()
    };
    let err = send_file(sconn, src, m, &opts, &progress, &no_pause)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    breaker.await.unwrap();
    progress
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_arrives_whole_and_a_second_offer_gets_the_receipt() {
    let t = setup("data.bin", 3 * 1024 * 1024 + 17, 1).await;
    let (dir, src, m, sconn) = (&t.dir, &t.src, &t.m, &t.sconn);
    let progress = Arc::new(Progress::default());
    let out = send_default(sconn, src, m, &progress).await.unwrap();
    let SendOutcome::Delivered(receipt) = out else {
        panic!("not delivered")
    };
    assert_eq!(receipt.file_hash, m.id_hex());
    let got = std::fs::read(dir.path().join("in/data.bin")).unwrap();
    assert_eq!(got, std::fs::read(src).unwrap());
    assert_eq!(
        progress
            .sent_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        m.size
    );
    // No part file is left; offering again sends nothing and returns the receipt.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("in"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let again = Arc::new(Progress::default());
    let out = send_default(sconn, src, m, &again).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    assert_eq!(
        again.sent_bytes.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_resumes_without_resending_acknowledged_chunks() {
    let t = setup("big.bin", 8 * 1024 * 1024, 2).await;
    let (dir, src, m, ib) = (&t.dir, &t.src, &t.m, &t.ib);
    let progress = send_cut_at_a_third(&t.sconn, t.cconn.clone(), src, m).await;
    let third = m.size / 3;
    assert!(
        !dir.path().join("in/big.bin").exists(),
        "no partial file at the destination"
    );
    let acked_before = progress
        .acked_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(acked_before >= third);
    // A new connection: the receiver says what it holds; only the rest is sent.
    let (_ep2, sconn2, cconn2) = pair().await;
    serve(cconn2, ib.clone());
    let p2 = Arc::new(Progress::default());
    let out = send_default(&sconn2, src, m, &p2).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    let resent = p2.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        resent <= m.size - acked_before,
        "sent {resent} after {acked_before} were acknowledged"
    );
    assert_eq!(
        std::fs::read(dir.path().join("in/big.bin")).unwrap(),
        std::fs::read(src).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_asked_for_again_and_garbage_is_refused() {
    let t = setup("c.bin", 600 * 1024, 3).await;
    let (dir, m, sconn) = (&t.dir, &t.m, &t.sconn);
    let data = std::fs::read(&t.src).unwrap();
    // A hand-written sender that flips a byte in chunk 1 the first time.
    let (mut w, mut r) = control(sconn).await;
    let offer = transfer_wire::Offer::new(m, "t1", "normal", "controller");
    w.send(Frame::Offer(offer).encode()).await.unwrap();
    assert!(matches!(frame(&mut r).await, Frame::Have(_)));
    for i in 0..m.chunk_count() {
        let mut c = chunk(m, &data, i).to_vec();
        if i == 1 {
            c[100] ^= 0x40;
        }
        send_chunk(sconn, m, i, &c).await;
    }
    let mut resend = None;
    while resend.is_none() {
        match frame(&mut r).await {
            Frame::Resend(x) => resend = Some(x.chunk),
            Frame::Acked(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(resend, Some(1));
    assert!(!dir.path().join("in/c.bin").exists());
    send_chunk(sconn, m, 1, chunk(m, &data, 1)).await;
    loop {
        match frame(&mut r).await {
            Frame::Done(receipt) => {
                assert_eq!(receipt.file_hash, m.id_hex());
                break;
            }
            Frame::Acked(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(std::fs::read(dir.path().join("in/c.bin")).unwrap(), data);

    // Garbage on a new stream: a clear refusal, and the connection goes on serving.
    let (mut w, mut r) = control(sconn).await;
    w.send(Bytes::from_static(&[1, 0xff, 0xff, 0xff]))
        .await
        .unwrap();
    match frame(&mut r).await {
        Frame::Failed(f) => assert_eq!(f.code, transfer_wire::codes::PROTOCOL, "{}", f.message),
        other => panic!("unexpected {other:?}"),
    }
    // A name that tries to escape the inbox.
    let (mut w, mut r) = control(sconn).await;
    let mut evil = transfer_wire::Offer::new(m, "t2", "normal", "controller");
    evil.name = "../../etc/cron.d/x".into();
    w.send(Frame::Offer(evil).encode()).await.unwrap();
    match frame(&mut r).await {
        Frame::Failed(f) => assert!(f.message.contains("file name"), "{}", f.message),
        other => panic!("unexpected {other:?}"),
    }
    t.served.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_changes_fails_clearly_and_leaves_no_file() {
    let t = setup("log.txt", 2 * 1024 * 1024, 4).await;
    let (dir, src, m) = (&t.dir, &t.src, &t.m);
    // Someone appends to it after it was queued.
    let mut data = std::fs::read(src).unwrap();
    data[1_500_000] ^= 1;
    std::fs::write(src, &data).unwrap();
    let err = send_default(&t.sconn, src, m, &Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::SourceChanged(_)), "{err}");
    assert!(err.to_string().contains("changed while it was being sent"));
    assert!(!err.is_transient());
    assert!(!dir.path().join("in/log.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_offer_to_a_receiver_that_lost_its_state_sends_the_manifest_again() {
    let t = setup("m.bin", 1_000_000, 9).await;
    let (dir, src, m, sconn) = (&t.dir, &t.src, &t.m, &t.sconn);
    // The sender believes this is a second attempt: it offers without the chunk hashes.
    let progress = Arc::new(Progress::default());
    progress
        .attempts
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let out = send_default(sconn, src, m, &progress).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    assert_eq!(
        std::fs::read(dir.path().join("in/m.bin")).unwrap(),
        std::fs::read(src).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_cut_off_half_way_is_completed_with_only_its_missing_part() {
    let t = setup("p.bin", 3 * 32 * 1024 - 100, 4).await;
    let (dir, src, m, ib, sconn) = (&t.dir, &t.src, &t.m, &t.ib, &t.sconn);
    let data = std::fs::read(src).unwrap();
    // A hand-written sender: chunk 0 whole, then half of chunk 1, then the link goes.
    let (mut w, mut r) = control(sconn).await;
    w.send(Frame::Offer(transfer_wire::Offer::new(m, "t1", "normal", "controller")).encode())
        .await
        .unwrap();
    assert!(matches!(frame(&mut r).await, Frame::Have(_)));
    let half = m.chunk_len(1) / 2;
    for (i, upto) in [(0u32, m.chunk_len(0)), (1, half)] {
        let mut s = sconn.open_uni().await.unwrap();
        s.write_all(&transfer_wire::chunk_header(&m.file_hash, i))
            .await
            .unwrap();
        let at = m.offset(i) as usize;
        s.write_all(&data[at..at + upto]).await.unwrap();
        if i == 0 {
            s.finish().unwrap();
        }
        std::mem::forget(s); // chunk 1 stays open: the connection breaks under it
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sconn.close(0u32.into(), b"link cut");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Next connection: the receiver holds chunk 0 and half of chunk 1; the sender sends the
    // other half of chunk 1 as a piece, and chunk 2.
    let (_ep2, sconn2, cconn2) = pair().await;
    serve(cconn2, ib.clone());
    let p2 = Arc::new(Progress::default());
    p2.attempts.store(1, std::sync::atomic::Ordering::Relaxed); // a resumed transfer
    let out = send_default(&sconn2, src, m, &p2).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)), "{out:?}");
    let sent = p2.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        sent as usize,
        (m.chunk_len(1) - half) + m.chunk_len(2),
        "only the missing half and the last chunk go again"
    );
    assert_eq!(std::fs::read(dir.path().join("in/p.bin")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_never_exceeded() {
    let t = setup("r.bin", 1024 * 1024, 5).await;
    let (src, m, sconn) = (&t.src, &t.m, &t.sconn);
    let opts = SendOptions {
        rate_limit_bps: Some(4_000_000),
        ..SendOptions::default()
    };
    let t = std::time::Instant::now();
    let out = send_file(
        sconn,
        src,
        m,
        &opts,
        &Arc::new(Progress::default()),
        &no_pause,
    )
    .await
    .unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    // On loopback it would take milliseconds; at 4 Mbit/s the chunks after the first need
    // (1 MiB - 32 KiB) × 8 / 4e6 ≈ 2.03 s. (A lower bound: a slow machine cannot break it.)
    let floor = (m.size - u64::from(m.chunk_size)) as f64 * 8.0 / 4e6;
    assert!(
        t.elapsed().as_secs_f64() >= floor * 0.98,
        "{:?} for {} bytes at 4 Mbit/s",
        t.elapsed(),
        m.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_receipts_are_forgotten_and_abandoned_part_files_deleted() {
    use tiandi_transfer::inbox::{Expired, KEEP_ABANDONED, KEEP_COMPLETE};
    let t = setup("whole.bin", 700 * 1024, 4).await;
    let (dir, whole, mw, ib, sconn) = (&t.dir, &t.src, &t.m, &t.ib, &t.sconn);
    let cut = file(dir.path(), "cut.bin", 8 * 1024 * 1024, 5);
    let mc = Manifest::of_file(&cut).unwrap();
    let progress = Arc::new(Progress::default());
    let out = send_default(sconn, whole, mw, &progress).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    // The second one breaks off a third of the way: its sender never comes back.
    send_cut_at_a_third(sconn, t.cconn.clone(), &cut, &mc).await;
    let part = ib.get(&mc.id_hex()).unwrap().unwrap().part;
    assert!(part.exists());
    let part_len = std::fs::metadata(&part).unwrap().len();
    let now = tiandi_transfer::now_ms();

    // Nothing is old yet.
    let e = ib.expire(now, KEEP_COMPLETE, KEEP_ABANDONED).unwrap();
    assert_eq!(e, Expired::default());
    assert_eq!(ib.list().unwrap().len(), 2);

    // Fifteen days on: the abandoned transfer's part file goes; the receipt stays.
    let day = 86_400_000;
    let later = now + 15 * day;
    let mut e = Expired::default();
    for _ in 0..100 {
        e = ib.expire(later, KEEP_COMPLETE, KEEP_ABANDONED).unwrap();
        if e.abandoned == 1 {
            break;
        }
        // Left alone while its stream task still holds it (it ends when it notices the cut).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        e,
        Expired {
            complete: 0,
            abandoned: 1,
            bytes_freed: part_len
        }
    );
    assert!(!part.exists(), "the abandoned part file is deleted");
    assert!(ib.get(&mc.id_hex()).unwrap().is_none());
    assert!(ib.get(&mw.id_hex()).unwrap().is_some());

    // Thirty-one days on: the complete transfer is forgotten, its file stays.
    let e = ib
        .expire(now + 31 * day, KEEP_COMPLETE, KEEP_ABANDONED)
        .unwrap();
    assert_eq!(e.complete, 1);
    assert!(ib.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read(dir.path().join("in/whole.bin")).unwrap(),
        std::fs::read(whole).unwrap()
    );

    // The abandoned file offered again starts afresh and arrives whole.
    let (_ep2, sconn2, cconn2) = pair().await;
    serve(cconn2, ib.clone());
    let p2 = Arc::new(Progress::default());
    let out = send_default(&sconn2, &cut, &mc, &p2).await.unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    // All of it was sent again: the receiver had nothing of it any more.
    assert!(p2.sent_bytes.load(std::sync::atomic::Ordering::Relaxed) >= mc.size);
    assert_eq!(
        std::fs::read(dir.path().join("in/cut.bin")).unwrap(),
        std::fs::read(&cut).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_being_received_is_never_expired() {
    use tiandi_transfer::inbox::{KEEP_ABANDONED, KEEP_COMPLETE};
    let t = setup("slow.bin", 1024 * 1024, 6).await;
    let (dir, src, m, ib, sconn) = (&t.dir, &t.src, &t.m, &t.ib, &t.sconn);
    let progress = Arc::new(Progress::default());
    let opts = SendOptions {
        rate_limit_bps: Some(2_000_000),
        ..SendOptions::default()
    };
    let send = {
        let (sconn, src, m, progress) = (sconn.clone(), src.clone(), m.clone(), progress.clone());
        tokio::spawn(async move { send_file(&sconn, &src, &m, &opts, &progress, &no_pause).await })
    };
    while progress
        .acked_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // However old its clock says it is, a transfer whose stream runs is left alone.
    let far = tiandi_transfer::now_ms() + 365 * 86_400_000;
    let e = ib.expire(far, KEEP_COMPLETE, KEEP_ABANDONED).unwrap();
    assert_eq!((e.abandoned, e.complete), (0, 0));
    assert!(!send.is_finished(), "the transfer ended before the check");
    let out = send.await.unwrap().unwrap();
    assert!(matches!(out, SendOutcome::Delivered(_)));
    assert_eq!(
        std::fs::read(dir.path().join("in/slow.bin")).unwrap(),
        std::fs::read(src).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_offer_is_told_what_was_acknowledged_and_held_chunks_are_not_taken_again() {
    let t = setup("h.bin", 10 * 32 * 1024 + 5, 7).await;
    let (dir, m, sconn) = (&t.dir, &t.m, &t.sconn);
    let data = std::fs::read(&t.src).unwrap();
    let offer =
        || Frame::Offer(transfer_wire::Offer::new(m, "t1", "normal", "controller")).encode();
    // A hand-written sender sends chunks 0 and 2, waits until both are acknowledged, then
    // stops.
    let (mut w, mut r) = control(sconn).await;
    w.send(offer()).await.unwrap();
    match frame(&mut r).await {
        Frame::Have(h) => assert!(h.verified.iter().all(|b| *b == 0), "nothing held yet"),
        other => panic!("unexpected {other:?}"),
    }
    for i in [0, 2] {
        send_chunk(sconn, m, i, chunk(m, &data, i)).await;
    }
    let mut acked = Vec::new();
    while acked.len() < 2 {
        match frame(&mut r).await {
            Frame::Acked(a) => acked.extend(a.chunks),
            other => panic!("unexpected {other:?}"),
        }
    }
    acked.sort_unstable();
    assert_eq!(acked, [0, 2]);
    w.get_mut().finish().unwrap();
    drop((w, r));

    // Offered again: the Have lists exactly the acknowledged chunks.
    let (mut w, mut r) = control(sconn).await;
    w.send(offer()).await.unwrap();
    let have = match frame(&mut r).await {
        Frame::Have(h) => Bitmap::from_bytes(&h.verified, m.chunk_count()),
        other => panic!("unexpected {other:?}"),
    };
    let held: Vec<u32> = (0..m.chunk_count()).filter(|i| have.get(*i)).collect();
    assert_eq!(held, [0, 2]);
    // A chunk it holds is not taken again (garbage in its place is not even checked), and
    // the rest completes the file.
    send_chunk(sconn, m, 0, &vec![0xAA; m.chunk_len(0)]).await;
    for i in have.missing().collect::<Vec<_>>() {
        send_chunk(sconn, m, i, chunk(m, &data, i)).await;
    }
    loop {
        match frame(&mut r).await {
            Frame::Done(receipt) => {
                assert_eq!(receipt.file_hash, m.id_hex());
                break;
            }
            Frame::Acked(a) => assert!(
                !a.chunks.contains(&0) && !a.chunks.contains(&2),
                "acknowledged again: {:?}",
                a.chunks
            ),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(std::fs::read(dir.path().join("in/h.bin")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_would_leave_the_inbox_directory_are_refused() {
    let t = setup("n.bin", 40 * 1024, 8).await;
    let (dir, m, sconn) = (&t.dir, &t.m, &t.sconn);
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = names(dir.path());
    for name in [
        "../x",
        "../../etc/cron.d/x",
        "/etc/passwd",
        "sub/x",
        "sub\\x",
        "..",
        ".",
        "",
        ".hidden",
        "x\0y",
        "x\ny",
        &"y".repeat(201),
        &"y".repeat(256),
    ] {
        let (mut w, mut r) = control(sconn).await;
        let mut offer = transfer_wire::Offer::new(m, "t", "normal", "controller");
        offer.name = name.into();
        w.send(Frame::Offer(offer).encode()).await.unwrap();
        match frame(&mut r).await {
            Frame::Failed(f) => {
                assert_eq!(
                    f.code,
                    transfer_wire::codes::BAD_NAME,
                    "{name:?}: {}",
                    f.message
                );
                assert!(f.message.contains("file name"), "{name:?}: {}", f.message);
            }
            other => panic!("{name:?}: unexpected {other:?}"),
        }
    }
    // Nothing was created: not beside the inbox, not in it, and no state kept.
    assert_eq!(before, names(dir.path()));
    assert_eq!(std::fs::read_dir(dir.path().join("in")).unwrap().count(), 0);
    assert!(t.ib.list().unwrap().is_empty());
}

/// A receiver serving `conn` as the controller serves a site's: the peer named `site`.
fn serve_peer(
    conn: quinn::Connection,
    inbox: Arc<Inbox>,
    site: &str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(tiandi_transfer::inbox::accept_loop(
        inbox,
        conn,
        Some(site.to_string()),
        tokio_util::sync::CancellationToken::new(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_peers_uploads_are_its_own_and_receipts_name_paths_inside_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let src = file(dir.path(), "a.bin", 6 * 32 * 1024 + 9, 3);
    let data = std::fs::read(&src).unwrap();
    let m = Manifest::of_file(&src).unwrap();
    let ib = inbox(dir.path());
    let (_ea, a_send, a_recv) = pair().await;
    let (_eb, b_send, b_recv) = pair().await;
    serve_peer(a_recv, ib.clone(), "site-a");
    serve_peer(b_recv, ib.clone(), "site-b");
    let offer =
        |origin: &str| Frame::Offer(transfer_wire::Offer::new(&m, "t", "normal", origin)).encode();

    // A sends half of its file and stops (a cut transfer).
    let (mut w, mut r) = control(&a_send).await;
    w.send(offer("site-a")).await.unwrap();
    assert!(matches!(frame(&mut r).await, Frame::Have(_)));
    for i in 0..3 {
        send_chunk(&a_send, &m, i, chunk(&m, &data, i)).await;
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match frame(&mut r).await {
            Frame::Acked(a) => acked.extend(a.chunks),
            other => panic!("unexpected {other:?}"),
        }
    }
    w.get_mut().finish().unwrap();
    drop((w, r));

    // A short offer (no chunk hashes) from B finds no transfer of B's own (A's is not B's).
    let (mut w2, mut r2) = control(&b_send).await;
    let short = transfer_wire::Offer::new(&m, "t", "normal", "site-a").short();
    w2.send(Frame::Offer(short).encode()).await.unwrap();
    match frame(&mut r2).await {
        Frame::Failed(f) => assert_eq!(f.code, transfer_wire::codes::NEED_MANIFEST),
        other => panic!("unexpected {other:?}"),
    }
    drop((w2, r2));
    // B offers the same hash, claiming to be A: it learns nothing of A's chunks (an empty
    // Have, of a transfer of its own), and its chunks, garbage or not, never reach A's.
    let (mut w, mut r) = control(&b_send).await;
    w.send(offer("site-a")).await.unwrap();
    match frame(&mut r).await {
        Frame::Have(h) => assert!(h.verified.iter().all(|b| *b == 0), "B saw A's chunks"),
        other => panic!("unexpected {other:?}"),
    }
    for i in 3..6 {
        send_chunk(&b_send, &m, i, &vec![0x55; m.chunk_len(i)]).await;
    }
    w.get_mut().finish().unwrap();
    drop((w, r));

    // A resumes from its own Have and completes; the receipt names the file inside the inbox.
    let (mut w, mut r) = control(&a_send).await;
    w.send(Frame::Offer(transfer_wire::Offer::new(&m, "t", "normal", "site-a").short()).encode())
        .await
        .unwrap();
    let have = match frame(&mut r).await {
        Frame::Have(h) => Bitmap::from_bytes(&h.verified, m.chunk_count()),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(have.count(), 3, "A's own chunks");
    for i in have.missing().collect::<Vec<_>>() {
        send_chunk(&a_send, &m, i, chunk(&m, &data, i)).await;
    }
    let receipt = loop {
        match frame(&mut r).await {
            Frame::Done(receipt) => break receipt,
            Frame::Acked(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(receipt.path, "site-a/a.bin");
    assert_eq!(
        std::fs::read(dir.path().join("in/site-a/a.bin")).unwrap(),
        data
    );
    assert!(!dir.path().join("in/site-b/a.bin").exists());

    // B offering the whole file's hash again gets no receipt of A's: a Have of its own.
    let (mut w, mut r) = control(&b_send).await;
    w.send(offer("site-b")).await.unwrap();
    match frame(&mut r).await {
        Frame::Have(h) => assert!(h.verified.iter().all(|b| *b == 0)),
        other => panic!("B learnt of A's file: {other:?}"),
    }
    drop((w, r));
    let states = ib.list().unwrap();
    let mut origins: Vec<_> = states.iter().map(|s| s.origin.as_str()).collect();
    origins.sort_unstable();
    assert_eq!(origins, ["site-a", "site-b"]);
    assert!(
        ib.get_from(Some("site-a"), &m.id_hex())
            .unwrap()
            .unwrap()
            .receipt
            .is_some()
    );
    assert!(
        ib.get_from(Some("site-b"), &m.id_hex())
            .unwrap()
            .unwrap()
            .receipt
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_for_no_offer_of_its_peer_is_not_read() {
    let t = setup("u.bin", 3 * 32 * 1024, 5).await;
    // No offer: the chunk stream is stopped, unread (3 MB is more than the stream's
    // flow-control window: it cannot all be sent unless the receiver reads), once the
    // receiver has waited for an offer.
    let mut s = t.sconn.open_uni().await.unwrap();
    s.write_all(&transfer_wire::chunk_header(&t.m.file_hash, 0))
        .await
        .unwrap();
    let body = vec![7u8; 3 * 1024 * 1024];
    let written = tokio::time::timeout(Duration::from_secs(20), s.write_all(&body))
        .await
        .expect("stopped within the route wait");
    match written {
        Err(quinn::WriteError::Stopped(code)) => assert_eq!(
            code,
            quinn::VarInt::from_u32(transfer_wire::codes::UNKNOWN_TRANSFER)
        ),
        other => panic!("the receiver read a chunk of no transfer: {other:?}"),
    }
    assert!(t.ib.list().unwrap().is_empty());
}
