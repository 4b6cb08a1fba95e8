//! The relayed response body: upstream frames pass through untouched (except for the usage
//! chunk mantlegate asked for on the client's behalf), while the meter watches them and the
//! call commits when the body ends, fails or is dropped.
//!
//! Frames that arrive together leave together, as nginx sends what one read brought in one
//! write: the relay takes every frame the upstream body has ready (the stream events one read
//! brought, decoded in this task), and sends them when it has no more, in one `writev`.
//! It never waits for data that has not arrived.
//!
//! A client that reads slowly or not at all holds the relay back, not the upstream's bytes in
//! memory: the relay keeps at most [`AHEAD_BYTES`] ahead of the client, held here or handed to
//! hyper and not yet taken by the client's socket (HTTP/1, counted by the connection's
//! [`ClientLink`]; over HTTP/2 the stream's flow control and hyper's send buffer bound it).
//! Past that it reads nothing more from the upstream, whose bytes wait in the kernel and then
//! at the upstream. A client that takes nothing for `server.idle_timeout` while the relay has
//! bytes for it is given up on: the call is committed `client_stalled` with the usage seen so
//! far, the upstream connection is closed, and the client's answer breaks off. That watch runs
//! on a timer of its own, because hyper does not poll a body whose client takes nothing: its
//! wake-up (the shared relay as a waker) looks at the relay under its lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::call::{Call, Outcome};
use crate::meter::stream::BodyMeter;
use crate::server::{ClientLink, StalledMark};

/// Bytes past which the relay reads nothing more from the upstream: those it holds plus, over
/// HTTP/1, those handed to hyper that the client's socket has not taken. A large answer
/// arriving without pause is relayed in pieces of about this size, not gathered whole.
const AHEAD_BYTES: usize = 16 * 1024;

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
    /// The client took nothing of the answer for `server.idle_timeout`.
    #[error("the client read nothing of the answer for {0:?} (server.idle_timeout)")]
    ClientStalled(Duration),
}

/// Wraps the upstream body; owns the [`Call`] so that its commit happens at end of stream.
pub struct RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    shared: Arc<Shared<B>>,
}

/// The relay, shared between the body hyper polls and the client-stall watch's wake-ups.
/// Locked once per poll, never across an await.
struct Shared<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    relay: Mutex<Relay<B>>,
}

/// What the next look of the client-stall watch does.
enum Look {
    /// The relay is over: no more looks.
    Stop,
    /// Look again at this instant.
    Again(Instant),
    /// The client took nothing for `server.idle_timeout`: give up on it.
    GiveUp,
}

#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts of the relay (upstream success, committed, draining, data awaiting the client), not a state machine"
)]
struct Relay<B> {
    /// The upstream body; `None` once it failed or timed out (its connection closed at once)
    /// or was handed to the task reading the rest of a non-streamed answer.
    inner: Option<B>,
    meter: BodyMeter,
    /// `None` once handed to the task reading the rest of a non-streamed answer, or once the
    /// client was given up on.
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
    /// The client's connection (`None` when the app is served without mantlegate's server).
    link: Option<ClientLink>,
    /// Over HTTP/1: data bytes handed to hyper, and the connection's count of bytes its socket
    /// took when the relay began.
    handed: u64,
    accepted_at_start: u64,
    /// Whether the last poll handed out data, which hyper holds until the client makes room
    /// for it (over HTTP/2: until the stream has flow-control window); and how many times
    /// hyper came back for more after that.
    awaiting: bool,
    taken: u64,
    /// The client-stall watch: wakes [`Shared`] a quarter of `client_idle` apart. `None` once
    /// the relay is over (it holds the waker, and so the relay).
    watch: Option<Pin<Box<Sleep>>>,
    /// `server.idle_timeout`.
    client_idle: Duration,
    /// The client's progress count at the last look, and when it last moved (or the relay
    /// had nothing waiting for the client).
    seen: u64,
    seen_at: Instant,
    /// Set once the client was given up on, until the body is dropped.
    stalled: Option<StalledMark>,
}

