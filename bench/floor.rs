//! The floor: a bare reverse proxy with none of mantlegate's work, built from the same
//! parts (the `hyper_util` server connection builder, mantlegate's own upstream client, the
//! same runtime and allocator). `bench/run.sh` measures it beside mantlegate and nginx when `BENCH_FLOOR=1`, so
//! the report shows how much of mantlegate's cost per call is the HTTP stack it is built on
//! and how much is its own (attribution, metering, ledger, metrics, access log).
//!
//! ```text
//! bench-floor --upstream 127.0.0.1:PORT [--listen 127.0.0.1:0] [--work-us N]
//! ```
//! Prints `listening on ADDR` once bound. Every request is forwarded as it came (the body read
//! whole first, as mantlegate does to find the model); the answer streams back as it arrives.
//!
//! `--work-us N` makes the floor busy-wait N µs of its own CPU on each request before
//! forwarding it: a stand-in for per-call work, to measure what a given amount of a proxy's
//! own work costs in the harness in all (user time, and the kernel time it drags along).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use mantlegate::upstream::UpstreamClient;
use tokio::net::TcpListener;

/// The allocator mantlegate's binary uses (src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = UpstreamClient;
type Body = UnsyncBoxBody<Bytes, mantlegate::upstream::Error>;

struct Args {
    listen: SocketAddr,
    upstream: hyper::http::uri::Authority,
    work: std::time::Duration,
}

const USAGE: &str = "usage: bench-floor --upstream HOST:PORT [--listen 127.0.0.1:0] [--work-us N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut upstream = None;
    let mut work = std::time::Duration::ZERO;
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
            other => anyhow::bail!("unknown argument {other}; {USAGE}"),
        }
    }
    Ok(Args {
        listen,
        upstream: upstream.context("--upstream HOST:PORT is required")?,
        work,
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
    match client
        .request(&Request::from_parts(parts, body.to_bytes()))
        .await
    {
        Ok(resp) => resp.map(BodyExt::boxed_unsync),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
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
    let client: Upstream = mantlegate::upstream::client(std::time::Duration::from_secs(5))?;
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
