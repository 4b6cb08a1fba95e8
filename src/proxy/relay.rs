//! The relayed response body: upstream frames pass through untouched (except for the usage
//! chunk mantlegate asked for on the client's behalf), while the meter watches them and the
//! call commits when the body ends, fails or is dropped.
//!
//! Frames that arrive together leave together, as nginx sends what one read brought in one
//! write: the relay takes every frame the upstream body has ready (the stream events one read
//! brought, decoded in this task), and sends them when it has no more, in one `writev`.
//! It never waits for data that has not arrived, and never holds more than [`HOLD_BYTES`]: a
//! large answer arriving without pause is relayed as it comes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::call::{Call, Outcome};
use crate::meter::stream::BodyMeter;

/// Held bytes past which the relay sends at once: a large answer arriving without pause is
/// relayed as it comes, not gathered whole.
const HOLD_BYTES: usize = 64 * 1024;

/// Why mantlegate broke off an answer it had begun to relay. The client gets it as a broken
/// body (HTTP/1.1: the connection closes short of the answer's end; HTTP/2: `RST_STREAM`).
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    /// No frame came from the upstream for `upstream.idle_timeout`.
    #[error(
        "bedrock-mantle sent nothing for {0:?} (upstream.idle_timeout): the answer is incomplete"
    )]
    Stalled(Duration),
    /// The call ran past `upstream.total_timeout`.
    #[error("the call ran past upstream.total_timeout ({0:?}): the answer is incomplete")]
    TotalTimeout(Duration),
}

/// Wraps the upstream body; owns the [`Call`] so that its commit happens at end of stream.
pub struct RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    /// The upstream body; `None` once it failed or timed out (its connection closed at once)
    /// or was handed to the task reading the rest of a non-streamed answer.
    inner: Option<B>,
    meter: BodyMeter,
    /// `None` once handed to the task reading the rest of a non-streamed answer.
    call: Option<Call>,
    /// The upstream answered 2xx (only then is usage read).
    success: bool,
    /// The call is committed (or handed over to be).
    done: bool,
    /// Handing out what is held (the upstream had nothing more, or ended).
    draining: bool,
    /// Trailers to send after the data held.
    trailers: Option<Frame<Bytes>>,
    /// The upstream's error, to end the answer with after the data held.
    broken: Option<axum::BoxError>,
    /// Fires at the idle deadline or the total deadline, if sooner. Not moved on every frame
    /// (a timer-wheel update each time): when it fires after frames came, it is set again
    /// for the idle time left since the last one.
    timer: Pin<Box<Sleep>>,
    /// When the last frame came from the upstream.
    last_frame: Instant,
    idle: Duration,
    started: Instant,
    deadline: Instant,
}

impl<B> RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    /// Relays `inner`, metering it with `meter` and committing `call` when it ends. The answer
    /// is broken off when no frame comes for `idle`, or at `deadline`.
    pub fn new(
        inner: B,
        meter: BodyMeter,
        call: Call,
        success: bool,
        idle: Duration,
        deadline: Instant,
    ) -> Self {
        let now = Instant::now();
        let first = (now + idle).min(deadline);
        Self {
            inner: Some(inner),
            meter,
            started: Instant::from_std(call.started()),
            call: Some(call),
            success,
            done: false,
            draining: false,
            trailers: None,
            broken: None,
            timer: Box::pin(tokio::time::sleep_until(first)),
            last_frame: now,
            idle,
            deadline,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(call) = self.call.as_mut() {
            let complete = outcome == Outcome::Forwarded;
            call.metered = Some(self.meter.result(self.success, complete));
            call.commit(outcome);
        }
    }

    /// The upstream's answer broke off (`code` says why): commit the call as an upstream
    /// error, close the upstream connection, and end the client's answer with `err` once what
    /// is held has been handed out, so that the client sees it incomplete.
    fn fail(&mut self, code: &'static str, err: axum::BoxError) {
        if let Some(call) = self.call.as_mut() {
            call.error_code = Some(code);
        }
        self.finish(Outcome::UpstreamError);
        self.inner = None;
        self.broken = Some(err);
        self.draining = true;
    }

    fn out_is_empty(&self) -> bool {
        !self.meter.has_out()
    }

    /// The upstream body ended while rewriting: flush what is held, then commit.
    fn end_of_upstream(&mut self) {
        if let Some(rest) = self.meter.finish_relay() {
            self.meter.push_out(rest);
        }
        self.finish(Outcome::Forwarded);
    }
}

