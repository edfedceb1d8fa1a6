//! quinn on tokio, with longer turns for connection and endpoint drivers.
//!
//! quinn's connection driver hands the socket at most 20 datagrams per poll, then wakes itself
//! and goes to the back of tokio's run queue, to be fair to other tasks. A relay that writes
//! a 35 KB keyframe to 500 subscribers at once thus sends 20 packets to each of them, then the
//! last 5 to each: every subscriber's frame completes at the end of the whole burst. Given a
//! few turns in a row, each connection finishes its frame before the next one starts, and the
//! subscribers receive it one after another over the burst instead of all at its end (the
//! median subscriber waits half as long; the last one as long as before).
//!
//! [`Runtime`] is quinn's own `TokioRuntime` except for `spawn`: the future it drives (a
//! connection's or an endpoint's driver) is polled again at once, up to [`TURNS`] times, when
//! it woke itself during its poll; beyond that it yields as before. Wake-ups from elsewhere
//! (timers, sockets, streams written by other tasks) reach tokio's waker as they would.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Consecutive polls a driver may take when it asks to go on (quinn's budget per poll is 20
/// datagrams: 80 in a turn).
pub const TURNS: u32 = 4;

/// quinn's tokio runtime with longer driver turns (see the module documentation).
#[derive(Debug, Default)]
pub struct Runtime;

impl quinn::Runtime for Runtime {
    fn new_timer(&self, t: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(Turns::new(future, TURNS));
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }
}

const IDLE: u8 = 0;
const POLLING: u8 = 1;
/// Woken while being polled: poll again.
const WOKEN: u8 = 2;

/// The waker the inner future sees: while it is being polled a wake-up is only noted; at any
/// other time it goes to the task's own waker.
struct Relay {
    state: AtomicU8,
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => {
                if let Some(w) = self.task.lock().expect("waker lock poisoned").as_ref() {
                    w.wake_by_ref();
                }
            }
        }
    }
}

/// A future polled up to `turns` times in a row while it keeps waking itself.
pub struct Turns<F: ?Sized> {
    inner: Pin<Box<F>>,
    relay: Arc<Relay>,
    waker: Waker,
    turns: u32,
}

impl<F: Future<Output = ()> + ?Sized> Turns<F> {
    pub fn new(inner: Pin<Box<F>>, turns: u32) -> Self {
        let relay = Arc::new(Relay {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        Turns {
            inner,
            waker: Waker::from(relay.clone()),
            relay,
            turns: turns.max(1),
        }
    }
}

impl<F: Future<Output = ()> + ?Sized> Future for Turns<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut task = self.relay.task.lock().expect("waker lock poisoned");
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let this = &mut *self;
        for _ in 0..this.turns {
            this.relay.state.store(POLLING, Ordering::Release);
            let mut inner_cx = Context::from_waker(&this.waker);
            let ready = this.inner.as_mut().poll(&mut inner_cx).is_ready();
            let state = this.relay.state.swap(IDLE, Ordering::AcqRel);
            if ready {
                return Poll::Ready(());
            }
            if state != WOKEN {
                return Poll::Pending;
            }
        }
        // Still wants to go on: yield, as the driver itself would have.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Counts its polls; wakes itself `yields` times, then finishes.
    struct Yielder {
        polls: Arc<AtomicU32>,
        yields: u32,
    }

    impl Future for Yielder {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.yields == 0 {
                return Poll::Ready(());
            }
            self.yields -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    struct Count(AtomicU32);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_self_waking_future_gets_its_turns_then_yields() {
        let polls = Arc::new(AtomicU32::new(0));
        let mut f = Turns::new(
            Box::pin(Yielder {
                polls: polls.clone(),
                yields: 6,
            }),
            4,
        );
        let outer = Arc::new(Count(AtomicU32::new(0)));
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        // First poll: four turns, still pending, and the task is woken to come back.
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 4);
        assert_eq!(outer.0.load(Ordering::Relaxed), 1);
        // Second poll: the remaining two yields, then done; no further wake-up.
        assert!(Pin::new(&mut f).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 7);
        assert_eq!(outer.0.load(Ordering::Relaxed), 1);
    }

    /// Pending until its stored waker is woken from outside.
    struct Waiter {
        slot: Arc<Mutex<Option<Waker>>>,
        done: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Future for Waiter {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.done.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.slot.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn a_wake_up_from_elsewhere_reaches_the_task() {
        let slot = Arc::new(Mutex::new(None::<Waker>));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut f = Turns::new(
            Box::pin(Waiter {
                slot: slot.clone(),
                done: done.clone(),
            }),
            4,
        );
        let outer = Arc::new(Count(AtomicU32::new(0)));
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::Relaxed), 0, "no spurious wake-up");
        done.store(true, Ordering::Release);
        slot.lock().unwrap().take().unwrap().wake();
        assert_eq!(outer.0.load(Ordering::Relaxed), 1);
        assert!(Pin::new(&mut f).poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn spawned_futures_run_to_completion_on_tokio() {
        // Every endpoint of the crate runs on it (the QUIC tests of every crate); here only
        // that what quinn spawns completes.
        let (tx, rx) = tokio::sync::oneshot::channel();
        quinn::Runtime::spawn(
            &Runtime,
            Box::pin(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(7);
            }),
        );
        assert_eq!(rx.await.unwrap(), 7);
    }
}
