//! Budget alert webhooks against hostile endpoints: one that hangs, one that redirects, one
//! that fails then takes the alert; an alert surviving a restart in the SQLite outbox; and two
//! replicas sharing the `PostgreSQL` outbox delivering each alert once (that test is skipped
//! unless `MANTLEGATE_TEST_POSTGRES_URL` is set).

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{serve_file, stop};
use common::pg::TestDb;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// What the hook does with one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// Reads the request and never answers; notes when the sender hangs up.
    Hang,
    /// Answers this status (a 302 with a `location` to [`Hook::elsewhere`]) and closes.
    Status(u16),
    /// Answers this status after taking this long over it.
    Slow(u16, Duration),
}

/// One request the hook read.
#[derive(Debug, Clone)]
struct Got {
    head: String,
    body: String,
    at: Instant,
    /// The status it was answered (None: left hanging).
    answered: Option<u16>,
}

impl Got {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn key(&self) -> String {
        self.header("idempotency-key")
            .unwrap_or_else(|| panic!("no Idempotency-Key: {}", self.head))
    }
}

#[derive(Default)]
struct HookState {
    /// The n-th request gets `plan[min(n, len - 1)]`.
    plan: Mutex<Vec<Reply>>,
    got: Mutex<Vec<Got>>,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
    /// Requests read and not answered yet (a hanging one until its sender hangs up), and the
    /// most at once.
    busy: AtomicUsize,
    max_busy: AtomicUsize,
    changed: Notify,
}

/// A raw-TCP webhook endpoint on port 0 that misbehaves on purpose.
struct Hook {
    url: String,
    /// Where its 302 points: a second listener that counts connections.
    elsewhere: Arc<AtomicUsize>,
    state: Arc<HookState>,
}

impl Hook {
    async fn start(plan: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let other = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let other_addr = other.local_addr().expect("addr");
        let elsewhere = Arc::new(AtomicUsize::new(0));
        let counted = elsewhere.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = other.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        let state = Arc::new(HookState {
            plan: Mutex::new(plan),
            ..HookState::default()
        });
        let st = state.clone();
        let location = format!("http://{other_addr}/elsewhere");
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(hook_conn(conn, st.clone(), location.clone()));
            }
        });
        Self {
            url: format!("http://{addr}/hooks/T0KEN-SECRET?sig=s3cr3t"),
            elsewhere,
            state,
        }
    }

    fn set_plan(&self, plan: Vec<Reply>) {
        *self.state.plan.lock().expect("lock") = plan;
    }

    fn got(&self) -> Vec<Got> {
        self.state.got.lock().expect("lock").clone()
    }

    fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    fn max_busy(&self) -> usize {
        self.state.max_busy.load(Ordering::SeqCst)
    }

    /// Waits (up to `within`) until `cond` holds for the requests read so far.
    async fn wait(&self, within: Duration, what: &str, cond: impl Fn(&[Got]) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cond(&self.got()) {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, changed).await.is_ok(),
                "not within {within:?}: {what}; the hook got {:#?}",
                self.got()
            );
        }
    }
}

