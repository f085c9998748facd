//! `join_all`: polls boxed futures together until every one is done, without
//! an async runtime. The results come back in the order of the futures.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A boxed `Send` future, as [`join_all`] takes them.
pub(crate) type BoxedFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Polls `futures` together until all are done; resolves to their outputs
/// in the order of `futures` (not the order they finished in).
pub(crate) fn join_all<T>(futures: Vec<BoxedFuture<T>>) -> JoinAll<T> {
    let n = futures.len();
    JoinAll {
        futures: futures.into_iter().map(Some).collect(),
        results: (0..n).map(|_| None).collect(),
    }
}

/// The future of [`join_all`]. Every poll polls each unfinished future once
/// with the caller's waker, so whichever of them wakes, all are re-polled.
pub(crate) struct JoinAll<T> {
    futures: Vec<Option<BoxedFuture<T>>>,
    results: Vec<Option<T>>,
}

// The results are plain values moved out at the end; nothing is pinned in
// place except the boxed futures, which are pinned by their boxes.
impl<T> Unpin for JoinAll<T> {}

impl<T> Future for JoinAll<T> {
    type Output = Vec<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        let this = self.get_mut();
        let mut pending = false;
        for (slot, result) in this.futures.iter_mut().zip(this.results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(this.results.iter_mut().filter_map(Option::take).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// Pending for `polls` polls (waking itself each time), then `value`.
    struct After {
        polls: u32,
        value: u32,
    }

    impl Future for After {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            if self.polls == 0 {
                return Poll::Ready(self.value);
            }
            self.polls -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn results_keep_the_order_of_the_futures() {
        let futures: Vec<BoxedFuture<u32>> = vec![
            Box::pin(After { polls: 3, value: 1 }),
            Box::pin(After { polls: 0, value: 2 }),
            Box::pin(After { polls: 1, value: 3 }),
        ];
        let mut all = join_all(futures);
        let mut cx = Context::from_waker(Waker::noop());
        let mut polls = 0;
        let out = loop {
            polls += 1;
            if let Poll::Ready(v) = Pin::new(&mut all).poll(&mut cx) {
                break v;
            }
        };
        assert_eq!(out, [1, 2, 3]);
        // Polled together: as many polls as the slowest needs, not the sum.
        assert_eq!(polls, 4);
    }

    #[test]
    fn no_futures_is_ready_at_once() {
        let mut all = join_all::<u32>(Vec::new());
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(Pin::new(&mut all).poll(&mut cx), Poll::Ready(Vec::new()));
    }
}
