//! The accept loop and the connections it serves: how long each may stay silent or idle, how
//! many may be open, and how they close on shutdown.
//!
//! Every accepted connection runs in its own task, raced against one timer and one wake-up:
//! - until its first complete request head (HTTP/2: a stream with complete headers), it is
//!   closed `header_read_timeout` after accept, whatever it sent (nothing, the HTTP/2 preface,
//!   SETTINGS, half a head);
//! - afterwards, while no request is in progress (an idle HTTP/1 keep-alive connection, an
//!   HTTP/2 connection with no open stream), it is closed `idle_timeout` after the last request
//!   ended, or `header_read_timeout` after a new HTTP/1 head began (looked at every
//!   `header_read_timeout`, so at most twice that), whichever comes first;
//! - past `max_connections`, a new connection closes the longest-idle one;
//! - on shutdown, idle connections close at once (HTTP/2 with GOAWAY) and busy ones as soon as
//!   their last request ends;
//! - once every request in progress on it is an answer the relay gave up on because the client
//!   stopped reading it ([`ClientLink::stalled`]), it is closed at once.
//!
//! Each request carries a [`ClientLink`] to its connection: over HTTP/1 the relay reads there
//! how much of its answer the client's socket has taken, so that it stops reading the upstream
//! while the client does not read, and notices a client that reads nothing at all. The socket
//! takes at most [`NOTSENT_LOWAT`] bytes it cannot send yet, so what it takes is what goes
//! towards the client.
//!
//! Closing is hyper's graceful shutdown (GOAWAY, or the end of keep-alive), then, after
//! [`CLOSE_GRACE`], the socket is dropped: a client that never answers the GOAWAY's ping
//! cannot hold it open. The request path pays a few atomic operations and a clock read per
//! request (at its start and end); a read pays a branch, and an atomic store only where a
//! head begins or ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::Service;

use crate::config::ServerConfig;
use crate::framing;
use crate::metrics::Metrics;
use crate::state::Snapshot;

/// How long a closing connection is given to say goodbye (flush a GOAWAY, have its ping
/// answered) once no request is in progress, before its socket is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// File descriptors kept out of `max_connections` when it is derived: the ledger, logs,
/// listeners, the rate-limit store and the fleet's database (at most a quarter of the limit).
const RESERVED_FDS: u64 = 256;

/// The most connections a derived `max_connections` allows, whatever the descriptor limit:
/// past it, finding the longest-idle connection to close costs too long a scan.
const MAX_DERIVED_CONNECTIONS: u64 = 200_000;

/// How long the accept loop waits after its first failure; doubled on each failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest wait after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this long for accept failures and for a full connection table.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// HTTP/2 keep-alive pings: how long a ping may go unanswered before the connection closes.
const PING_TIMEOUT_MAX: Duration = Duration::from_secs(20);

/// Bytes a client's socket may hold that it has not sent yet (`TCP_NOTSENT_LOWAT`): past it,
/// writes wait. Without it the kernel grows a socket's send buffer to megabytes, takes that
/// much of an answer from a client that reads nothing, and only wakes a writer again once a
/// third of it has drained, so a slow reader would look like one that reads nothing.
pub const NOTSENT_LOWAT: u32 = 16 * 1024;

/// The most an HTTP/2 stream's answer waits in the connection's send buffer (hyper's default
/// is 400 KiB): a stream whose client grants no flow-control window holds no more than this.
const H2_MAX_SEND_BUF: usize = 16 * 1024;

/// The connection limits of `[server]`: read from the live config at each accept, so a reload
/// applies to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See `server.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// See `server.idle_timeout`.
    pub idle_timeout: Duration,
    /// See `server.request_body_timeout`.
    pub request_body_timeout: Duration,
    /// See `server.max_connections` (`None`: derived from the descriptor limit).
    pub max_connections: Option<usize>,
}