/// Locks the relay; a panic elsewhere while it was held leaves it usable (the body then ends).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B> RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    /// Relays `inner`, metering it with `meter` and committing `call` when it ends. The answer
    /// is broken off when no frame comes for `idle`, or at `deadline`, or when the client on
    /// `link` takes nothing of it for `server.idle_timeout`.
    pub fn new(
        inner: B,
        meter: BodyMeter,
        call: Call,
        success: bool,
        idle: Duration,
        deadline: Instant,
        link: Option<ClientLink>,
    ) -> Self {
        let now = Instant::now();
        let first = (now + idle).min(deadline);
        let client_idle = call.snapshot().connections.idle_timeout;
        let accepted_at_start = link.as_ref().map_or(0, ClientLink::accepted);
        let relay = Relay {
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
            link,
            handed: 0,
            accepted_at_start,
            awaiting: false,
            taken: 0,
            watch: Some(Box::pin(tokio::time::sleep_until(now + client_idle))),
            client_idle,
            seen: accepted_at_start,
            seen_at: now,
            stalled: None,
        };
        let shared = Arc::new(Shared {
            relay: Mutex::new(relay),
        });
        {
            let mut relay = lock(&shared.relay);
            // Nobody can be stalled before `client_idle` has passed.
            Shared::arm(&shared, &mut relay, now + client_idle);
        }
        Self { shared }
    }
}

impl<B> Shared<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    /// Sets the client-stall watch to wake `shared` at `at`.
    fn arm(shared: &Arc<Self>, relay: &mut Relay<B>, at: Instant) {
        let Some(watch) = relay.watch.as_mut() else {
            return;
        };
        watch.as_mut().reset(at);
        let waker = Waker::from(shared.clone());
        if watch
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            waker.wake();
        }
    }

    /// A look of the client-stall watch.
    fn look(shared: &Arc<Self>) {
        let mut relay = lock(&shared.relay);
        match relay.client_progress(Instant::now()) {
            Look::Stop => {}
            Look::Again(at) => Self::arm(shared, &mut relay, at),
            Look::GiveUp => relay.give_up(),
        }
    }
}

impl<B> Wake for Shared<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    /// The watch fired: look at the relay from a task of its own (the timer that calls this
    /// may do so while the relay is locked, from inside [`Shared::arm`]).
    fn wake(self: Arc<Self>) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { Self::look(&self) });
        }
    }
}

