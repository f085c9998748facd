//! A fair (first come, first served) async semaphore that needs no
//! runtime, with its acquire future and an RAII permit.
//!
//! Cancellation safety: an [`Acquire`] dropped while queued leaves the
//! queue; one dropped after it was handed a permit (but before collecting
//! it) passes the permit to the next waiter; a [`Permit`] returns itself when
//! dropped, also when the holder's future is cancelled or panics.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// A fair (first come, first served) async semaphore that needs no runtime.
/// A returned permit is handed straight to the longest waiter.
pub(crate) struct Semaphore {
    state: Mutex<SemaphoreState>,
}

struct SemaphoreState {
    /// Permits nobody holds (only while nobody waits).
    available: usize,
    /// Waiting [`Acquire`]s, oldest first.
    waiters: VecDeque<Waiter>,
    /// Waiters handed a permit that have not collected it yet.
    granted: Vec<u64>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    waker: Waker,
}

impl Semaphore {
    pub(crate) fn new(permits: usize) -> Self {
        Self {
            state: Mutex::new(SemaphoreState {
                available: permits,
                waiters: VecDeque::new(),
                granted: Vec::new(),
                next_id: 0,
            }),
        }
    }

    // The lock is never held across user code or an await, so poisoning
    // can only come from a bug here; the state is still consistent.
    fn lock(&self) -> MutexGuard<'_, SemaphoreState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn acquire(&self) -> Acquire<'_> {
        Acquire {
            semaphore: self,
            queued: None,
        }
    }

    /// Returns a permit: to the oldest waiter (woken), else to the pool.
    fn release(&self) {
        let waker = {
            let mut state = self.lock();
            if let Some(next) = state.waiters.pop_front() {
                state.granted.push(next.id);
                Some(next.waker)
            } else {
                state.available += 1;
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.lock().available
    }
}

/// The future of [`Semaphore::acquire`]. Dropped while queued it leaves the
/// queue; dropped after being handed a permit it passes the permit on.
pub(crate) struct Acquire<'a> {
    semaphore: &'a Semaphore,
    /// The waiter id once queued.
    queued: Option<u64>,
}

impl<'a> Future for Acquire<'a> {
    type Output = Permit<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit<'a>> {
        let this = self.get_mut();
        let semaphore = this.semaphore;
        let mut state = semaphore.lock();
        match this.queued {
            None => {
                if state.available > 0 && state.waiters.is_empty() {
                    state.available -= 1;
                    return Poll::Ready(Permit { semaphore });
                }
                let id = state.next_id;
                state.next_id = state.next_id.wrapping_add(1);
                state.waiters.push_back(Waiter {
                    id,
                    waker: cx.waker().clone(),
                });
                this.queued = Some(id);
                Poll::Pending
            }
            Some(id) => {
                if let Some(i) = state.granted.iter().position(|g| *g == id) {
                    state.granted.swap_remove(i);
                    this.queued = None;
                    return Poll::Ready(Permit { semaphore });
                }
                // Polled again by another task, say: wake that one.
                if let Some(w) = state.waiters.iter_mut().find(|w| w.id == id) {
                    w.waker.clone_from(cx.waker());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(id) = self.queued.take() else {
            return;
        };
        let handed = {
            let mut state = self.semaphore.lock();
            if let Some(i) = state.granted.iter().position(|g| *g == id) {
                state.granted.swap_remove(i);
                true
            } else {
                state.waiters.retain(|w| w.id != id);
                false
            }
        };
        if handed {
            self.semaphore.release();
        }
    }
}

/// An in-flight permit; dropping it returns the permit.
pub(crate) struct Permit<'a> {
    semaphore: &'a Semaphore,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.semaphore.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn semaphore_permits_return_on_drop_and_cancellation() {
        let s = Semaphore::new(1);
        let held = match poll_once(&mut s.acquire()) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("a free permit"),
        };
        // Queued, then cancelled before being handed the permit.
        let mut queued = s.acquire();
        assert!(poll_once(&mut queued).is_pending());
        drop(queued);
        // Two more queue; the first is handed the permit and cancelled
        // before collecting it: the permit passes to the next.
        let mut b = s.acquire();
        let mut c = s.acquire();
        assert!(poll_once(&mut b).is_pending());
        assert!(poll_once(&mut c).is_pending());
        drop(held);
        drop(b);
        let from_c = match poll_once(&mut c) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("the cancelled waiter's permit was passed on"),
        };
        drop(c);
        assert_eq!(s.available(), 0);
        drop(from_c);
        assert_eq!(s.available(), 1);
        assert!(s.lock().waiters.is_empty() && s.lock().granted.is_empty());
        // A fresh acquire gets it at once.
        assert!(poll_once(&mut s.acquire()).is_ready());
        assert_eq!(s.available(), 1);
    }

    #[test]
    fn semaphore_is_first_come_first_served() {
        let s = Semaphore::new(1);
        let Poll::Ready(held) = poll_once(&mut s.acquire()) else {
            panic!("a free permit")
        };
        let mut first = s.acquire();
        let mut second = s.acquire();
        assert!(poll_once(&mut first).is_pending());
        assert!(poll_once(&mut second).is_pending());
        drop(held);
        // Polled out of order, the permit still goes to the first waiter.
        assert!(poll_once(&mut second).is_pending());
        assert!(poll_once(&mut first).is_ready());
    }
}