impl Limits {
    /// The limits a `[server]` table sets.
    #[must_use]
    pub fn of(server: &ServerConfig) -> Self {
        Self {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            request_body_timeout: server.request_body_timeout,
            max_connections: server.max_connections,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::of(&ServerConfig::default())
    }
}

/// Raises the soft limit of open files to the hard limit (a no-op where the soft one already
/// is); returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// `max_connections` when the config leaves it unset: half of the descriptors left after
/// [`RESERVED_FDS`] (the other half for the upstream connections calls open), at least 16.
#[must_use]
pub fn derived_max_connections(fd_limit: u64) -> usize {
    let reserved = RESERVED_FDS.min(fd_limit / 4);
    let n = (fd_limit.saturating_sub(reserved) / 2).clamp(16, MAX_DERIVED_CONNECTIONS);
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Signals to a connection's task.
const EVICT: u8 = 1;
const DRAIN: u8 = 2;

/// What the accept loop and a connection's task share about it.
struct Conn {
    accepted: Instant,
    heads: Arc<framing::Heads>,
    /// Requests in progress: from the complete head to the end of the answer.
    active: AtomicU32,
    /// Whether a request head was ever complete.
    served: AtomicBool,
    /// Milliseconds after `accepted` when the last request ended (0 until then).
    ended_ms: AtomicU64,
    /// [`EVICT`] and [`DRAIN`] bits.
    signal: AtomicU8,
    /// Set by the task once it is closing: then the end of the last request wakes it.
    closing: AtomicBool,
    /// Answers in progress the relay gave up on because their client stopped reading.
    stalled: AtomicU32,
    /// Bytes the socket has taken (see [`Watched`]).
    taken: AtomicU64,
    /// The socket's last write found it full, and it has taken nothing since.
    blocked: AtomicBool,
    wake: Notify,
}

impl Conn {
    fn new(heads: Arc<framing::Heads>) -> Self {
        Self {
            accepted: heads.accepted(),
            heads,
            active: AtomicU32::new(0),
            served: AtomicBool::new(false),
            ended_ms: AtomicU64::new(0),
            signal: AtomicU8::new(0),
            closing: AtomicBool::new(false),
            stalled: AtomicU32::new(0),
            taken: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Since when the connection has had no request in progress (meaningful when none is).
    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_millis(self.ended_ms.load(Ordering::Acquire))
    }

    fn signal(&self, bit: u8) {
        self.signal.fetch_or(bit, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Whether every request in progress is an answer given up on (and at least one is).
    fn all_stalled(&self) -> bool {
        let stalled = self.stalled.load(Ordering::Acquire);
        stalled > 0 && stalled >= self.active.load(Ordering::Acquire)
    }
}

/// What the relay of an answer knows of the client connection it goes out on. Every request
/// carries one in its extensions.
#[derive(Clone)]
pub struct ClientLink {
    conn: Arc<Conn>,
    http1: bool,
}

impl ClientLink {
    /// Whether the connection speaks HTTP/1 (one answer at a time, alone on its socket).
    #[must_use]
    pub fn is_http1(&self) -> bool {
        self.http1
    }

    /// Bytes the connection's socket has taken since it was accepted (heads and framing
    /// included).
    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.conn.taken.load(Ordering::Relaxed)
    }

    /// Whether the socket's last write found it full, and it has taken nothing since: the
    /// connection has bytes to send that the client does not take.
    #[must_use]
    pub fn blocked(&self) -> bool {
        self.conn.blocked.load(Ordering::Relaxed)
    }

    /// The relay gave up on this request's answer because the client stopped reading it (its
    /// call is committed, its upstream let go). Once every request in progress on the
    /// connection is in that state, the connection closes; the mark lasts until dropped, with
    /// the answer.
    #[must_use]
    pub fn stalled(&self) -> StalledMark {
        self.conn.stalled.fetch_add(1, Ordering::AcqRel);
        self.conn.wake.notify_one();
        StalledMark(self.conn.clone())
    }
}

/// An answer given up on ([`ClientLink::stalled`]), until dropped.
pub struct StalledMark(Arc<Conn>);

impl Drop for StalledMark {
    fn drop(&mut self) {
        self.0.stalled.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A client's socket, counting what it takes into [`Conn`]: one store per write, and one
    /// more when it turns full or takes bytes again.
    struct Watched<IO> {
        #[pin]
        io: IO,
        conn: Arc<Conn>,
        accepted: u64,
        blocked: bool,
    }
}

impl<IO> Watched<IO> {
    fn new(io: IO, conn: Arc<Conn>) -> Self {
        Self {
            io,
            conn,
            accepted: 0,
            blocked: false,
        }
    }
}

/// Counts a write's result into the connection's figures.
fn note_write(
    result: &Poll<std::io::Result<usize>>,
    conn: &Conn,
    accepted: &mut u64,
    blocked: &mut bool,
) {
    match result {
        Poll::Ready(Ok(n)) if *n > 0 => {
            *accepted += *n as u64;
            conn.taken.store(*accepted, Ordering::Relaxed);
            if *blocked {
                *blocked = false;
                conn.blocked.store(false, Ordering::Relaxed);
            }
        }
        Poll::Pending if !*blocked => {
            *blocked = true;
            conn.blocked.store(true, Ordering::Relaxed);
        }
        _ => {}
    }
}

impl<IO: tokio::io::AsyncRead> tokio::io::AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write(cx, buf);
        note_write(&result, this.conn, this.accepted, this.blocked);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write_vectored(cx, bufs);
        note_write(&result, this.conn, this.accepted, this.blocked);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Every open connection, for the accept loop to find the longest-idle one and for shutdown
/// to reach them all. Locked on accept and on a connection's end only, never across an await.
struct Registry {
    slots: Mutex<Slots>,
    metrics: Arc<Metrics>,
    /// Notified when the last connection ends.
    empty: Notify,
    live: AtomicUsize,
}

#[derive(Default)]
struct Slots {
    conns: Vec<Option<Arc<Conn>>>,
    free: Vec<usize>,
}

impl Registry {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            metrics,
            empty: Notify::new(),
            live: AtomicUsize::new(0),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic elsewhere while holding it leaves a consistent table: go on with it.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, conn: Arc<Conn>) -> usize {
        let mut slots = self.slots();
        self.live.fetch_add(1, Ordering::AcqRel);
        self.metrics.connection(true);
        if let Some(i) = slots.free.pop() {
            slots.conns[i] = Some(conn);
            i
        } else {
            slots.conns.push(Some(conn));
            slots.conns.len() - 1
        }
    }

    fn remove(&self, i: usize) {
        let mut slots = self.slots();
        if let Some(slot) = slots.conns.get_mut(i)
            && slot.take().is_some()
        {
            slots.free.push(i);
            self.metrics.connection(false);
            if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.empty.notify_waiters();
            }
        }
    }

    /// Connections open and not being evicted.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.slots()
            .conns
            .iter()
            .flatten()
            .filter(|c| c.signal.load(Ordering::Acquire) & EVICT == 0)
            .count()
    }

    /// Makes room for one more connection under `max`: true when there is room, by closing
    /// the connection idle the longest if need be; false when every connection is busy. One
    /// scan of the table, only when it looks full.
    fn make_room(&self, max: usize) -> bool {
        if self.live.load(Ordering::Acquire) < max {
            return true;
        }
        let slots = self.slots();
        let mut open = 0;
        let mut oldest: Option<&Arc<Conn>> = None;
        for conn in slots.conns.iter().flatten() {
            if conn.signal.load(Ordering::Acquire) & EVICT != 0 {
                // Already closing: its slot is as good as free.
                continue;
            }
            open += 1;
            if conn.active.load(Ordering::Acquire) == 0
                && oldest.is_none_or(|o| conn.idle_since() < o.idle_since())
            {
                oldest = Some(conn);
            }
        }
        if open < max {
            return true;
        }
        match oldest {
            Some(conn) => {
                conn.signal(EVICT);
                self.metrics.connection_closed("evicted");
                true
            }
            None => false,
        }
    }

    /// Closes the connection idle the longest (none: every connection is busy).
    fn evict_longest_idle(&self) -> bool {
        self.make_room(0)
    }

    fn signal_all(&self, bit: u8) {
        for conn in self.slots().conns.iter().flatten() {
            conn.signal(bit);
        }
    }

    async fn wait_empty(&self) {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Registered {
    registry: Arc<Registry>,
    slot: usize,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.slot);
    }
}

/// Logs at most one line per [`LOG_EVERY`], counting the ones left out.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(left out since the last line)` when a line may be written now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The HTTP/1 and HTTP/2 settings of connections accepted under `limits`.
fn builder(limits: &Limits) -> ConnBuilder<TokioExecutor> {
    let mut builder = ConnBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection's own timer enforces `header_read_timeout` from accept and
        // `idle_timeout` between requests; hyper's, which runs from the end of the previous
        // answer, would close idle keep-alive connections early. It stays as a backstop.
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout)
        .max_buf_size(framing::MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        // A client that stops answering pings (gone, or hostile) is dropped even while a
        // stream is open.
        .keep_alive_interval(limits.idle_timeout)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .keep_alive_timeout(limits.idle_timeout.min(PING_TIMEOUT_MAX))
        // h2's defaults, stated: streams a client resets before they are served (the rapid
        // reset attack) and streams refused for protocol errors end the connection with
        // GOAWAY past these; a header block (HEADERS and its CONTINUATIONs) larger than
        // 16 KiB is refused.
        .max_concurrent_streams(200)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(16 * 1024);
    builder
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in progress finish
/// for at most `drain_timeout`. `snapshot` is the live config, for the connection limits.
pub async fn run(
    listener: TcpListener,
    app: crate::App,
    snapshot: &ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) {
    let registry = Arc::new(Registry::new(metrics));
    let derived = derived_max_connections(
        rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
    );
    let mut limits = snapshot.load().connections;
    let mut conn_builder = builder(&limits);
    let mut accept_backoff = ACCEPT_BACKOFF_MIN;
    let mut accept_log = Throttle::default();
    let mut full_log = Throttle::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                accept_backoff = ACCEPT_BACKOFF_MIN;
                conn
            }
            Err(err) => {
                // Out of file descriptors: the longest-idle connection gives its up.
                let exhausted = err.raw_os_error().is_some_and(|e| e == 24 || e == 23);
                if exhausted {
                    registry.evict_longest_idle();
                }
                if let Some(suppressed) = accept_log.ready() {
                    tracing::error!(%err, suppressed, "accept failed");
                }
                // Back off instead of spinning on an error that persists.
                tokio::select! {
                    () = tokio::time::sleep(accept_backoff) => {}
                    () = &mut shutdown => break,
                }
                accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let now_limits = snapshot.load().connections;
        if now_limits != limits {
            limits = now_limits;
            conn_builder = builder(&limits);
        }
        let max = limits.max_connections.unwrap_or(derived);
        if registry.live.load(Ordering::Acquire) >= max {
            // Full: the longest-idle connection makes room; with none idle, the new one is
            // turned away.
            let room = registry.make_room(max);
            if let Some(suppressed) = full_log.ready() {
                tracing::warn!(
                    max_connections = max,
                    suppressed,
                    "connection limit reached: closing the longest-idle connections"
                );
            }
            if !room {
                registry.metrics.connection_closed("refused");
                drop(stream);
                continue;
            }
        }
        tune(&stream);
        let heads = Arc::new(framing::Heads::new(Instant::now()));
        let conn = Arc::new(Conn::new(heads.clone()));
        let io = TokioIo::new(Watched::new(
            framing::Inspected::new(stream, heads.clone(), peer),
            conn.clone(),
        ));
        let service = TowerToHyperService::new(Tracked {
            inner: framing::Guarded::new(app.clone(), heads, peer),
            conn: conn.clone(),
        });
        let connection = conn_builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let registered = Registered {
            slot: registry.insert(conn.clone()),
            registry: registry.clone(),
        };
        tokio::spawn(async move {
            drive(connection, &conn, limits, &registered.registry.metrics).await;
            drop(registered);
        });
    }
    drop(listener);
    tracing::info!(
        drain_timeout_s = drain_timeout.as_secs_f64(),
        connections = registry.live.load(Ordering::Acquire),
        "shutting down: draining calls in flight"
    );
    registry.signal_all(DRAIN);
    let open = registry.live.load(Ordering::Acquire);
    registry.metrics.connection_closed_n("shutdown", open);
    tokio::select! {
        () = registry.wait_empty() => {}
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain timeout reached: closing calls still in flight");
            registry.signal_all(EVICT);
        }
    }
}

/// Socket options of an accepted connection.
fn tune(stream: &tokio::net::TcpStream) {
    // Small writes (stream events) leave at once: without TCP_NODELAY, Nagle's algorithm and
    // delayed ACKs hold them back by up to 40 ms.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "cannot set TCP_NODELAY");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(%err, "cannot set TCP_NOTSENT_LOWAT");
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Closing, a request still in progress: the end of the last one wakes the task.
    Busy,
    /// Closing, nothing in progress: the socket is dropped at this instant.
    Until(Instant),
}

/// Runs one connection to its end under its timers and signals (see the module docs).
async fn drive(
    connection: impl GracefulConnection,
    conn: &Conn,
    limits: Limits,
    metrics: &Metrics,
) {
    let mut connection = std::pin::pin!(connection);
    let timer = tokio::time::sleep_until((conn.accepted + limits.header_read_timeout).into());
    tokio::pin!(timer);
    let mut phase = Phase::Open;
    loop {
        tokio::select! {
            biased;
            // First: a request given up on breaks its answer off when next polled, and the
            // connection would end on that error before its closing is counted.
            () = conn.wake.notified() => {
                let now = Instant::now();
                let signal = conn.signal.load(Ordering::Acquire);
                if signal & EVICT != 0 {
                    return;
                }
                if conn.all_stalled() {
                    // Nothing in progress but answers whose clients read nothing: a graceful
                    // close would wait on them, and the socket may take nothing more.
                    tracing::debug!("closing a connection whose client reads nothing");
                    metrics.connection_closed("client_stalled");
                    return;
                }
                phase = match phase {
                    Phase::Open if signal & DRAIN != 0 => {
                        begin_closing(connection.as_mut(), conn, now)
                    }
                    Phase::Busy => closing(conn, now),
                    // A wake-up with nothing new: the timer stands.
                    _ => continue,
                };
            }
            // Errors here are the client's (reset, bad framing): nothing to do but end.
            _ = connection.as_mut() => return,
            () = &mut timer => {
                let now = Instant::now();
                phase = match phase {
                    Phase::Until(hard) if now >= hard => return,
                    Phase::Until(_) | Phase::Busy => closing(conn, now),
                    Phase::Open => match open_deadline(conn, &limits, now) {
                        Ok(next) => {
                            timer.as_mut().reset(next.into());
                            continue;
                        }
                        Err(why) => {
                            tracing::debug!(why, "closing a connection");
                            metrics.connection_closed(why);
                            begin_closing(connection.as_mut(), conn, now)
                        }
                    },
                };
            }
        }
        // Busy: the timer only looks again now and then; the last request's end wakes it.
        let at = match phase {
            Phase::Until(hard) => hard,
            Phase::Open | Phase::Busy => Instant::now() + limits.idle_timeout,
        };
        timer.as_mut().reset(at.into());
    }
}

/// Starts closing: hyper's graceful shutdown (GOAWAY, or no more keep-alive).
fn begin_closing<C: GracefulConnection + ?Sized>(
    connection: Pin<&mut C>,
    conn: &Conn,
    now: Instant,
) -> Phase {
    conn.closing.store(true, Ordering::Release);
    connection.graceful_shutdown();
    closing(conn, now)
}

/// A closing connection's phase: the socket dropped [`CLOSE_GRACE`] from now when no request
/// is in progress, else not yet.
fn closing(conn: &Conn, now: Instant) -> Phase {
    if conn.active.load(Ordering::Acquire) == 0 {
        Phase::Until(now + CLOSE_GRACE)
    } else {
        Phase::Busy
    }
}

/// When an open connection is next looked at, or why it is to close now.
///
/// Nothing wakes the task when an HTTP/1 head begins: it looks at least every
/// `header_read_timeout`, so a head begun on a keep-alive connection is cut at most that
/// late.
fn open_deadline(conn: &Conn, limits: &Limits, now: Instant) -> Result<Instant, &'static str> {
    let next_look = now + limits.header_read_timeout.min(limits.idle_timeout);
    if conn.active.load(Ordering::Acquire) > 0 {
        // Busy: looked at again later (the request's own timeouts bound it).
        return Ok(next_look);
    }
    let (mut deadline, mut why) = if conn.served.load(Ordering::Acquire) {
        (conn.idle_since() + limits.idle_timeout, "idle_timeout")
    } else {
        (
            conn.accepted + limits.header_read_timeout,
            "header_read_timeout",
        )
    };
    if let Some(began) = conn.heads.head_started() {
        let head = conn.accepted + began + limits.header_read_timeout;
        if head < deadline {
            (deadline, why) = (head, "header_read_timeout");
        }
    }
    if now >= deadline {
        Err(why)
    } else {
        Ok(deadline.min(next_look))
    }
}