impl<B> Drop for RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The client went away before the upstream body ended. If the stream's own end
        // was relayed (clients stop reading at `[DONE]`), the call is complete; otherwise
        // the client left mid-answer: meter what was relayed, then commit.
        // An empty body (content-length: 0) is never polled: hyper knows it is complete.
        let upstream_ended = self.inner.as_ref().is_none_or(Body::is_end_stream);
        if (self.meter.saw_end() || upstream_ended) && self.out_is_empty() {
            self.finish(Outcome::Forwarded);
            return;
        }
        // A non-streamed answer says its usage at its end: read the rest of it (bounded) so
        // that the call is billed what it used, not an estimate.
        if self.success
            && self.meter.usage_at_end()
            && !upstream_ended
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let (Some(inner), Some(call)) = (self.inner.take(), self.call.take())
        {
            self.done = true;
            let meter = std::mem::replace(&mut self.meter, BodyMeter::idle());
            runtime.spawn(read_rest(inner, meter, call, self.idle, self.deadline));
            return;
        }
        self.finish(Outcome::ClientDisconnect);
    }
}

/// Reads the rest of a non-streamed answer whose client left, through the meter, and commits
/// the call (outcome `client_disconnect`) with the usage the answer reports. Bounded: at most
/// `server.max_body_bytes` more bytes, no gap longer than `idle`, nothing past `deadline`;
/// past a bound the upstream connection is closed and the usage estimated.
async fn read_rest<B>(
    mut inner: B,
    mut meter: BodyMeter,
    mut call: Call,
    idle: Duration,
    deadline: Instant,
) where
    B: Body<Data = Bytes> + Unpin,
{
    let limit = call.snapshot().max_body_bytes;
    let mut read = 0usize;
    let complete = loop {
        let due = (Instant::now() + idle).min(deadline);
        match tokio::time::timeout_at(due, inner.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    read = read.saturating_add(data.len());
                    if read > limit {
                        break false;
                    }
                    meter.observe(&data);
                }
            }
            Ok(None) => break true,
            Ok(Some(Err(_))) | Err(_) => break false,
        }
    };
    // Read whole, the connection goes back to the pool; cut short, it is closed.
    drop(inner);
    call.metered = Some(meter.result(true, complete));
    call.commit(Outcome::ClientDisconnect);
}

