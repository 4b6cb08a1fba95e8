//! Clients that stop reading their answer: each costs the process little memory (the relay
//! stops reading the upstream while the client's socket is full), and one that reads nothing
//! for `server.idle_timeout` is dropped and recorded `client_stalled`, over HTTP/1.1 and
//! HTTP/2. A client that reads slowly is not.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

/// One Responses stream event as bedrock-mantle sends it, about 110 bytes.
const DELTA: &[u8] = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"token \"}\n\n";

/// What the flooding upstream saw.
#[derive(Default)]
struct FloodState {
    /// Streams asked for.
    requests: AtomicUsize,
    /// Body bytes its sockets accepted, all streams together.
    written: AtomicU64,
    /// Streams whose connection the proxy closed.
    abandoned: AtomicUsize,
    changed: Notify,
}

/// A raw-TCP bedrock-mantle that answers every request with an endless Responses stream: one
/// event per chunk, every `gap` (none: as fast as its socket takes them). It counts what its
/// sockets accepted, and notes when the proxy closes a stream's connection.
struct Flood {
    url: String,
    state: Arc<FloodState>,
}

impl Flood {
    async fn start(gap: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(FloodState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(flood(conn, st.clone(), gap));
            }
        });
        Self { url, state }
    }

    fn written(&self) -> u64 {
        self.state.written.load(Ordering::SeqCst)
    }

    /// Waits (up to `within`) until `n` streams were asked for.
    async fn wait_requests(&self, n: usize, within: Duration) {
        self.wait(within, || self.state.requests.load(Ordering::SeqCst) >= n)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} of {n} streams asked for within {within:?}",
                    self.state.requests.load(Ordering::SeqCst)
                )
            });
    }

    /// Whether the proxy abandons `n` streams within `within`.
    async fn abandons_within(&self, n: usize, within: Duration) -> bool {
        self.wait(within, || self.state.abandoned.load(Ordering::SeqCst) >= n)
            .await
            .is_some()
    }

    async fn wait(&self, within: Duration, done: impl Fn() -> bool) -> Option<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done() {
                return Some(());
            }
            tokio::time::timeout_at(deadline, changed).await.ok()?;
        }
    }
}

async fn flood(mut conn: TcpStream, state: Arc<FloodState>, gap: Option<Duration>) {
    if read_raw_request(&mut conn).await.is_none() {
        return;
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.changed.notify_waiters();
    let head = format!("{SSE_HEAD}connection: close\r\n\r\n");
    let chunk = chunked(DELTA);
    let mut ok = conn.write_all(head.as_bytes()).await.is_ok();
    while ok {
        ok = conn.write_all(&chunk).await.is_ok();
        state
            .written
            .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if let Some(gap) = gap {
            // The pace of this upstream's events: its behaviour, not synchronisation.
            tokio::time::sleep(gap).await;
        }
    }
    state.abandoned.fetch_add(1, Ordering::SeqCst);
    state.changed.notify_waiters();
}

const STREAM_BODY: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#;

/// A streaming Responses call, as bytes on an HTTP/1.1 connection.
fn stream_request(addr: &str) -> Vec<u8> {
    format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    )
    .into_bytes()
}