impl<B> Relay<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        // The watch holds a waker of the relay: letting it go ends that cycle.
        self.watch = None;
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

    /// Bytes ahead of the client: held here, plus over HTTP/1 those handed to hyper that the
    /// client's socket has not taken (heads and framing count as taken data, so this may
    /// come out a little low, never high).
    fn ahead(&self) -> usize {
        let handed = match &self.link {
            Some(link) if link.is_http1() => {
                let taken = link.accepted().wrapping_sub(self.accepted_at_start);
                usize::try_from(self.handed.saturating_sub(taken)).unwrap_or(usize::MAX)
            }
            _ => 0,
        };
        self.meter.out_bytes().saturating_add(handed)
    }

    /// The relay ends before the upstream's answer did, its client gone (`ClientDisconnect`)
    /// or given up on (`ClientStalled`). A non-streamed answer says its usage at its end: the
    /// rest of it is read (bounded) so that the call is billed what it used, not an estimate.
    fn leave(&mut self, outcome: Outcome) {
        let upstream_ended = self.inner.as_ref().is_none_or(Body::is_end_stream);
        if self.success
            && self.meter.usage_at_end()
            && !upstream_ended
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let (Some(inner), Some(call)) = (self.inner.take(), self.call.take())
        {
            self.done = true;
            self.watch = None;
            let meter = std::mem::replace(&mut self.meter, BodyMeter::idle());
            runtime.spawn(read_rest(
                inner,
                meter,
                call,
                self.idle,
                self.deadline,
                outcome,
            ));
            return;
        }
        self.finish(outcome);
    }

    /// The body was dropped.
    fn dropped(&mut self) {
        self.watch = None;
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
        self.leave(Outcome::ClientDisconnect);
    }

    /// A look of the client-stall watch at `now`: whether the client took anything of the
    /// answer since the last one, or had nothing waiting for it. Over HTTP/1 it has taken
    /// something when its socket took bytes, and has something waiting when the socket's last
    /// write found it full; over HTTP/2 (and without a link), when hyper came back for more
    /// after taking data from the body, and while it has not.
    fn client_progress(&mut self, now: Instant) -> Look {
        if self.done || self.watch.is_none() {
            return Look::Stop;
        }
        let (progress, waiting) = match &self.link {
            Some(link) if link.is_http1() => (link.accepted(), link.blocked()),
            _ => (self.taken, self.awaiting),
        };
        if progress != self.seen || !waiting {
            self.seen = progress;
            self.seen_at = now;
        } else if now >= self.seen_at + self.client_idle {
            return Look::GiveUp;
        }
        let quarter = (self.client_idle / 4).max(Duration::from_millis(1));
        Look::Again((now + quarter).min(self.seen_at + self.client_idle))
    }

    /// The client took nothing of the answer for `server.idle_timeout`: commit the call
    /// `client_stalled` with what the meter saw, let the upstream go (or read the rest of a
    /// non-streamed answer for its usage), drop what is held, and break the client's answer
    /// off if it is ever polled again. The connection closes once nothing else is in
    /// progress on it.
    fn give_up(&mut self) {
        if let Some(call) = self.call.as_mut() {
            call.error_code = Some("client_stalled");
        }
        self.leave(Outcome::ClientStalled);
        // The call leaves the calls in flight now, not when hyper drops the body.
        self.call = None;
        self.inner = None;
        self.meter = BodyMeter::idle();
        self.trailers = None;
        self.broken = Some(Broken::ClientStalled(self.client_idle).into());
        self.draining = true;
        self.stalled = self.link.as_ref().map(ClientLink::stalled);
    }

    /// The upstream has nothing ready and nothing is held: ready once the upstream has been
    /// quiet for `idle` or the call has reached its deadline, and then the answer is broken
    /// off (it is incomplete, and the client must be able to tell).
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let due = (self.last_frame + self.idle).min(self.deadline);
            if Instant::now() >= due {
                break;
            }
            self.timer.as_mut().reset(due);
        }
        let (code, err) = if Instant::now() >= self.deadline {
            let total = self.deadline.duration_since(self.started);
            ("upstream_total_timeout", Broken::TotalTimeout(total))
        } else {
            ("upstream_stalled", Broken::Stalled(self.idle))
        };
        self.fail(code, err.into());
        Poll::Ready(())
    }

    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self;
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
            if this.ahead() >= AHEAD_BYTES {
                if this.meter.has_out() {
                    this.draining = true;
                    continue;
                }
                // Over HTTP/1, hyper holds that much the client's socket has not taken; the
                // upstream waits. hyper writes it right after this poll: when the socket is
                // full, its room wakes the connection; when it has room, nothing would, so the
                // relay asks to be polled again, once hyper has written.
                if !this.link.as_ref().is_some_and(ClientLink::blocked) {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
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
                    ready!(this.poll_deadlines(cx));
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
                    if this.done || this.ahead() >= AHEAD_BYTES {
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

impl<B> Drop for RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    fn drop(&mut self) {
        lock(&self.shared.relay).dropped();
    }
}

/// Reads the rest of a non-streamed answer whose client left or was given up on, through the
/// meter, and commits the call with `outcome` and the usage the answer reports. Bounded: at
/// most `server.max_body_bytes` more bytes, no gap longer than `idle`, nothing past
/// `deadline`; past a bound the upstream connection is closed and the usage estimated.
async fn read_rest<B>(
    mut inner: B,
    mut meter: BodyMeter,
    mut call: Call,
    idle: Duration,
    deadline: Instant,
    outcome: Outcome,
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
    call.commit(outcome);
}

impl<B> Body for RelayBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut relay = lock(&self.shared.relay);
        if relay.awaiting {
            relay.awaiting = false;
            relay.taken = relay.taken.wrapping_add(1);
        }
        let polled = relay.poll_relay(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            relay.handed += data.len() as u64;
            relay.awaiting = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.shared.relay).is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared.relay).size_hint()
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
        let (body, tx, _) = relay_watched(kind, idle, "1m");
        (body, tx)
    }

    /// A relay whose upstream may be quiet for `idle`, and its client for `client_idle`
    /// (`server.idle_timeout`); with the state, for its metrics.
    fn relay_watched(
        kind: crate::meter::stream::Kind,
        idle: Duration,
        client_idle: &str,
    ) -> (
        RelayBody<Fed>,
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Arc<AppState>,
    ) {
        let config = crate::config::Config::from_toml(&format!(
            "[server]\nidle_timeout = \"{client_idle}\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[[projects]]\nname = \"P\"\nid = \"proj_p\"\n"
        ))
        .expect("config");
        let snap = Snapshot::build(&config, Some("k")).expect("snapshot");
        let state = Arc::new(AppState::new(snap, Duration::from_secs(1)).expect("state"));
        let snap = state.snapshot.load_full();
        let call = Call::new(
            std::time::Instant::now(),
            axum::http::Method::POST,
            axum::http::Uri::from_static("/v1/chat/completions"),
            state.clone(),
            Arc::clone(&snap),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let body = RelayBody::new(
            Fed(rx),
            BodyMeter::new(kind, 10),
            call,
            true,
            idle,
            Instant::now() + Duration::from_hours(1),
            None,
        );
        (body, tx, state)
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
        {
            let relay = lock(&body.shared.relay);
            let call = relay.call.as_ref().expect("the call");
            assert_eq!(call.error_code, Some("upstream_stalled"));
            assert!(call.is_committed());
            assert!(relay.inner.is_none(), "the upstream is let go at once");
        }
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
        // Far more than AHEAD_BYTES queued at once: the relay must start handing out before
        // it has taken everything.
        for _ in 0..64 {
            tx.send(piece.clone()).expect("send");
        }
        match poll(&mut body) {
            Poll::Ready(Some(b)) => assert_eq!(b.len(), piece.len()),
            other => panic!("held instead of relayed: {other:?}"),
        }
        let held = lock(&body.shared.relay).meter.out_bytes();
        assert!(held < AHEAD_BYTES, "{held} bytes held");
    }

    /// Polls `body` once, as hyper does when it has room for more.
    async fn poll_once(
        body: &mut RelayBody<Fed>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    }

    /// Whether the relay gave its client up: its call committed and let go, its upstream too.
    fn given_up(body: &RelayBody<Fed>) -> bool {
        let relay = lock(&body.shared.relay);
        relay.done && relay.call.is_none() && relay.inner.is_none()
    }

    const EVENT: &[u8] = b"event: response.output_text.delta\ndata: {\"delta\":\"w\"}\n\n";

    /// Paused clock: it moves only when every task waits, straight to the next timer.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_for_idle_timeout_is_given_up_on() {
        let (mut body, tx, state) = relay_watched(
            crate::meter::stream::Kind::ResponsesStream,
            Duration::from_hours(1),
            "4s",
        );
        tx.send(Bytes::from_static(EVENT)).expect("send");
        tx.send(Bytes::from_static(EVENT)).expect("send");
        // hyper takes the events and, its client taking nothing, never polls again; the
        // upstream keeps sending.
        assert!(matches!(
            poll_once(&mut body).await,
            Poll::Ready(Some(Ok(_)))
        ));
        let handed = Instant::now();
        tx.send(Bytes::from_static(EVENT)).expect("send");
        while !given_up(&body) {
            assert!(handed.elapsed() < Duration::from_secs(6), "never given up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = handed.elapsed();
        assert!(
            after >= Duration::from_secs(4) && after <= Duration::from_secs(5),
            "given up {after:?} after the client last took something"
        );
        let metrics = state
            .metrics
            .render(None, &state.snapshot.load().budgets, 0);
        assert!(metrics.contains("outcome=\"client_stalled\""), "{metrics}");
        // Polled again (its client took something at last), the answer breaks off.
        match poll_once(&mut body).await {
            Poll::Ready(Some(Err(err))) => {
                assert!(err.to_string().contains("server.idle_timeout"), "{err}");
            }
            other => panic!("the answer went on: {other:?}"),
        }
        assert!(matches!(poll_once(&mut body).await, Poll::Ready(None)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_something_within_idle_timeout_is_kept() {
        let (mut body, tx, _state) = relay_watched(
            crate::meter::stream::Kind::ResponsesStream,
            Duration::from_hours(1),
            "4s",
        );
        // An event every 3 s, each taken when it comes: 30 s in all.
        for _ in 0..10 {
            tx.send(Bytes::from_static(EVENT)).expect("send");
            assert!(matches!(
                poll_once(&mut body).await,
                Poll::Ready(Some(Ok(_)))
            ));
            assert!(poll_once(&mut body).await.is_pending());
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(!given_up(&body));
        }
        // An upstream quiet for longer than the client's idle time is none of the client's
        // doing: nothing waits for it.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!given_up(&body));
    }
}
