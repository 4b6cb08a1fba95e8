//! The floor: a bare reverse proxy with none of mantlegate's work, built from the same
//! parts (the `hyper_util` server connection builder, mantlegate's own upstream client, the
//! same runtime and allocator). `bench/run.sh` measures it beside mantlegate and nginx when `BENCH_FLOOR=1`, so
//! the report shows how much of mantlegate's cost per call is the HTTP stack it is built on
//! and how much is its own (attribution, metering, ledger, metrics, access log).
//!
//! ```text
//! bench-floor --upstream 127.0.0.1:PORT [--listen 127.0.0.1:0] [--work-us N] [--client ours|hyper]
//! ```
//! Prints `listening on ADDR` once bound. Every request is forwarded as it came (the body read
//! whole first, as mantlegate does to find the model); the answer streams back as it arrives.
//!
//! `--work-us N` makes the floor busy-wait N µs of its own CPU on each request before
//! forwarding it: a stand-in for per-call work, to measure what a given amount of a proxy's
//! own work costs in the harness in all (user time, and the kernel time it drags along).
//!
//! `--client hyper` forwards through hyper's own HTTP/1 client (hyper-util's pooled client:
//! a task per connection, the body handed over through a channel) instead of mantlegate's
//! (`ours`, the default): measured side by side (`BENCH_FLOOR_CLIENT=hyper`, target
//! `floor-hyper`), the two floors weigh the hand-written client against hyper's.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use mantlegate::upstream::UpstreamClient;
use tokio::net::TcpListener;

/// The allocator mantlegate's binary uses (src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = UnsyncBoxBody<Bytes, axum::BoxError>;

/// The client calls are forwarded with (`--client`).
enum Upstream {
    /// mantlegate's own (src/upstream.rs).
    Ours(UpstreamClient),
    /// hyper's HTTP/1 client, pooled by hyper-util (boxed: it is large, and built once).
    Hyper(Box<HyperClient<HttpConnector, Full<Bytes>>>),
}

impl Upstream {
    /// The client named `name`, set up as mantlegate sets up its own: no Nagle delay, idle
    /// connections kept 30 s, HTTP/1.1 only.
    fn new(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "ours" => Self::Ours(mantlegate::upstream::client(
                std::time::Duration::from_secs(5),
            )?),
            "hyper" => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
                Self::Hyper(Box::new(
                    HyperClient::builder(TokioExecutor::new())
                        .pool_idle_timeout(std::time::Duration::from_secs(30))
                        .pool_timer(TokioTimer::new())
                        .build(connector),
                ))
            }
            other => anyhow::bail!("unknown client {other}: ours or hyper"),
        })
    }

    /// Sends `req`; the answer's body streams as it arrives.
    async fn send(&self, req: Request<Bytes>) -> Option<Response<Body>> {
        match self {
            Self::Ours(client) => client
                .request(&req)
                .await
                .ok()
                .map(|resp| resp.map(|b| b.map_err(Into::into).boxed_unsync())),
            Self::Hyper(client) => client
                .request(req.map(Full::new))
                .await
                .ok()
                .map(|resp| resp.map(|b| b.map_err(Into::into).boxed_unsync())),
        }
    }
}

struct Args {
    listen: SocketAddr,
    upstream: hyper::http::uri::Authority,
    work: std::time::Duration,
    client: String,
}

const USAGE: &str = "usage: bench-floor --upstream HOST:PORT [--listen 127.0.0.1:0] [--work-us N] [--client ours|hyper]";

fn parse_args() -> anyhow::Result<Args> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut upstream = None;
    let mut work = std::time::Duration::ZERO;
    let mut client = "ours".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value.parse().context("--listen")?,
            "--upstream" => upstream = Some(value.parse().context("--upstream")?),
            "--work-us" => {
                work = std::time::Duration::from_micros(value.parse().context("--work-us")?);
            }
            "--client" => client = value,
            other => anyhow::bail!("unknown argument {other}; {USAGE}"),
        }
    }
    Ok(Args {
        listen,
        upstream: upstream.context("--upstream HOST:PORT is required")?,
        work,
        client,
    })
}

/// Keeps the CPU busy for `work` (`--work-us`).
fn busy(work: std::time::Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

async fn forward(
    client: &Upstream,
    upstream: &hyper::http::uri::Authority,
    work: std::time::Duration,
    req: Request<Incoming>,
) -> Response<Body> {
    if !work.is_zero() {
        busy(work);
    }
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let mut uri = hyper::Uri::builder()
        .scheme("http")
        .authority(upstream.clone());
    if let Some(pq) = parts.uri.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    let Ok(uri) = uri.build() else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    parts.headers.remove(hyper::header::HOST);
    client
        .send(Request::from_parts(parts, body.to_bytes()))
        .await
        .unwrap_or_else(|| status(StatusCode::BAD_GATEWAY))
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code;
    resp
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = Upstream::new(&args.client)?;
    let shared = Arc::new((client, args.upstream, args.work));
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let shared = shared.clone();
        let service = tower::service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    forward(&shared.0, &shared.1, shared.2, req).await,
                )
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // The same choice as mantlegate's: one thread when only one CPU is available.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let runtime = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}
