//! mantlegate: the attribution-enforcing reverse proxy in front of Amazon Bedrock's
//! bedrock-mantle endpoint. `router` builds the app, `serve` runs it.

pub mod admin;
pub mod attribution;
pub mod budget;
pub mod call;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod framing;
pub mod health;
pub mod keys;
pub mod ledger;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod policy;
pub mod pricing;
pub mod projects;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod report;
pub mod secret;
pub mod server;
pub mod sigv4;
pub mod state;
pub mod upstream;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ProxyError;
use crate::state::AppState;

/// The whole app. Layers, outermost first:
/// 1. `CatchPanicLayer`: a bug answers 500 `internal_error` (OpenAI-shaped, no panic text,
///    which could hold anything) instead of dropping the connection.
///
/// Routes: `/healthz` and `/readyz` (no key), `/admin/v1/*` (admin token), `/metrics` (the
/// admin token or the metrics token), everything else goes to [`proxy::handle`],
/// which classifies the path itself so that routes and endpoints can change on reload.
pub fn router(state: AppState) -> Router {
    routes(Arc::new(state)).0
}

/// mantlegate's own endpoints: the only routes of the router, whatever else goes to the
/// handler. [`App`] sends these paths to the router and no others, so this is the one list.
/// `/metrics` here asks for a token: the main listener is where every caller comes, and
/// the metrics name every project and its spend. The separate `server.metrics_listen`
/// ([`metrics_router`]) asks for none.
fn own_routes() -> [(&'static str, MethodRouter<Arc<AppState>>); 7] {
    [
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        ("/admin/v1/costs", get(admin::costs)),
        ("/admin/v1/budgets", get(admin::budgets)),
        ("/admin/v1/projects", get(admin::projects)),
        ("/admin/v1/keys", get(admin::keys)),
        ("/metrics", get(admin::metrics_with_token)),
    ]
}

/// [`router`] over shared state, and the paths it has routes for.
fn routes(state: Arc<AppState>) -> (Router, Vec<&'static str>) {
    let mut app = Router::new();
    let mut paths = Vec::new();
    for (path, route) in own_routes() {
        app = app.route(path, route);
        paths.push(path);
    }
    let app = app
        .fallback(proxy::handle)
        // Behind one `Arc`: axum clones the state for every request.
        .with_state(state)
        .layer(CatchPanicLayer::custom(panic_response));
    (app, paths)
}

/// What a connection serves: [`router`] for mantlegate's own endpoints, and every call to
/// forward straight to [`proxy::handle`], as the router's fallback would, panics caught the
/// same way. Going around the router saves what it costs a forwarded call: the route lookup,
/// the boxed service clone and the futures boxed around the handler's (measured in
/// bench/HISTORY.md).
#[derive(Clone)]
pub struct App {
    router: Router,
    /// The paths of the router's own routes ([`own_routes`]).
    own: Arc<[&'static str]>,
    state: Arc<AppState>,
}

impl App {
    /// The app over `state`.
    #[must_use]
    pub fn new(state: AppState) -> Self {
        let state = Arc::new(state);
        let (router, own) = routes(state.clone());
        Self {
            router,
            own: own.into(),
            state,
        }
    }
}

impl<B> tower::Service<axum::extract::Request<B>> for App
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        <Router as tower::Service<axum::extract::Request<B>>>::Future,
        futures_util::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The router is always ready, and so is the handler.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request<B>) -> Self::Future {
        use futures_util::FutureExt as _;
        use futures_util::future::Either;
        if self.own.contains(&req.uri().path()) {
            return Either::Left(self.router.call(req));
        }
        let state = self.state.clone();
        let req = req.map(axum::body::Body::new);
        // The handler's future is made inside the boxed one, not moved into it: it is large,
        // and each move of it is a copy.
        Either::Right(Box::pin(async move {
            Ok(
                std::panic::AssertUnwindSafe(proxy::handle(State(state), req))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(panic_response),
            )
        }))
    }
}

/// The router of a separate metrics listener (`server.metrics_listen`): `/metrics` only, with
/// no credentials (the operator keeps that address private).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(admin::metrics))
        .with_state(Arc::new(state))
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then lets calls in flight
/// finish for at most `drain_timeout`.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    // The in-process index of response ids only bridges the moment until the ledger has the
    // record: older entries are dropped (lookups then go to the ledger).
    let responses = state.responses.clone();
    let pruner = tokio::spawn(async move { responses.prune_periodically().await });
    let _stop_pruner = AbortOnDrop(pruner);
    // Our own accept loop rather than `axum::serve`: it bounds how long a connection may stay
    // silent or idle and how many may be open (`server`), and wraps each connection to refuse
    // requests whose length is ambiguous (`framing`).
    let snapshot = state.snapshot.clone();
    let metrics = state.metrics.clone();
    // Budget alert webhooks, delivered from the outbox beside the server and stopped with it.
    let webhooks = webhook::Running::start(state.clone());
    server::run(
        listener,
        App::new(state),
        &snapshot,
        metrics,
        shutdown,
        drain_timeout,
    )
    .await;
    webhooks.stop().await;
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn healthz() -> Response {
    json_status(StatusCode::OK, r#"{"status":"ok"}"#)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let ready = match &state.signer {
        Some(signer) => signer.preload().await.is_ok(),
        None => state.snapshot.load().upstream.authorization.is_some(),
    };
    if ready {
        json_status(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        json_status(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"not_ready","reason":"no upstream credentials: set the variable named by upstream.api_key_env (or, with auth = \"sigv4\", give the AWS credential chain credentials)"}"#,
        )
    }
}

fn json_status(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ProxyError::Internal.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_endpoints_are_exact_paths() {
        let with = own_routes().map(|(path, _)| path);
        for path in [
            "/healthz",
            "/readyz",
            "/admin/v1/costs",
            "/admin/v1/budgets",
            "/admin/v1/projects",
            "/admin/v1/keys",
            "/metrics",
        ] {
            assert!(with.contains(&path), "{path}");
        }
        // Exact paths only: anything near one is a call for the handler to classify.
        for path in [
            "",
            "/",
            "/v1/chat/completions",
            "/chatbot/v1/responses",
            "/healthz/",
            "/healthz?x=1",
            "/HEALTHZ",
            "/admin/v1/costs/x",
            "/admin/v1",
            "/metrics/",
        ] {
            assert!(!with.contains(&path), "{path}");
        }
    }
}