async fn hook_conn(mut conn: tokio::net::TcpStream, state: Arc<HookState>, location: String) {
    let now_open = state.open.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_open.fetch_max(now_open, Ordering::SeqCst);
    let mut chunk = [0u8; 4096];
    let hanging = match read_request(&mut conn).await {
        Some((head, body)) => answer(&mut conn, &state, &location, head, body).await,
        None => false,
    };
    // Until the sender hangs up (a hanging answer: for as long as it keeps the socket).
    while matches!(conn.read(&mut chunk).await, Ok(n) if n > 0) {}
    if hanging {
        state.busy.fetch_sub(1, Ordering::SeqCst);
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
    state.changed.notify_waiters();
}

/// The head and the body its content-length announces; None when the sender stops first.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match conn.read(&mut chunk).await {
            Ok(n) if n > 0 && buf.len() < 65_536 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + 4 + length {
        match conn.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
    Some((head, String::from_utf8_lossy(&buf[end + 4..]).into_owned()))
}

/// Records the request and answers it as the plan says; true when it is left hanging (still
/// counted busy).
async fn answer(
    conn: &mut tokio::net::TcpStream,
    state: &HookState,
    location: &str,
    head: String,
    body: String,
) -> bool {
    let reply = {
        let plan = state.plan.lock().expect("lock");
        let mut got = state.got.lock().expect("lock");
        let reply = plan[got.len().min(plan.len() - 1)];
        got.push(Got {
            head,
            body,
            at: Instant::now(),
            answered: match reply {
                Reply::Hang => None,
                Reply::Status(s) | Reply::Slow(s, _) => Some(s),
            },
        });
        reply
    };
    let now_busy = state.busy.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_busy.fetch_max(now_busy, Ordering::SeqCst);
    state.changed.notify_waiters();
    let status = match reply {
        Reply::Hang => return true,
        Reply::Status(s) => s,
        Reply::Slow(s, after) => {
            // The endpoint's own pace, not synchronisation.
            tokio::time::sleep(after).await;
            s
        }
    };
    let extra = if status == 302 {
        format!("location: {location}\r\n")
    } else {
        String::new()
    };
    let _ = conn
        .write_all(
            format!(
                "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n{extra}\r\nok"
            )
            .as_bytes(),
        )
        .await;
    let _ = conn.shutdown().await;
    state.busy.fetch_sub(1, Ordering::SeqCst);
    false
}

/// A call costing about $0.06 (100k output tokens at $0.60 per million).
const CAPPED: &str = r#"{"model":"openai.gpt-oss-120b","max_tokens":100000,"messages":[{"role":"user","content":"hi"}]}"#;

/// The standard config with a $0.60 budget on Chatbot alerting at `alert_at`, and the hook.
fn hooked(upstream: &str, hook: &Hook, alert_at: &str) -> String {
    config(
        upstream,
        "reject",
        &format!(
            r#"
[alerts]
webhook_url = "{}"
webhook_timeout = "200ms"

[[budgets]]
name = "chatbot-monthly"
project = "Chatbot"
monthly_usd = "0.60"
alert_at = {alert_at}
"#,
            hook.url
        ),
    )
}

async fn spend(proxy: &Proxy, calls: usize) {
    for _ in 0..calls {
        let r = proxy.chat_body(CHAT_KEY, CAPPED).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
}

/// The value of the counter sample `name` (with its labels, e.g. `x_total{reason="timeout"}`)
/// in a Prometheus text page; 0 when absent.
fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The `/metrics` page of a proxy started from the binary (the admin token opens it).
async fn metrics_of(url: &str) -> String {
    client()
        .get(format!("{url}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text")
}

/// The rows of a SQLite ledger's outbox: `(id, attempts)`.
fn outbox_rows(db: &std::path::Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(db).expect("open ledger");
    let mut stmt = conn
        .prepare("SELECT id, attempts FROM webhook_outbox ORDER BY created_ms")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// Checks `cond` every 20 ms until it holds; fails after `within` with `what`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hung_endpoint_times_out_is_retried_and_never_holds_two_connections() {
    let hook = Hook::start(vec![Reply::Hang]).await;
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&hooked(&up.url, &hook, "[0.5, 0.8, 1.0]")).await;
    // 50 % crossed: the first alert goes out, and hangs.
    spend(&proxy, 5).await;
    hook.wait(Duration::from_secs(5), "the first attempt", |g| {
        g.len() == 1
    })
    .await;
    // Two more alerts while it hangs: they wait in the outbox, no second socket.
    spend(&proxy, 7).await;
    // Each attempt times out after 200 ms; the endpoint rests 1 s, 2 s, 4 s between them.
    hook.wait(Duration::from_secs(20), "four attempts", |g| g.len() >= 4)
        .await;
    assert_eq!(
        hook.max_open(),
        1,
        "one connection at a time to the hung endpoint"
    );
    assert_eq!(hook.max_busy(), 1);
    let got = hook.got();
    let keys: Vec<String> = got.iter().map(Got::key).collect();
    let distinct: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), 3, "three alerts attempted: {keys:?}");
    assert_eq!(
        keys[3], keys[0],
        "the first alert retried, same key: {keys:?}"
    );
    for g in &got {
        let body: serde_json::Value = serde_json::from_str(&g.body).expect("json body");
        assert_eq!(body["id"].as_str(), Some(g.key().as_str()));
        assert_eq!(body["budget"], "chatbot-monthly");
        // The token in the URL's path and query reach the endpoint, as configured.
        assert!(
            g.head
                .starts_with("POST /hooks/T0KEN-SECRET?sig=s3cr3t HTTP/1.1")
        );
    }
    let metrics = proxy.metrics_text().await;
    assert!(
        sample(
            &metrics,
            "mantlegate_webhook_failures_total{reason=\"timeout\"}"
        ) >= 3,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "mantlegate_webhook_deliveries_total") == 0,
        "{metrics}"
    );
    let rows = outbox_rows(&proxy.db);
    assert_eq!(rows.len(), 3, "all three wait in the outbox: {rows:?}");
    assert_eq!(hook.max_open(), 1);
}

