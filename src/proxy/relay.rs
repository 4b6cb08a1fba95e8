//! The relayed response body: upstream frames pass through untouched, one by one, while the
//! call's context watches them and commits when the body ends, fails or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::call::{Call, Outcome};

/// Wraps the upstream body; owns the [`Call`] so that its commit happens at end of stream.
pub struct RelayBody<B> {
    inner: B,
    call: Call,
    done: bool,
}

impl<B> RelayBody<B> {
    /// Relays `inner`, committing `call` when it ends.
    pub fn new(inner: B, call: Call) -> Self {
        Self {
            inner,
            call,
            done: false,
        }
    }
}

impl<B> Body for RelayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                this.call.mark_first_byte();
                if this.inner.is_end_stream() {
                    this.finish(Outcome::Forwarded);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => {
                // The upstream broke off mid-answer: the client sees the stream end abruptly,
                // which is all HTTP/1.1 can say once the head is sent.
                this.finish(Outcome::UpstreamError);
                Poll::Ready(Some(Err(err.into())))
            }
            None => {
                this.finish(Outcome::Forwarded);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once it has been observed, so the commit above always runs.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B> RelayBody<B> {
    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        self.call.commit(outcome);
    }
}
