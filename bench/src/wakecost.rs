//! `wake-cost`: what the machine charges for the things a report costs besides our code — a
//! thread waking up, and a group commit made durable — measured as CPU time (user + system)
//! of this process per event. It explains the floor under `ingest`'s `cpu_us_per_report`:
//! each report wakes the controller at least twice (the report; the agent's ACK of its
//! acknowledgement) and shares a commit with the few others of its 15 ms window.
//!
//! - `sleep_wake_us`: a thread sleeping 5 ms and waking, per wake-up (a timer, as a tokio
//!   worker parked in `epoll_wait` with a timeout);
//! - `thread_wake_us`: two threads handing a token back and forth over a condition variable,
//!   per hand-over (a parked worker woken by another thread, as the committer wakes the
//!   session that acknowledges);
//! - `wal_commit_us`: one group commit of the controller's write-ahead log (three 400-byte
//!   records, `write` + `fdatasync`), 5 ms apart, its wake-up included;
//! - `sled_commit_us`: the same three records inserted into sled and `Db::flush` (what a
//!   commit was before the log), 5 ms apart.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
}

/// CPU seconds (user + system) of this process, threads that ended included, to the µs
/// (`/proc`'s figures come in 10 ms ticks).
fn cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

fn per_event(count: usize, f: impl FnOnce()) -> f64 {
    let c0 = cpu_s();
    f();
    (cpu_s() - c0) * 1e6 / count as f64
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let n = a.count.max(10);
    let gap = Duration::from_millis(5);

    let sleep_wake = per_event(n, || {
        for _ in 0..n {
            std::thread::sleep(gap);
        }
    });

    // Ping-pong: each hand-over wakes the other thread.
    let thread_wake = {
        let state = Arc::new((Mutex::new(0usize), Condvar::new()));
        let other = state.clone();
        let rounds = n;
        per_event(2 * rounds, move || {
            let t = std::thread::spawn(move || {
                let (m, cv) = &*other;
                let mut turn = m.lock().expect("lock");
                while *turn < 2 * rounds {
                    while *turn % 2 == 0 {
                        turn = cv.wait(turn).expect("lock");
                    }
                    *turn += 1;
                    cv.notify_one();
                }
            });
            let (m, cv) = &*state;
            let mut turn = m.lock().expect("lock");
            while *turn < 2 * rounds {
                *turn += 1;
                cv.notify_one();
                while *turn % 2 == 1 {
                    turn = cv.wait(turn).expect("lock");
                }
            }
            drop(turn);
            let _ = t.join();
        })
    };

    let dir = tempfile::Builder::new()
        .prefix("tiandi-wake-cost-")
        .tempdir()?;
    let record = vec![7u8; 400];
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("reports.wal"))?;
    let mut failed = None;
    let wal_commit = per_event(n, || {
        for _ in 0..n {
            std::thread::sleep(gap);
            let r = log
                .write_all(&[record.as_slice(); 3].concat())
                .and_then(|()| log.sync_data());
            if let Err(e) = r {
                failed = Some(e);
                return;
            }
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }

    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("history")?;
    let mut failed = None;
    let sled_commit = per_event(n, || {
        for i in 0..n as u64 {
            std::thread::sleep(gap);
            let r = (0..3u64)
                .try_for_each(|j| {
                    tree.insert((i * 3 + j).to_be_bytes(), record.as_slice())
                        .map(|_| ())
                })
                .and_then(|()| db.flush().map(|_| ()));
            if let Err(e) = r {
                failed = Some(e);
                return;
            }
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }

    println!(
        "wake-cost count={n} sleep_wake_us={sleep_wake:.1} thread_wake_us={thread_wake:.1} wal_commit_us={wal_commit:.1} sled_commit_us={sled_commit:.1}"
    );
    Ok(())
}