/// The app as a connection serves it, counting its requests in progress: from the complete
/// head until the answer's body is done (sent whole, or dropped).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
}

/// One request in progress on its connection.
struct Active(Arc<Conn>);

impl Active {
    fn begin(conn: &Arc<Conn>) -> Self {
        conn.served.store(true, Ordering::Release);
        conn.active.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let conn = &self.0;
        // Stored before the count drops: whoever sees no request in progress sees when the
        // last one ended.
        let ms = u64::try_from(conn.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        conn.ended_ms.store(ms, Ordering::Release);
        let last = conn.active.fetch_sub(1, Ordering::AcqRel) == 1;
        // With answers given up on still in progress, the end of another request may leave
        // only those: the task looks again.
        if (last && conn.closing.load(Ordering::Acquire))
            || conn.stalled.load(Ordering::Acquire) > 0
        {
            conn.wake.notify_one();
        }
    }
}

impl<S, B> Service<axum::http::Request<B>> for Tracked<S>
where
    S: Service<axum::http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = axum::http::Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let active = Active::begin(&self.conn);
        let http1 = req.version() < axum::http::Version::HTTP_2;
        req.extensions_mut().insert(ClientLink {
            conn: self.conn.clone(),
            http1,
        });
        TrackedFuture {
            inner: self.inner.call(req),
            active: Some(active),
        }
    }
}

