//! Shared state that fails safe: a stored response's owner the ledger cannot name is refused
//! (PostgreSQL refusing or stalled behind a relay), the Redis fallback goes on from the fleet's
//! last known budget (a Redis of the test's own, killed), and roll-ups and reports stay bounded
//! whatever models clients name.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::binary::{BIN, Served, serve_file};
use common::pg::TestDb;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const KEY_A: &str = "mg-test-owner-a";
const KEY_B: &str = "mg-test-owner-b";
const ADMIN_ENV: &str = "MANTLEGATE_TEST_FAILSAFE_ADMIN";
const CREATE: &str = r#"{"model":"openai.gpt-oss-120b","input":"hi"}"#;

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

/// What the relay in front of PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Relays bytes both ways.
    Pass,
    /// Closes every relayed connection and every new one at once (a database gone).
    Refuse,
    /// Holds every connection, new ones too, relaying nothing (a database that hangs).
    Stall,
}

/// A TCP relay to `target` on 127.0.0.1, switched between [`Mode`]s.
struct Relay {
    addr: String,
    mode: watch::Sender<Mode>,
}

impl Relay {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (mode, _) = watch::channel(Mode::Pass);
        let modes = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = modes.subscribe();
                let target = target.clone();
                tokio::spawn(relay(client, target, rx));
            }
        });
        Self { addr, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn relay(client: TcpStream, target: String, mut mode: watch::Receiver<Mode>) {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Refuse => return,
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass => break,
        }
    }
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending (or a refusal) drops both connections.
    tokio::select! {
        () = pump(client_read, server_write, mode.clone()) => {}
        () = pump(server_read, client_write, mode) => {}
    }
}

/// Copies `from` to `to` while the mode is [`Mode::Pass`], holds while it is
/// [`Mode::Stall`], and ends on [`Mode::Refuse`] or a closed side.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Refuse => return,
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass => {
                tokio::select! {
                    changed = mode.changed() => if changed.is_err() { return },
                    n = from.read(&mut buf) => match n {
                        Ok(n) if n > 0 => if to.write_all(&buf[..n]).await.is_err() { return },
                        _ => return,
                    },
                }
            }
        }
    }
}

/// `url` with its `host:port` replaced by `addr`.
fn via(url: &str, addr: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find('/')
        .map_or(url.len(), |i| authority + i);
    let host_start = url[authority..end]
        .rfind('@')
        .map_or(authority, |i| authority + i + 1);
    format!("{}{addr}{}", &url[..host_start], &url[end..])
}

/// The `host:port` of `url`.
fn host_port(url: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find('/')
        .map_or(url.len(), |i| authority + i);
    let host_start = url[authority..end]
        .rfind('@')
        .map_or(authority, |i| authority + i + 1);
    url[host_start..end].to_owned()
}

/// Two replicas on one PostgreSQL database reached through a relay; projects Alpha (key A)
/// and Beta (key B).
struct OwnerFleet {
    db: TestDb,
    relay: Relay,
    up: FakeUpstream,
    _dir: tempfile::TempDir,
    a: Served,
    b: Served,
}

