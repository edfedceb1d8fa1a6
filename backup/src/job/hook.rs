//! A job's hooks: programs run before and after a backup, without a shell, in a process
//! group of their own that a timeout kills.

use super::*;

/// What the last bytes of a stream were, read by a thread of its own.
pub(super) struct Tail {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Receiver<()>,
}

impl Tail {
    fn start(r: Option<impl Read + Send + 'static>) -> Tail {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = channel();
        if let Some(mut r) = r {
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = r.read(&mut chunk) {
                    let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
                    b.extend_from_slice(&chunk[..n]);
                    // Bounded however much the hook writes.
                    if b.len() > 2 * HOOK_TAIL {
                        let cut = b.len() - HOOK_TAIL;
                        b.drain(..cut);
                    }
                }
                let _ = tx.send(());
            });
        }
        Tail { buf, done }
    }

    /// The last [`HOOK_TAIL`] bytes, as text. Waits a little for the end of the stream: a
    /// process the hook left behind may hold it open for ever, and then we take what there is.
    fn finish(self, wait: Duration) -> String {
        let _ = self.done.recv_timeout(wait);
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let tail = &b[b.len().saturating_sub(HOOK_TAIL)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }
}

/// A hook that failed: what happened, and the end of what it wrote.
#[derive(Debug)]
pub(super) struct HookFailure {
    pub(super) program: String,
    pub(super) what: String,
    pub(super) output: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.program, self.what)?;
        if !self.output.is_empty() {
            write!(f, ": {}", self.output)?;
        }
        Ok(())
    }
}

pub(super) fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => format!("ended: {s}"),
    }
}

/// Whether process `pid`, our child, has ended, without reaping it: while it is unreaped its
/// ID (and so its process group's) cannot be given to another process.
pub(super) fn ended_unreaped(pid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive))
}

/// Runs a hook: `argv[0]` (an absolute path) with the rest as arguments, no shell, standard
/// input from /dev/null, in a process group of its own, with `env` added to the environment.
/// Past `timeout` the whole group gets SIGTERM and, a second later, SIGKILL.
///
/// The error says what happened: `/path timed out after 600 s`, `/path exited with status 3:
/// <the last 2 KiB of its stderr>`.
pub fn run_hook(argv: &[String], timeout: Duration, env: &[(&str, &str)]) -> Result<(), String> {
    hook(argv, timeout, env).map_err(|f| f.to_string())
}

pub(super) fn hook(
    argv: &[String],
    timeout: Duration,
    env: &[(&str, &str)],
) -> Result<(), HookFailure> {
    let program = argv
        .first()
        .map_or("(no program)", |p| p.as_str())
        .to_string();
    let fail = |what: String, output: String| HookFailure {
        program: program.clone(),
        what,
        output,
    };
    check_argv(argv).map_err(|e| fail(e, String::new()))?;
    let mut child = Command::new(&program)
        .args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}"), String::new()))?;
    let out = Tail::start(child.stdout.take());
    let err = Tail::start(child.stderr.take());
    let output = |out: Tail, err: Tail, wait| {
        let (o, e) = (out.finish(wait), err.finish(wait));
        if e.is_empty() { o } else { e }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let o = output(out, err, Duration::from_secs(1));
                return Err(fail(describe_status(status), o));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(nap.min(deadline.saturating_duration_since(Instant::now())));
                nap = (nap * 2).min(Duration::from_millis(100));
            }
            Ok(None) => break,
            Err(e) => {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = child.wait();
                return Err(fail(format!("could not be waited for: {e}"), String::new()));
            }
        }
    }
    // Timed out. The group's ID is the child's, which is not reaped yet: both stay ours.
    let _ = killpg(pid, Signal::SIGTERM);
    let grace = Instant::now() + KILL_GRACE;
    while !ended_unreaped(pid) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever is left of the group (the leader, or what it started) goes now.
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = child.wait();
    let o = output(out, err, Duration::from_millis(200));
    Err(fail(format!("timed out after {} s", timeout.as_secs()), o))
}