#[tokio::test]
async fn a_redirect_is_a_failure_retried_and_never_followed() {
    let hook = Hook::start(vec![Reply::Status(302)]).await;
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&hooked(&up.url, &hook, "[0.5]")).await;
    spend(&proxy, 5).await;
    hook.wait(Duration::from_secs(10), "a retry", |g| g.len() >= 2)
        .await;
    let got = hook.got();
    assert_eq!(got[0].key(), got[1].key());
    assert_eq!(got[0].body, got[1].body);
    assert_eq!(
        hook.elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect is never followed"
    );
    let metrics = proxy.metrics_text().await;
    assert!(
        sample(
            &metrics,
            "mantlegate_webhook_failures_total{reason=\"status\"}"
        ) >= 2,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "mantlegate_webhook_deliveries_total"), 0);
    assert_eq!(outbox_rows(&proxy.db).len(), 1, "still waiting for a 2xx");
}

#[tokio::test]
async fn a_failure_then_success_is_delivered_once_with_one_idempotency_key() {
    let hook = Hook::start(vec![Reply::Status(500), Reply::Status(200)]).await;
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&hooked(&up.url, &hook, "[0.5]")).await;
    spend(&proxy, 5).await;
    // Delivered: the outbox row is gone (nothing is ever sent again once it is).
    eventually(Duration::from_secs(10), "the alert delivered", || async {
        outbox_rows(&proxy.db).is_empty() && hook.got().len() == 2
    })
    .await;
    let got = hook.got();
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        [Some(500), Some(200)]
    );
    assert_eq!(
        got[0].key(),
        got[1].key(),
        "one Idempotency-Key across retries"
    );
    assert!(got[0].key().starts_with("mga_"), "{}", got[0].key());
    assert_eq!(got[0].body, got[1].body, "the same body on every attempt");
    let gap = got[1].at - got[0].at;
    assert!(
        gap < Duration::from_secs(10) && gap >= Duration::from_millis(900),
        "first retry after about 1 s: {gap:?}"
    );
    assert_eq!(
        got[0].header("content-type").as_deref(),
        Some("application/json")
    );
    let metrics = proxy.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            "mantlegate_webhook_failures_total{reason=\"status\"}"
        ),
        1,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "mantlegate_webhook_deliveries_total"), 1);
    assert_eq!(hook.got().len(), 2, "delivered once");
}

