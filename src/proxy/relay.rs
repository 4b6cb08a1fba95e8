//! The relayed response body: upstream frames pass through one by one (untouched, except for
//! the usage chunk mantlegate asked for on the client's behalf), while the meter watches them
//! and the call commits when the body ends, fails or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::call::{Call, Outcome};
use crate::meter::stream::BodyMeter;

/// Wraps the upstream body; owns the [`Call`] so that its commit happens at end of stream.
pub struct RelayBody<B: Body> {
    inner: B,
    meter: BodyMeter,
    call: Call,
    /// The upstream answered 2xx (only then is usage read).
    success: bool,
    done: bool,
    /// Fires at the idle deadline (reset on every frame) or the total deadline, if sooner.
    timer: Pin<Box<Sleep>>,
    idle: Duration,
    deadline: Instant,
}

impl<B: Body> RelayBody<B> {
    /// Relays `inner`, metering it with `meter` and committing `call` when it ends. The answer
    /// is ended when no frame comes for `idle`, or at `deadline`.
    pub fn new(
        inner: B,
        meter: BodyMeter,
        call: Call,
        success: bool,
        idle: Duration,
        deadline: Instant,
    ) -> Self {
        let first = (Instant::now() + idle).min(deadline);
        Self {
            inner,
            meter,
            call,
            success,
            done: false,
            timer: Box::pin(tokio::time::sleep_until(first)),
            idle,
            deadline,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        let complete = outcome == Outcome::Forwarded;
        self.call.metered = Some(self.meter.result(self.success, complete));
        self.call.commit(outcome);
    }
}

impl<B: Body> Drop for RelayBody<B> {
    fn drop(&mut self) {
        if !self.done {
            // The client went away before the upstream body ended. If the stream's own end
            // was relayed (clients stop reading at `[DONE]`), the call is complete; otherwise
            // the client left mid-answer: meter what was relayed, then commit.
            // An empty body (content-length: 0) is never polled: hyper knows it is complete.
            let outcome = if (self.meter.saw_end() && self.out_is_empty())
                || (self.inner.is_end_stream() && self.out_is_empty())
            {
                Outcome::Forwarded
            } else {
                Outcome::ClientDisconnect
            };
            self.finish(outcome);
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
            let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    ready!(this.timer.as_mut().poll(cx));
                    // The upstream went quiet too long, or the call ran out of time: end the
                    // answer cleanly (the client sees the stream end) and drop the upstream.
                    this.call.error_code = Some(if Instant::now() >= this.deadline {
                        "upstream_total_timeout"
                    } else {
                        "upstream_idle_timeout"
                    });
                    this.finish(Outcome::UpstreamError);
                    continue;
                }
            };
            let next = (Instant::now() + this.idle).min(this.deadline);
            this.timer.as_mut().reset(next);
            match polled {
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
                        this.meter.finish_observe();
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
                    this.meter.finish_observe();
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

impl<B: Body> RelayBody<B> {
    fn out_is_empty(&self) -> bool {
        !self.meter.has_out()
    }

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