pin_project_lite::pin_project! {
    /// The app's answer, its body carrying the request's [`Active`].
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        active: Option<Active>,
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<axum::http::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let active = this.active.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            inner: body,
            _active: active,
        })))
    }
}

pin_project_lite::pin_project! {
    /// An answer's body; the request is in progress until it is dropped.
    struct TrackedBody {
        #[pin]
        inner: Body,
        _active: Option<Active>,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_connection_limit_leaves_room_for_upstreams_and_files() {
        // The limit that made silent sockets take the server down: about a third of it.
        assert_eq!(derived_max_connections(256), 96);
        assert_eq!(derived_max_connections(1024), 384);
        assert_eq!(derived_max_connections(65_536), 32_640);
        assert_eq!(derived_max_connections(0), 16);
        assert_eq!(derived_max_connections(u64::MAX), 200_000);
    }

    fn conn() -> Arc<Conn> {
        Arc::new(Conn::new(Arc::new(framing::Heads::new(Instant::now()))))
    }

    #[test]
    fn deadlines_follow_the_connection_s_phase() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_mins(1),
            ..Limits::default()
        };
        let c = conn();
        let at = c.accepted;
        // Before any head: from accept.
        assert_eq!(
            open_deadline(&c, &limits, at),
            Ok(at + limits.header_read_timeout)
        );
        assert!(open_deadline(&c, &limits, at + Duration::from_secs(10)).is_err());
        // While a request is in progress: never closed, looked at again later.
        let active = Active::begin(&c);
        let later = at + Duration::from_secs(30);
        let look = limits.header_read_timeout;
        assert_eq!(open_deadline(&c, &limits, later), Ok(later + look));
        drop(active);
        // Idle after it: from its end, looked at every header_read_timeout meanwhile.
        let idle = c.idle_since();
        assert_eq!(open_deadline(&c, &limits, idle), Ok(idle + look));
        let almost = idle + Duration::from_secs(59);
        assert_eq!(
            open_deadline(&c, &limits, almost),
            Ok(idle + limits.idle_timeout)
        );
        assert_eq!(
            open_deadline(&c, &limits, idle + limits.idle_timeout),
            Err("idle_timeout")
        );
    }

    #[test]
    fn the_longest_idle_connection_is_evicted_and_never_a_busy_one() {
        let registry = Registry::new(Arc::new(Metrics::new()));
        let (old, young, busy) = (conn(), conn(), conn());
        young.ended_ms.store(5_000, Ordering::Release);
        let _active = Active::begin(&busy);
        for c in [&busy, &young, &old] {
            registry.insert(c.clone());
        }
        assert_eq!(registry.open(), 3);
        assert!(registry.evict_longest_idle());
        assert_ne!(
            old.signal.load(Ordering::Acquire) & EVICT,
            0,
            "oldest first"
        );
        assert!(registry.evict_longest_idle());
        assert_ne!(young.signal.load(Ordering::Acquire) & EVICT, 0);
        assert!(!registry.evict_longest_idle(), "a busy connection is kept");
        assert_eq!(registry.open(), 1);
    }
}
