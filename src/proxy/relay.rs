//! The relayed response body: upstream frames pass through one by one (untouched, except for
//! the usage chunk mantlegate asked for on the client's behalf), while the meter watches them
//! and the call commits when the body ends, fails or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::call::{Call, Outcome};
use crate::meter::stream::BodyMeter;

/// Wraps the upstream body; owns the [`Call`] so that its commit happens at end of stream.
pub struct RelayBody<B> {
    inner: B,
    meter: BodyMeter,
    call: Call,
    /// The upstream answered 2xx (only then is usage read).
    success: bool,
    done: bool,
}

impl<B> RelayBody<B> {
    /// Relays `inner`, metering it with `meter` and committing `call` when it ends.
    pub fn new(inner: B, meter: BodyMeter, call: Call, success: bool) -> Self {
        Self {
            inner,
            meter,
            call,
            success,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        let complete = outcome == Outcome::Forwarded;
        self.call.metered = Some(self.meter.result(self.success, complete));
        self.call.commit(outcome);
    }
}

impl<B> Drop for RelayBody<B> {
    fn drop(&mut self) {
        if !self.done {
            // The client went away mid-answer: meter what was relayed, then commit.
            self.finish(Outcome::ClientDisconnect);
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
        loop {
            if let Some(piece) = this.meter.next_out() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    this.call.mark_first_byte();
                    let Some(data) = frame.data_ref() else {
                        // Trailers: relayed as they are.
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    if this.meter.rewrites() {
                        this.meter.relay(data);
                        if this.inner.is_end_stream() {
                            this.end_of_upstream();
                        }
                        // Loop: hand out what relay() queued, or read more.
                        continue;
                    }
                    this.meter.observe(data);
                    if this.inner.is_end_stream() {
                        this.finish(Outcome::Forwarded);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(err)) => {
                    // The upstream broke off mid-answer: the client sees the stream end
                    // abruptly, which is all HTTP/1.1 can say once the head is sent.
                    this.finish(Outcome::UpstreamError);
                    return Poll::Ready(Some(Err(err.into())));
                }
                None => {
                    if this.meter.rewrites() {
                        this.end_of_upstream();
                        continue;
                    }
                    this.finish(Outcome::Forwarded);
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once it has been observed, so the commit above always runs.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done || self.meter.rewrites() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B> RelayBody<B> {
    /// The upstream body ended while rewriting: flush what is held, then commit.
    fn end_of_upstream(&mut self) {
        if let Some(rest) = self.meter.finish_relay() {
            self.meter_push(rest);
        }
        self.finish(Outcome::Forwarded);
    }

    fn meter_push(&mut self, piece: Bytes) {
        self.meter.push_out(piece);
    }
}
