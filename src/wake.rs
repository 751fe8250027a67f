//! Wake-ups a connection's task gives itself, absorbed.
//!
//! One task serves a client connection: hyper's dispatcher, the handler under it, and the
//! backend connection the handler drives (`upstream::pool`). Much of what one of them does
//! wakes another: the handler taking the request body wakes the dispatcher, handing the request
//! to the backend connection wakes it, the connection passing on the head or a chunk wakes the
//! handler. All of them hold the same task's waker, so each such wake marks the running task as
//! notified; tokio then requeues it as a yield and wakes a sleeping worker to come and steal it:
//! a futex call and a thread woken for nothing (or the task moved to the other core), once or
//! twice per request. Polled through [`absorb_self_wakes`], a wake that arrives while the task
//! is inside its own poll asks for one more round of that poll instead; any other wake (the
//! socket became readable while the task waits) reaches the task as usual.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// More rounds than one request's exchange needs; beyond them the task yields for fairness.
const MAX_ROUNDS: usize = 8;

/// Runs `future` with wakes from inside its own poll turned into immediate re-polls.
pub fn absorb_self_wakes<F: Future>(future: F) -> AbsorbSelfWakes<F> {
    AbsorbSelfWakes { future, waker: LocalWaker::new() }
}

pin_project_lite::pin_project! {
    /// A struct rather than an `async fn`, whose state can hold the future twice (as its
    /// argument and as the pinned local): every connection's task would carry both.
    pub struct AbsorbSelfWakes<F> {
        #[pin]
        future: F,
        waker: LocalWaker,
    }
}

impl<F: Future> Future for AbsorbSelfWakes<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut future = this.future;
        this.waker.poll(cx, |cx| future.as_mut().poll(cx))
    }
}

struct LocalWaker {
    state: Arc<State>,
    waker: Waker,
}

struct State {
    /// The task is inside [`LocalWaker::poll`].
    polling: AtomicBool,
    /// A wake arrived since the current round started.
    woken: AtomicBool,
    /// The waker of the task that polls.
    task: Mutex<Option<Waker>>,
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // `woken` before `polling` (and the poller clears `polling` before it reads `woken`):
        // a wake racing with the end of a round is either seen by the poller or passed on.
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            if let Some(task) = self.task.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                task.wake_by_ref();
            }
        }
    }
}

impl LocalWaker {
    fn new() -> Self {
        let state =
            Arc::new(State { polling: AtomicBool::new(false), woken: AtomicBool::new(false), task: Mutex::new(None) });
        let waker = Waker::from(Arc::clone(&state));
        Self { state, waker }
    }

    /// Runs `round` under this waker until it is ready or nothing woke it during a round.
    fn poll<T>(&self, cx: &mut Context<'_>, mut round: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        self.follow(cx.waker());
        let mut local = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            self.state.woken.store(false, Ordering::SeqCst);
            self.state.polling.store(true, Ordering::SeqCst);
            let result = round(&mut local);
            self.state.polling.store(false, Ordering::SeqCst);
            if result.is_ready() {
                return result;
            }
            if !self.state.woken.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            // An exhausted coop budget wakes the task to make it yield: honour that.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn follow(&self, task: &Waker) {
        let mut current = self.state.task.lock().unwrap_or_else(PoisonError::into_inner);
        if !current.as_ref().is_some_and(|w| w.will_wake(task)) {
            *current = Some(task.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (Arc::clone(&counter), Waker::from(counter))
    }

    #[test]
    fn a_wake_inside_the_poll_means_another_round_not_a_task_wake() {
        let (wakes, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut rounds = 0;
        let result = LocalWaker::new().poll(&mut cx, |cx| {
            rounds += 1;
            if rounds < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(result, Poll::Ready(3));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        let (wakes, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut registered = None;
        let result: Poll<()> = LocalWaker::new().poll(&mut cx, |cx| {
            registered = Some(cx.waker().clone());
            Poll::Pending
        });
        assert!(result.is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        registered.unwrap().wake();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_a_bounded_number_of_rounds() {
        let (wakes, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut rounds = 0;
        let result: Poll<()> = LocalWaker::new().poll(&mut cx, |cx| {
            rounds += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(result.is_pending());
        assert_eq!(rounds, MAX_ROUNDS);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken once, to come back after others ran");
    }

    #[tokio::test]
    async fn a_task_waiting_on_another_still_completes() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(absorb_self_wakes(async move { rx.await.unwrap() + 1 }));
        tokio::task::yield_now().await;
        tx.send(41).unwrap();
        assert_eq!(waiter.await.unwrap(), 42);
    }
}
