//! `/admin/v1/*` and `/metrics`: operator endpoints. The admin API needs the admin bearer
//! token and is off (404) when none is configured; `/metrics` on the main listener needs the
//! admin token or the metrics token.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::error_body;
use crate::report;
use crate::state::AppState;

/// `GET /metrics` on the main listener: [`metrics`] for the admin token or the metrics token
/// (`[metrics] token_env`), else 401 with a body that names nothing of what the metrics hold.
pub async fn metrics_with_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Response {
    let given = bearer(&headers);
    let allowed = !given.is_empty() && {
        // Digests, as for the admin token: the comparison's time says nothing of a token.
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let admin = state
            .admin_token
            .as_ref()
            .is_some_and(|t| <[u8; 32]>::from(Sha256::digest(t.expose().as_bytes())) == digest);
        admin || state.snapshot.load().metrics_token_sha256 == Some(digest)
    };
    if !allowed {
        let mut response = admin_error(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "/metrics on this port needs `Authorization: Bearer <token>` with the admin token or the metrics token ([metrics] token_env); or scrape the address in [server] metrics_listen",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    metrics(State(state)).await
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let snap = state.snapshot.load();
    if let Some(store) = &snap.rate_store {
        state.metrics.observe_rate_store(&store.stats());
    }
    let text = state.metrics.render(
        state.ledger.as_ref().map(|l| &*l.stats),
        &snap.budgets,
        state.in_flight.load(std::sync::atomic::Ordering::Relaxed),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn admin_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        error_body(message, "invalid_request_error", None, code),
    )
        .into_response()
}

/// The bearer token of `Authorization`, empty when there is none.
fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("")
}

/// Checks the admin bearer token. `Err` is the response to send.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.admin_token else {
        return Err(Box::new(admin_error(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "the admin API is off: set [admin] token_env and that environment variable",
        )));
    };
    let given = bearer(headers);
    // Compare digests, not the secrets: equal-length values whose comparison time says
    // nothing about the token.
    let expected = Sha256::digest(token.expose().as_bytes());
    if given.is_empty() || Sha256::digest(given.as_bytes()) != expected {
        return Err(Box::new(admin_error(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "the admin API needs `Authorization: Bearer <admin token>`",
        )));
    }
    Ok(())
}

/// `GET /admin/v1/budgets`: each budget's limit, month-to-date spend, percentage, in-flight
/// reservations and month-end forecast.
pub async fn budgets(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let statuses = state.snapshot.load().budgets.statuses(now_ms);
    let body = serde_json::json!({ "object": "list", "data": statuses });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

/// Query of `GET /admin/v1/costs`.
#[derive(Debug, Deserialize)]
pub struct CostsQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

/// `GET /admin/v1/costs?from=&to=&group_by=&format=json|csv|focus|table`: the report of
/// `mantlegate report`, rendered as the CLI renders it (default `json`).
pub async fn costs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<CostsQuery>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let format = match q
        .format
        .as_deref()
        .unwrap_or("json")
        .parse::<report::Format>()
    {
        Ok(f) => f,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, "invalid_format", &e),
    };
    let group_by = q.group_by.as_deref().unwrap_or("project");
    if let Err(e) = report::check_dim_count(group_by) {
        return admin_error(StatusCode::BAD_REQUEST, "report_too_large", &e.to_string());
    }
    let dims = match report::parse_dims(group_by) {
        Ok(d) => d,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, "invalid_group_by", &e),
    };
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    let period = match report::period(q.from.as_deref(), q.to.as_deref(), today) {
        Ok(p) => p,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, "invalid_period", &e),
    };
    let Some(reader) = state.reader.clone() else {
        return admin_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger_unavailable",
            "this mantlegate has no ledger",
        );
    };
    let result = tokio::task::spawn_blocking(move || {
        let rows = reader.daily(&period)?;
        Ok::<_, anyhow::Error>(
            report::aggregate_within(&rows, &dims, period, report::MAX_GROUPS)
                .map(|r| report::render(&r, format)),
        )
    })
    .await;
    match result {
        Ok(Ok(Err(too_large))) => admin_error(
            StatusCode::BAD_REQUEST,
            "report_too_large",
            &too_large.to_string(),
        ),
        Ok(Ok(Ok(body))) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            body,
        )
            .into_response(),
        Ok(Err(err)) => {
            tracing::error!(error = %format!("{err:#}"), "cost report failed");
            admin_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "report_failed",
                "the report could not be read from the ledger; see the server log",
            )
        }
        Err(_) => admin_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "report_failed",
            "the report task failed",
        ),
    }
}

/// `GET /admin/v1/projects`: each project with its id, tags, the keys and routes that use it,
/// and its month-to-date spend (UTC month, from the ledger; zero when there is none) with
/// its unpriced calls apart.
pub async fn projects(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let snapshot = state.snapshot.load_full();
    let mut spend = std::collections::HashMap::new();
    if let Some(reader) = state.reader.clone() {
        let today = jiff::Timestamp::now()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date();
        let rows = tokio::task::spawn_blocking(move || {
            let period = report::period(None, None, today).map_err(anyhow::Error::msg)?;
            reader.daily(&period)
        })
        .await;
        match rows {
            Ok(Ok(rows)) => {
                for r in rows {
                    let entry: &mut crate::projects::MonthSpend =
                        spend.entry(r.project_id).or_default();
                    entry.cost_usd += rust_decimal::Decimal::new(r.cost_pico, 12);
                    entry.unpriced_requests =
                        entry.unpriced_requests.saturating_add(r.unpriced_requests);
                }
            }
            Ok(Err(err)) => {
                tracing::error!(error = %format!("{err:#}"), "project spend query failed");
                return admin_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "report_failed",
                    "the spend could not be read from the ledger; see the server log",
                );
            }
            Err(_) => {
                return admin_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "report_failed",
                    "the spend task failed",
                );
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        crate::projects::overview(&snapshot, &spend).to_string(),
    )
        .into_response()
}

/// `GET /admin/v1/keys`: every `[[keys]]` entry of the running config with its name,
/// fingerprint (the first 12 hex digits of its SHA-256, as the ledger's `key_fp` records it:
/// it tells a rotation's two entries apart), projects, expiry, state and last use from the
/// ledger. Never the SHA-256 itself, never a secret.
pub async fn keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let snapshot = state.snapshot.load_full();
    let last_used = match state.reader.clone() {
        None => std::collections::HashMap::new(),
        Some(reader) => match tokio::task::spawn_blocking(move || reader.last_used()).await {
            Ok(Ok(map)) => map,
            Ok(Err(err)) => {
                tracing::error!(error = %format!("{err:#}"), "key last-use query failed");
                return admin_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "report_failed",
                    "the keys' last use could not be read from the ledger; see the server log",
                );
            }
            Err(_) => {
                return admin_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "report_failed",
                    "the last-use task failed",
                );
            }
        },
    };
    let body = crate::keys::overview(&snapshot, &last_used, jiff::Timestamp::now());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}