#[tokio::test]
async fn an_alert_waiting_in_the_outbox_is_delivered_after_a_restart() {
    let hook = Hook::start(vec![Reply::Status(503)]).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("ledger.db");
    let text = format!(
        "{}\n[ledger]\npath = \"{}\"\n[admin]\ntoken_env = \"MG_TEST_ADMIN\"\n",
        hooked(&up.url, &hook, "[0.5]"),
        db.display()
    );
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, &text).expect("write");
    let env = [("MG_TEST_ADMIN", ADMIN_TOKEN)];
    let (child, lines, url) = serve_file(&path, "info", &env).await;
    for _ in 0..5 {
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CHAT_KEY)
            .body(CAPPED)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    eventually(Duration::from_secs(10), "a failed attempt counted", || {
        let url = url.clone();
        async move {
            sample(
                &metrics_of(&url).await,
                "mantlegate_webhook_failures_total{reason=\"status\"}",
            ) >= 1
        }
    })
    .await;
    let logs = stop(child, lines).await;
    let rows = outbox_rows(&db);
    assert_eq!(rows.len(), 1, "the alert waits in the outbox: {rows:?}");
    let (id, attempts) = rows[0].clone();
    assert!(attempts >= 1);
    assert!(hook.got().iter().all(|g| g.key() == id));
    // Each failure logged once, with the endpoint's host and never its token.
    let failures: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "budget alert webhook failed")
        .collect();
    assert!(!failures.is_empty(), "{logs:#?}");
    for (n, f) in failures.iter().enumerate() {
        assert_eq!(f["attempt"], n + 1, "one line per attempt: {failures:#?}");
        assert_eq!(f["alert_id"], id.as_str());
        assert_eq!(f["status"], 503);
        assert_eq!(f["reason"], "status");
        assert!(
            f["host"]
                .as_str()
                .is_some_and(|h| h.starts_with("127.0.0.1:")),
            "{f}"
        );
    }
    for l in &logs {
        assert!(
            !l.contains("T0KEN-SECRET") && !l.contains("s3cr3t"),
            "the URL's secrets in a log line: {l}"
        );
    }

    // The endpoint is back; a new process on the same ledger delivers the alert, once.
    hook.set_plan(vec![Reply::Status(200)]);
    let before = hook.got().len();
    let (child, lines, url) = serve_file(&path, "info", &env).await;
    eventually(
        Duration::from_secs(10),
        "delivered after the restart",
        || async { outbox_rows(&db).is_empty() },
    )
    .await;
    let got = hook.got();
    let delivered: Vec<&Got> = got.iter().filter(|g| g.answered == Some(200)).collect();
    assert_eq!(delivered.len(), 1, "{got:#?}");
    assert_eq!(delivered[0].key(), id, "the same alert, the same key");
    assert_eq!(got.len(), before + 1, "the restart raised no new alert");
    let metrics = metrics_of(&url).await;
    assert_eq!(sample(&metrics, "mantlegate_webhook_deliveries_total"), 1);
    stop(child, lines).await;
}

/// Two replicas' config: one project, a $0.60 budget alerting at four thresholds, the ledger in
/// `PostgreSQL`, the hook.
fn fleet_config(up: &str, pg: &str, hook: &str, key: &str) -> String {
    format!(
        r#"
[upstream]
base_url = "{up}"
[attribution]
on_missing = "reject"
[[projects]]
name = "Hooked"
id = "proj_hooked"
[[keys]]
name = "hooked-key"
sha256 = "{sha}"
projects = ["Hooked"]
[pricing]
builtin = false
[[prices]]
model = "openai.gpt-oss-120b"
input_per_million = "0.15"
cached_input_per_million = "0.075"
output_per_million = "0.60"
[ledger]
url = "{pg}"
budget_refresh = "100ms"
[admin]
token_env = "MG_TEST_ADMIN"
[alerts]
webhook_url = "{hook}"
webhook_timeout = "1s"
[[budgets]]
name = "hooked-monthly"
project = "Hooked"
monthly_usd = "0.60"
alert_at = [0.25, 0.5, 0.75, 1.0]
"#,
        sha = sha(key),
    )
}

