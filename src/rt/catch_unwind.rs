//! Turning a panic inside a future into an error, without `unsafe`.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Runs a future, turning a panic while polling it into `Err` with the
/// panic's payload. The future is boxed, hence `Unpin`.
pub(crate) struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> CatchUnwind<F> {
    pub(crate) fn new(future: F) -> Self {
        Self(Box::pin(future))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The message of a panic payload (`&str` or `String`), at most 200
/// characters.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    text.chars().take(200).collect()
}

/// Whether a future is ready, polled once with a no-op waker.
pub(crate) fn poll_now<F: Future<Output = ()>>(fut: Pin<&mut F>) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(fut.poll(&mut cx), Poll::Ready(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let mut fut = CatchUnwind::new(async { panic!("boom") });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Err(p)) = Pin::new(&mut fut).poll(&mut cx) else {
            panic!("expected a caught panic")
        };
        assert_eq!(panic_message(&*p), "boom");
        let mut ok = CatchUnwind::new(async { 7 });
        assert!(matches!(
            Pin::new(&mut ok).poll(&mut cx),
            Poll::Ready(Ok(7))
        ));
    }
}