impl OwnerFleet {
    async fn start(test: &str) -> Option<Self> {
        let name = test.to_owned();
        let db = tokio::task::spawn_blocking(move || TestDb::create(&name))
            .await
            .expect("join")?;
        let relay = Relay::start(host_port(&db.url)).await;
        let up = FakeUpstream::start().await;
        let config = format!(
            r#"
[upstream]
base_url = "{up}"
[attribution]
on_missing = "reject"
[[projects]]
name = "Alpha"
id = "proj_alpha"
[[projects]]
name = "Beta"
id = "proj_beta"
[[keys]]
name = "alpha-key"
sha256 = "{a}"
projects = ["Alpha"]
[[keys]]
name = "beta-key"
sha256 = "{b}"
projects = ["Beta"]
[pricing]
builtin = false
[ledger]
url = "{pg}"
budget_refresh = "100ms"
"#,
            up = up.url,
            a = sha(KEY_A),
            b = sha(KEY_B),
            pg = via(&db.url, &relay.addr),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mantlegate.toml");
        std::fs::write(&path, config).expect("write");
        let a = serve_file(&path, "info", &[]).await;
        let b = serve_file(&path, "info", &[]).await;
        Some(Self {
            db,
            relay,
            up,
            _dir: dir,
            a,
            b,
        })
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let (url, sql) = (self.db.url.clone(), sql.to_owned());
        tokio::task::spawn_blocking(move || common::pg::scalar(&url, &sql))
            .await
            .expect("join")
    }

    /// A response created through replica A by key A, committed to the shared ledger.
    async fn create_on_a(&self) -> String {
        let r = client()
            .post(format!("{}/v1/responses", self.a.2))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(CREATE)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.expect("json");
        let id = body["id"].as_str().expect("id").to_owned();
        eventually(
            Duration::from_secs(10),
            "the create in the ledger",
            || async {
                self.scalar(&format!(
                    "SELECT count(*) FROM calls WHERE upstream_response_id = '{id}'"
                ))
                .await
                    == 1
            },
        )
        .await;
        id
    }

    /// Key B fetches `id` through replica B.
    async fn fetch_on_b(&self, id: &str) -> reqwest::Response {
        client()
            .get(format!("{}/v1/responses/{id}", self.b.2))
            .bearer_auth(KEY_B)
            .send()
            .await
            .expect("send")
    }

    /// Refuses key B's fetch of key A's response while the relay is in `mode`.
    async fn refuses_while(&self, mode: Mode) {
        let id = self.create_on_a().await;
        // The ledger answering: another project's response does not exist for key B.
        let r = self.fetch_on_b(&id).await;
        assert_eq!(r.status(), 404);
        assert_eq!(error_of(r).await["code"], "response_not_found");
        assert_eq!(self.up.requests().len(), 1, "only the create went upstream");

        self.relay.set(mode);
        let started = Instant::now();
        let r = self.fetch_on_b(&id).await;
        let took = started.elapsed();
        assert_eq!(r.status(), 503, "{mode:?}");
        let e = error_of(r).await;
        assert_eq!(e["code"], "ledger_unavailable", "{e}");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("retry shortly")),
            "{e}"
        );
        assert!(
            took < Duration::from_secs(4),
            "refused within about 2 s, took {took:?}"
        );
        assert_eq!(
            self.up.requests().len(),
            1,
            "nothing forwarded under a project that may not own the response"
        );
        self.relay.set(Mode::Pass);
        eventually(
            Duration::from_mins(1),
            "the refusal in the ledger",
            || async {
                self.scalar(
                    "SELECT count(*) FROM calls WHERE status = 503
                     AND error_code = 'ledger_unavailable' AND outcome = 'rejected'
                     AND key_name = 'beta-key'",
                )
                .await
                    == 1
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_lookup_refused_by_postgresql_is_503_not_forwarded() {
    let Some(fleet) = OwnerFleet::start("owner lookup, postgresql refusing").await else {
        return;
    };
    fleet.refuses_while(Mode::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_lookup_stalled_in_postgresql_is_503_within_two_seconds() {
    let Some(fleet) = OwnerFleet::start("owner lookup, postgresql stalled").await else {
        return;
    };
    fleet.refuses_while(Mode::Stall).await;
}

/// A `redis-server` of the test's own on a free port, killed when dropped.
struct OwnRedis {
    child: Option<tokio::process::Child>,
    url: String,
}

impl OwnRedis {
    /// `None` when there is no `redis-server` to run: `test` is skipped.
    async fn start(test: &str) -> Option<Self> {
        // A free port: bound, then released for redis-server to take.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = match tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                common::services::unavailable(test, &format!("redis-server cannot be run ({e})"));
                return None;
            }
        };
        let addr = format!("127.0.0.1:{port}");
        eventually(Duration::from_secs(10), "redis-server listening", || {
            let addr = addr.clone();
            async move { TcpStream::connect(&addr).await.is_ok() }
        })
        .await;
        Some(Self {
            child: Some(child),
            url: format!("redis://{addr}"),
        })
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_goes_on_from_the_fleets_budget_never_from_full_buckets() {
    let Some(mut redis) = OwnRedis::start("a redis outage").await else {
        return;
    };
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).expect("mkdir");
        let config = config(
            &up.url,
            "reject",
            &format!(
                r#"
[ledger]
path = "{ledger}"
[limits]
store = "{redis}"
store_timeout = "2s"
[[rate_limits]]
key = "chatbot-backend"
requests_per_minute = 30
"#,
                ledger = sub.join("ledger.db").display(),
                redis = redis.url,
            ),
        );
        let path = sub.join("mantlegate.toml");
        std::fs::write(&path, config).expect("write");
        replicas.push(serve_file(&path, "info", &[]).await);
    }
    let started = Instant::now();
    let call = |i: usize| {
        let url = replicas[i % 2].2.clone();
        async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(CHAT_KEY)
                .header("content-type", "application/json")
                .body(CHAT_BODY)
                .send()
                .await
                .expect("send")
        }
    };
    // Through Redis: 20 of the fleet's 30 for this minute.
    for i in 0..20 {
        let r = call(i).await;
        assert_eq!(r.status(), 200, "call {i} through redis");
    }
    redis.kill().await;
    let mut admitted_after = 0u64;
    for i in 0..60 {
        let r = call(i).await;
        match r.status().as_u16() {
            200 => admitted_after += 1,
            429 => assert_eq!(error_of(r).await["code"], "rate_limit_exceeded"),
            other => panic!("unexpected {other}"),
        }
    }
    let total = 20 + admitted_after;
    // README's bound: at most N × the limit over N replicas (2 × 30), refills included.
    let refilled = u64::try_from(started.elapsed().as_millis() * 2 * 30 / 60_000).expect("short");
    assert!(
        total <= 60,
        "{total} calls admitted in {:?} over two replicas for 30 a minute",
        started.elapsed()
    );
    // Each replica went on from what Redis last told it: about 10 left for the fleet, each.
    assert!(
        admitted_after <= 2 * 11 + refilled,
        "{admitted_after} admitted during the outage"
    );
    assert_eq!(
        up.requests().len() as u64,
        total,
        "only admitted calls went upstream"
    );
}

/// A replica with its ledger at `ledger` (a SQLite path, or a PostgreSQL URL) and
/// `max_models_per_day = 3`, the admin API on.
async fn rollup_replica(
    up: &FakeUpstream,
    dir: &std::path::Path,
    ledger: &str,
) -> (Served, std::path::PathBuf) {
    let ledger_line = if ledger.starts_with("postgres") {
        format!("url = \"{ledger}\"")
    } else {
        format!("path = \"{ledger}\"")
    };
    let config = config(
        &up.url,
        "reject",
        &format!(
            r#"
[ledger]
{ledger_line}
max_models_per_day = 3
[admin]
token_env = "{ADMIN_ENV}"
"#
        ),
    );
    let path = dir.join("mantlegate.toml");
    std::fs::write(&path, config).expect("write");
    let served = serve_file(&path, "info", &[(ADMIN_ENV, ADMIN_TOKEN)]).await;
    (served, path)
}

/// 500 calls the upstream refuses, each naming its own model, then successful calls to 5
/// models under a cap of 3: the roll-up (read through the admin report) has one `(rejected)`
/// row and one `(other)` row; the calls keep their real models.
async fn rollups_stay_bounded(url: &str, up: &FakeUpstream) {
    let http = client();
    for i in 0..500 {
        let r = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .header("x-test-status", "400")
            .body(format!(
                r#"{{"model":"junk-{i}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400);
    }
    for m in ["m1", "m2", "m3", "m4", "m5"] {
        let r = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.requests().len(), 505);
    let report = || async {
        let r = http
            .get(format!("{url}/admin/v1/costs?group_by=model"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.expect("json")
    };
    let requests_of = |doc: &serde_json::Value| -> i64 {
        doc["rows"].as_array().map_or(0, |rows| {
            rows.iter()
                .map(|r| r["requests"].as_i64().unwrap_or(0))
                .sum()
        })
    };
    eventually(Duration::from_secs(10), "505 calls rolled up", || async {
        requests_of(&report().await) == 505
    })
    .await;
    let doc = report().await;
    let mut models: Vec<(String, i64)> = doc["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["model"].as_str().expect("model").to_owned(),
                r["requests"].as_i64().expect("requests"),
            )
        })
        .collect();
    models.sort();
    assert_eq!(
        models,
        vec![
            ("(other)".to_owned(), 2),
            ("(rejected)".to_owned(), 500),
            ("m1".to_owned(), 1),
            ("m2".to_owned(), 1),
            ("m3".to_owned(), 1),
        ],
        "{doc}"
    );
    // Grouped by 9 dimensions: refused, not built.
    let nine = "project,model,key,route,api,day,month,outcome,tag:Team";
    let r = http
        .get(format!("{url}/admin/v1/costs?group_by={nine}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "report_too_large", "{e}");
    let eight = "project,model,key,route,api,day,month,outcome";
    let r = http
        .get(format!("{url}/admin/v1/costs?group_by={eight}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "8 dimensions are fine");
}

/// `mantlegate report` grouped by 9 dimensions exits non-zero, saying why.
fn cli_refuses_nine_dims(config: &std::path::Path) {
    let out = std::process::Command::new(BIN)
        .args(["report", "--config"])
        .arg(config)
        .args([
            "--group-by",
            "project,model,key,route,api,day,month,outcome,tag:Team",
        ])
        .output()
        .expect("run report");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at most 8 dimensions"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rollups_key_rejected_and_excess_models_under_placeholders() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("ledger.db");
    let (served, config) = rollup_replica(&up, dir.path(), &db.display().to_string()).await;
    rollups_stay_bounded(&served.2, &up).await;
    tokio::task::spawn_blocking(move || cli_refuses_nine_dims(&config))
        .await
        .expect("join");
    // The calls keep the models their clients named.
    let conn = rusqlite::Connection::open(&db).expect("open");
    let distinct: i64 = conn
        .query_row("SELECT COUNT(DISTINCT model) FROM calls", [], |r| r.get(0))
        .expect("count");
    assert_eq!(distinct, 505);
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM daily", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 5, "m1, m2, m3, (other), (rejected)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_rollups_key_rejected_and_excess_models_under_placeholders() {
    let db = tokio::task::spawn_blocking(|| TestDb::create("postgresql roll-ups"))
        .await
        .expect("join");
    let Some(db) = db else {
        return;
    };
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (served, config) = rollup_replica(&up, dir.path(), &db.url).await;
    rollups_stay_bounded(&served.2, &up).await;
    tokio::task::spawn_blocking(move || cli_refuses_nine_dims(&config))
        .await
        .expect("join");
    let url = db.url.clone();
    let (distinct, rows) = tokio::task::spawn_blocking(move || {
        (
            common::pg::scalar(&url, "SELECT count(DISTINCT model) FROM calls"),
            common::pg::scalar(&url, "SELECT count(*) FROM daily"),
        )
    })
    .await
    .expect("join");
    assert_eq!(distinct, 505);
    assert_eq!(rows, 5, "m1, m2, m3, (other), (rejected)");
}