impl<B> Body for RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
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
            if this.draining {
                if let Some(piece) = this.meter.next_out() {
                    return Poll::Ready(Some(Ok(Frame::data(piece))));
                }
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                if let Some(err) = this.broken.take() {
                    return Poll::Ready(Some(Err(err)));
                }
                this.draining = false;
            }
            if this.done {
                return Poll::Ready(None);
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending if this.meter.has_out() => {
                    // The upstream has nothing more ready: send what it brought.
                    this.draining = true;
                    continue;
                }
                Poll::Pending => {
                    loop {
                        ready!(this.timer.as_mut().poll(cx));
                        let due = (this.last_frame + this.idle).min(this.deadline);
                        if Instant::now() >= due {
                            break;
                        }
                        this.timer.as_mut().reset(due);
                    }
                    // The upstream went quiet too long, or the call ran out of time: the
                    // answer is incomplete, and the client must be able to tell.
                    let (code, err) = if Instant::now() >= this.deadline {
                        let total = this.deadline.duration_since(this.started);
                        ("upstream_total_timeout", Broken::TotalTimeout(total))
                    } else {
                        ("upstream_stalled", Broken::Stalled(this.idle))
                    };
                    this.fail(code, err.into());
                    continue;
                }
            };
            this.last_frame = Instant::now();
            let ended = inner.is_end_stream();
            match polled {
                Some(Ok(frame)) => {
                    if let Some(call) = this.call.as_mut() {
                        call.mark_first_byte();
                    }
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => {
                            // Trailers: relayed as they are, after the data held.
                            this.trailers = Some(trailers);
                            this.draining = true;
                            continue;
                        }
                    };
                    if this.meter.rewrites() {
                        this.meter.relay(&data);
                        if ended {
                            this.end_of_upstream();
                        }
                    } else {
                        this.meter.observe(&data);
                        this.meter.push_out(data);
                        if ended {
                            this.meter.finish_observe();
                            this.finish(Outcome::Forwarded);
                        }
                    }
                    if this.done || this.meter.out_bytes() >= HOLD_BYTES {
                        this.draining = true;
                    }
                }
                Some(Err(err)) => {
                    // The upstream broke off mid-answer: what came before the break is
                    // handed out, then the client's answer breaks off too (all HTTP can say
                    // once the head is sent), never a clean end that would pass for a whole.
                    let err: axum::BoxError = err.into();
                    let code = err
                        .downcast_ref::<crate::upstream::Error>()
                        .map_or("upstream_truncated", crate::upstream::Error::body_code);
                    this.fail(code, err);
                }
                None => {
                    if this.meter.rewrites() {
                        this.end_of_upstream();
                    } else {
                        this.meter.finish_observe();
                        this.finish(Outcome::Forwarded);
                    }
                    this.draining = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once it has been observed, so the commit above always runs, and
        // once nothing is held: hyper stops polling a body that says it has ended.
        self.done && !self.meter.has_out() && self.trailers.is_none() && self.broken.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if !self.done && !self.meter.rewrites() => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AppState, Snapshot};
    use std::sync::Arc;
    use std::task::Waker;

    /// An upstream body the test feeds frame by frame: `Pending` whenever nothing is queued.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn relay(
        kind: crate::meter::stream::Kind,
    ) -> (RelayBody<Fed>, tokio::sync::mpsc::UnboundedSender<Bytes>) {
        relay_idle(kind, Duration::from_mins(1))
    }

    fn relay_idle(
        kind: crate::meter::stream::Kind,
        idle: Duration,
    ) -> (RelayBody<Fed>, tokio::sync::mpsc::UnboundedSender<Bytes>) {
        let config = crate::config::Config::from_toml(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[[projects]]\nname = \"P\"\nid = \"proj_p\"\n",
        )
        .expect("config");
        let snap = Snapshot::build(&config, Some("k")).expect("snapshot");
        let state = AppState::new(snap, Duration::from_secs(1)).expect("state");
        let snap = state.snapshot.load_full();
        let call = Call::new(
            std::time::Instant::now(),
            axum::http::Method::POST,
            axum::http::Uri::from_static("/v1/chat/completions"),
            Arc::new(state),
            Arc::clone(&snap),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let body = RelayBody::new(
            Fed(rx),
            BodyMeter::new(kind, 10),
            call,
            true,
            idle,
            Instant::now() + Duration::from_mins(1),
        );
        (body, tx)
    }

    fn poll(body: &mut RelayBody<Fed>) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|f| f.map(|f| f.expect("no error").into_data().expect("data")))
    }

    #[tokio::test]
    async fn events_that_arrive_together_leave_together_and_none_waits_for_more() {
        let (mut body, tx) = relay(crate::meter::stream::Kind::ResponsesStream);
        // Two events that one read brought.
        tx.send(Bytes::from_static(b"event: a\ndata: {}\n\n"))
            .expect("send");
        tx.send(Bytes::from_static(b"event: b\ndata: {}\n\n"))
            .expect("send");
        let mut out = Vec::new();
        let mut pendings_between = 0;
        for _ in 0..10 {
            match poll(&mut body) {
                Poll::Ready(Some(b)) => out.push(b),
                Poll::Ready(None) => panic!("the body ended"),
                Poll::Pending => {
                    pendings_between += 1;
                    break;
                }
            }
        }
        assert_eq!(
            out,
            [Bytes::from_static(
                b"event: a\ndata: {}\n\nevent: b\ndata: {}\n\n"
            )],
            "both events, in order, in one frame"
        );
        assert_eq!(pendings_between, 1, "then nothing is held");
        assert!(!body.is_end_stream());

        // A lone event goes out at once: nothing waits for more to arrive.
        tx.send(Bytes::from_static(b"event: c\ndata: {}\n\n"))
            .expect("send");
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"event: c\ndata: {}\n\n")))
        );

        // The end: whatever is held first, then the end of the body.
        tx.send(Bytes::from_static(b"event: d\ndata: {}\n\n"))
            .expect("send");
        drop(tx);
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"event: d\ndata: {}\n\n")))
        );
        assert!(body.is_end_stream() || poll(&mut body) == Poll::Ready(None));
    }

    /// The clock is tokio's paused one: it moves only when every task waits, straight to the
    /// next timer, so the durations below are exact.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_frame_not_the_first() {
        let idle = Duration::from_millis(100);
        let (mut body, tx) = relay_idle(crate::meter::stream::Kind::None, idle);
        // Five frames 60 ms apart: 240 ms in all, more than `idle`, never idle that long.
        for i in 0..5u8 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            tx.send(Bytes::from(vec![b'a' + i])).expect("send");
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let data = frame.expect("a frame").expect("no error").into_data();
            assert_eq!(data.expect("data"), Bytes::from(vec![b'a' + i]));
        }
        let last = Instant::now();
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let err = end
            .expect("a last frame")
            .expect_err("the answer breaks off");
        assert!(err.to_string().contains("upstream.idle_timeout"), "{err}");
        assert_eq!(last.elapsed(), idle, "`idle` after the last frame");
        let call = body.call.as_ref().expect("the call");
        assert_eq!(call.error_code, Some("upstream_stalled"));
        assert!(call.is_committed());
        assert!(body.inner.is_none(), "the upstream is let go at once");
        assert!(
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .is_none()
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_large_answer_arriving_without_pause_is_not_gathered_whole() {
        let (mut body, tx) = relay(crate::meter::stream::Kind::None);
        let piece = Bytes::from(vec![b'x'; 16 * 1024]);
        // Far more than HOLD_BYTES queued at once: the relay must start handing out before
        // it has taken everything.
        for _ in 0..64 {
            tx.send(piece.clone()).expect("send");
        }
        match poll(&mut body) {
            Poll::Ready(Some(b)) => assert_eq!(b.len(), piece.len()),
            other => panic!("held instead of relayed: {other:?}"),
        }
        assert!(
            body.meter.out_bytes() < HOLD_BYTES,
            "{} bytes held",
            body.meter.out_bytes()
        );
    }
}