#[tokio::test]
async fn an_alert_a_day_old_is_given_up_with_an_error_and_never_sent() {
    let hook = Hook::start(vec![Reply::Status(200)]).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("ledger.db");
    // An alert raised 25 hours ago and one raised now, both waiting in the outbox.
    let now = jiff::Timestamp::now().as_millisecond();
    {
        use mantlegate::ledger::outbox::{Entry, Outbox as _};
        let outbox = mantlegate::ledger::sqlite::SqliteOutbox::open(&db).expect("outbox");
        let entry = |id: &str, created_ms| Entry {
            id: id.to_owned(),
            created_ms,
            body: format!(r#"{{"id":"{id}","budget":"chatbot-monthly"}}"#),
        };
        outbox
            .add(&[
                entry("mga_old", now - 25 * 3_600_000),
                entry("mga_new", now),
            ])
            .expect("add");
    }
    let text = format!(
        "{}\n[ledger]\npath = \"{}\"\n[admin]\ntoken_env = \"MG_TEST_ADMIN\"\n",
        hooked(&up.url, &hook, "[0.5]"),
        db.display()
    );
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, &text).expect("write");
    let env = [("MG_TEST_ADMIN", ADMIN_TOKEN)];
    let (child, lines, url) = serve_file(&path, "info", &env).await;
    eventually(Duration::from_secs(10), "the outbox emptied", || async {
        outbox_rows(&db).is_empty()
    })
    .await;
    let metrics = metrics_of(&url).await;
    assert_eq!(
        sample(&metrics, "mantlegate_webhook_alerts_given_up_total"),
        1
    );
    assert_eq!(sample(&metrics, "mantlegate_webhook_deliveries_total"), 1);
    let got = hook.got();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].key(), "mga_new");
    let logs = stop(child, lines).await;
    let given_up: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "ERROR" && v["alert_id"] == "mga_old")
        .collect();
    assert_eq!(given_up.len(), 1, "{logs:#?}");
    assert!(
        given_up[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("given up")),
        "{}",
        given_up[0]
    );
    assert_eq!(
        given_up[0]["body"], r#"{"id":"mga_old","budget":"chatbot-monthly"}"#,
        "the whole alert in the line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_the_postgres_outbox_deliver_each_alert_once() {
    let Some(db) = tokio::task::spawn_blocking(|| TestDb::create("webhook fleet"))
        .await
        .expect("join")
    else {
        return;
    };
    // The first three attempts fail: rows wait in the shared outbox, due on both replicas.
    // Each answer takes 300 ms, so two attempts at once would overlap at the endpoint.
    let slow = Duration::from_millis(300);
    let hook = Hook::start(vec![
        Reply::Slow(500, slow),
        Reply::Slow(502, slow),
        Reply::Slow(503, slow),
        Reply::Slow(200, slow),
    ])
    .await;
    let up = FakeUpstream::start().await;
    let key = "mg-test-webhook-fleet";
    let text = fleet_config(&up.url, &db.url, &hook.url, key);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, text).expect("write");
    let env = [("MG_TEST_ADMIN", ADMIN_TOKEN)];
    let a = serve_file(&path, "info", &env).await;
    let b = serve_file(&path, "info", &env).await;
    let urls = [a.2.clone(), b.2.clone()];
    // Twelve calls of $0.06, alternating: the fleet crosses all four thresholds.
    for i in 0..12 {
        let r = client()
            .post(format!("{}/v1/chat/completions", urls[i % 2]))
            .bearer_auth(key)
            .body(CAPPED)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let scalar = |sql: &'static str| {
        let url = db.url.clone();
        async move {
            tokio::task::spawn_blocking(move || common::pg::scalar(&url, sql))
                .await
                .expect("join")
        }
    };
    eventually(Duration::from_secs(30), "four alerts delivered", || async {
        scalar("SELECT count(*) FROM webhook_outbox").await == 0
            && hook
                .got()
                .iter()
                .filter(|g| g.answered == Some(200))
                .count()
                >= 4
    })
    .await;
    let got = hook.got();
    let delivered: Vec<String> = got
        .iter()
        .filter(|g| g.answered == Some(200))
        .map(Got::key)
        .collect();
    let distinct: std::collections::HashSet<&String> = delivered.iter().collect();
    assert_eq!(
        (delivered.len(), distinct.len()),
        (4, 4),
        "each alert delivered once: {got:#?}"
    );
    let fractions: std::collections::BTreeSet<String> = got
        .iter()
        .map(|g| {
            let body: serde_json::Value = serde_json::from_str(&g.body).expect("json");
            body["fraction"].to_string()
        })
        .collect();
    assert_eq!(fractions.len(), 4, "{fractions:?}");
    // A retried alert, whichever replica retried it, kept its key and its body.
    for g in &got {
        assert!(distinct.contains(&g.key()), "{got:#?}");
        let first = got.iter().find(|o| o.key() == g.key()).expect("itself");
        assert_eq!(first.body, g.body);
    }
    assert_eq!(hook.max_busy(), 1, "one attempt at a time for the fleet");
    assert_eq!(
        scalar("SELECT count(*) FROM budget_alerts").await,
        4,
        "each threshold claimed once"
    );
    let mut deliveries = 0;
    let mut failures = 0;
    for url in &urls {
        let metrics = metrics_of(url).await;
        deliveries += sample(&metrics, "mantlegate_webhook_deliveries_total");
        failures += sample(
            &metrics,
            "mantlegate_webhook_failures_total{reason=\"status\"}",
        );
    }
    assert_eq!((deliveries, failures), (4, 3));
    stop(a.0, a.1).await;
    stop(b.0, b.1).await;
}