/// A client socket whose receive buffer is as small as the kernel allows, so that a client
/// that does not read fills it at once.
async fn small_window_client(addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .connect(addr.parse().expect("address"))
        .await
        .expect("connect")
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Polls the resident memory of `pid` (every 250 ms, up to `within`) until it has settled:
/// five samples in a row within 0.5% of each other. Returns the last.
async fn settled_rss_kib(pid: u32, within: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + within;
    let mut samples = std::collections::VecDeque::new();
    loop {
        samples.push_back(rss_kib(pid));
        if samples.len() > 5 {
            samples.pop_front();
        }
        let (lo, hi) = (
            samples.iter().min().copied().unwrap_or(0),
            samples.iter().max().copied().unwrap_or(0),
        );
        if samples.len() == 5 && hi - lo <= hi / 200 {
            return hi;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy's memory kept growing for {within:?} with clients that read nothing: {samples:?} KiB"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Opens `n` streams against the real binary whose clients never read, waits until the
/// relay has stopped reading every upstream, and returns the resident memory they added to
/// the proxy, per stream, in KiB.
async fn stalled_stream_cost(n: usize, gap: Option<Duration>) -> u64 {
    let up = Flood::start(gap).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = format!(
        "[ledger]\npath = {:?}\n",
        dir.path().join("ledger.db").display().to_string()
    );
    let text = config_tuned(&up.url, "max_connections = 1000", "", &ledger);
    let (child, _logs, url) = binary::serve(dir.path(), &text, "info").await;
    let pid = child.id().expect("pid");
    let addr = url.trim_start_matches("http://").to_owned();

    // Warm up: threads, pools and allocator pages a first burst of calls needs.
    let mut warm = Vec::new();
    for _ in 0..n.min(50) {
        let mut conn = small_window_client(&addr).await;
        conn.write_all(&stream_request(&addr)).await.expect("send");
        warm.push(conn);
    }
    up.wait_requests(warm.len(), Duration::from_secs(20)).await;
    drop(warm);
    assert!(
        up.abandons_within(n.min(50), Duration::from_secs(20)).await,
        "the warm-up streams were not dropped when their clients left"
    );
    let before = settled_rss_kib(pid, Duration::from_secs(30)).await;

    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = small_window_client(&addr).await;
        conn.write_all(&stream_request(&addr)).await.expect("send");
        clients.push(conn);
    }
    up.wait_requests(n + n.min(50), Duration::from_secs(30))
        .await;
    let after = settled_rss_kib(pid, Duration::from_mins(1)).await;
    let per_stream = after.saturating_sub(before) / n as u64;
    report(&format!(
        "{n} stalled HTTP/1.1 streams ({}): RSS {before} KiB -> {after} KiB, {per_stream} KiB per stream; upstream wrote {} KiB in all",
        gap.map_or_else(
            || "upstream as fast as it can".to_owned(),
            |g| format!("an event every {g:?}")
        ),
        up.written() / 1024
    ));
    drop(clients);
    drop(child);
    per_stream
}

#[tokio::test]
async fn a_stalled_stream_costs_at_most_64_kib() {
    let flood = stalled_stream_cost(200, None).await;
    let paced = stalled_stream_cost(200, Some(Duration::from_millis(2))).await;
    assert!(
        flood <= 64 && paced <= 64,
        "a client that reads nothing costs {flood} KiB (flooding upstream) and {paced} KiB (paced upstream) per stream"
    );
}

/// The standard test config (in-process proxy, ledger readable) with `server.idle_timeout`.
fn with_idle(up: &str, idle: &str) -> String {
    config_tuned(up, &format!("idle_timeout = \"{idle}\""), "", "")
}

/// Reads (and throws away) until the proxy closes the connection; panics past `within`. A
/// reset counts as closed.
async fn wait_closed(conn: &mut TcpStream, within: Duration) {
    let mut sink = vec![0u8; 16 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the proxy kept the connection open past {within:?}"));
}

/// The value of a gauge or counter line `series` of `/metrics` (0 when absent).
async fn metric(proxy: &Proxy, series: &str) -> u64 {
    let text = proxy.metrics_text().await;
    assert!(text.contains("# EOF"), "not a metrics page: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a number"))
}

/// The one ledger record, once written.
async fn only_record(proxy: &Proxy) -> serde_json::Value {
    proxy.wait_for_records(1).await;
    let records = proxy.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    records.into_iter().next().expect("a record")
}

#[tokio::test]
async fn an_http1_client_that_reads_nothing_is_dropped_after_idle_timeout_and_recorded_stalled() {
    let up = Flood::start(None).await;
    let proxy = spawn_proxy(&with_idle(&up.url, "1s")).await;
    let mut client = small_window_client(proxy.addr()).await;
    client
        .write_all(&stream_request(proxy.addr()))
        .await
        .expect("send");
    up.wait_requests(1, Duration::from_secs(10)).await;
    let asked = std::time::Instant::now();
    assert!(
        up.abandons_within(1, Duration::from_secs(10)).await,
        "the proxy kept the upstream stream of a client that read nothing"
    );
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "given up on before idle_timeout: {:?}",
        asked.elapsed()
    );
    let record = only_record(&proxy).await;
    assert_eq!(record["outcome"], "client_stalled", "{record:#}");
    assert_eq!(record["error_code"], "client_stalled", "{record:#}");
    assert_eq!(record["stream"], 1);
    // The usage seen so far: the events the relay took from the upstream, estimated.
    assert_eq!(record["usage_source"], "estimated", "{record:#}");
    assert!(record["output_tokens"].as_u64() > Some(0), "{record:#}");
    assert_eq!(
        metric(&proxy, "mantlegate_in_flight_requests").await,
        0,
        "the call left the calls in flight"
    );
    let requests = proxy.metrics_text().await;
    assert!(
        requests.contains("outcome=\"client_stalled\""),
        "no client_stalled series: {requests}"
    );
    // The connection is closed: what the socket held, then the end.
    wait_closed(&mut client, Duration::from_secs(10)).await;
    let text = proxy.metrics_text().await;
    assert!(
        text.contains("mantlegate_client_connections_closed_total{reason=\"client_stalled\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_reads_a_little_every_100ms_is_not_dropped() {
    let up = Flood::start(None).await;
    let proxy = spawn_proxy(&with_idle(&up.url, "2s")).await;
    let mut client = small_window_client(proxy.addr()).await;
    client
        .write_all(&stream_request(proxy.addr()))
        .await
        .expect("send");
    up.wait_requests(1, Duration::from_secs(10)).await;
    // Two and a half idle_timeouts of slow reading: 4 KiB every 100 ms.
    let mut buf = vec![0u8; 4096];
    let mut read = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..50 {
        tick.tick().await;
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the proxy kept sending to a client that reads")
            .expect("read");
        assert!(
            n > 0,
            "the proxy closed a client that reads, after {read} bytes"
        );
        read += n;
    }
    assert_eq!(
        up.state.abandoned.load(Ordering::SeqCst),
        0,
        "the upstream stream of a reading client was dropped"
    );
    assert!(read > 50 * 1024, "{read} bytes read");
    assert_eq!(
        proxy.stats.written.load(Ordering::SeqCst),
        0,
        "no record yet"
    );
    // Hung up at last: an ordinary disconnect, not a stall.
    drop(client);
    assert!(up.abandons_within(1, Duration::from_secs(10)).await);
    let record = only_record(&proxy).await;
    assert_eq!(record["outcome"], "client_disconnect", "{record:#}");
}

/// An HTTP/2 client connection whose streams get no flow-control window at all; its
/// connection task runs (answering pings) until dropped.
async fn zero_window_h2(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(tcp)
        .await
        .expect("handshake");
    tokio::spawn(connection);
    client
}

fn h2_stream_request(proxy: &Proxy) -> axum::http::Request<()> {
    axum::http::Request::post(format!("{}/v1/responses", proxy.url))
        .header("authorization", format!("Bearer {CHAT_KEY}"))
        .header("content-type", "application/json")
        .header("content-length", STREAM_BODY.len())
        .body(())
        .expect("request")
}

#[tokio::test]
async fn an_http2_stream_whose_window_stays_at_zero_is_dropped_after_idle_timeout() {
    let up = Flood::start(None).await;
    let proxy = spawn_proxy(&with_idle(&up.url, "1s")).await;
    let client = zero_window_h2(proxy.addr()).await;
    let mut client = client.ready().await.expect("ready");
    let (answer, mut body) = client
        .send_request(h2_stream_request(&proxy), false)
        .expect("send");
    body.send_data(bytes::Bytes::from_static(STREAM_BODY.as_bytes()), true)
        .expect("data");
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(answer.status(), 200);
    let asked = std::time::Instant::now();
    assert!(
        up.abandons_within(1, Duration::from_secs(10)).await,
        "the proxy kept the upstream stream of an HTTP/2 stream with no window"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "{:?}",
        asked.elapsed()
    );
    let record = only_record(&proxy).await;
    assert_eq!(record["outcome"], "client_stalled", "{record:#}");
    assert_eq!(record["error_code"], "client_stalled", "{record:#}");
    assert_eq!(metric(&proxy, "mantlegate_in_flight_requests").await, 0);
    // The stream ends broken (reset, or its connection closed), never with a clean end.
    let mut body = answer.into_body();
    let end = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("the stream ended");
    assert!(
        matches!(end, Some(Err(_))),
        "a stalled stream ended as if whole: {end:?}"
    );
}

#[tokio::test]
async fn a_stalled_http2_stream_is_dropped_alone_while_its_sibling_reading_is_served() {
    let up = Flood::start(None).await;
    let proxy = spawn_proxy(&with_idle(&up.url, "1s")).await;
    // Each stream starts with 1 KiB of window: the stalled one never gives any back.
    let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1024)
        .initial_connection_window_size(1 << 20)
        .handshake(tcp)
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut answers = Vec::new();
    let mut client = client;
    for _ in 0..2 {
        client = client.ready().await.expect("ready");
        let (answer, mut body) = client
            .send_request(h2_stream_request(&proxy), false)
            .expect("send");
        body.send_data(bytes::Bytes::from_static(STREAM_BODY.as_bytes()), true)
            .expect("data");
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered")
            .expect("response");
        assert_eq!(answer.status(), 200);
        answers.push(answer.into_body());
    }
    let mut reading = answers.pop().expect("the sibling");
    let stalled = answers.pop().expect("the stalled stream");
    // The sibling reads (and gives its window back) for three idle_timeouts.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut read = 0usize;
    while tokio::time::Instant::now() < until {
        let chunk = tokio::time::timeout(Duration::from_secs(5), reading.data())
            .await
            .expect("the sibling kept getting data")
            .expect("more data")
            .expect("no error");
        read += chunk.len();
        reading
            .flow_control()
            .release_capacity(chunk.len())
            .expect("release");
    }
    assert!(read > 0);
    assert_eq!(
        up.state.abandoned.load(Ordering::SeqCst),
        1,
        "the stalled stream, and only it, was given up on"
    );
    let record = only_record(&proxy).await;
    assert_eq!(record["outcome"], "client_stalled", "{record:#}");
    drop((stalled, reading));
    assert!(up.abandons_within(2, Duration::from_secs(10)).await);
}
