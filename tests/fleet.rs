//! Two replicas (the real binary, twice) against one `PostgreSQL` ledger and one Redis: every
//! call recorded once, a rate limit and a block budget holding for the fleet, a replica killed
//! with SIGKILL losing no completed call, a ledger outage buffered and written afterwards.
//! Needs both `MANTLEGATE_TEST_POSTGRES_URL` and `MANTLEGATE_TEST_REDIS_URL` (tests/common/services.rs).

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use common::binary::{Served, serve_file, stop};
use common::pg::TestDb;
use common::*;

const FLEET_KEY: &str = "mg-test-fleet";
const ADMIN_ENV: &str = "MANTLEGATE_TEST_FLEET_ADMIN";
const CHAT: &str = r#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"hi"}]}"#;

/// A budget-sized call: 100k output tokens at $0.60 per million, about $0.06.
fn capped() -> &'static str {
    r#"{"model":"openai.gpt-oss-120b","max_tokens":100000,"messages":[{"role":"user","content":"hi"}]}"#
}

/// Two replicas of one config, sharing a database of their own and Redis.
struct Fleet {
    db: TestDb,
    up: FakeUpstream,
    _dir: tempfile::TempDir,
    a: Option<Served>,
    b: Option<Served>,
}

impl Fleet {
    /// `None` (the test is skipped) without both servers.
    async fn start(test: &str, extra: &str) -> Option<Self> {
        let redis = common::services::url(common::services::REDIS_ENV, test)?;
        let test_name = test.to_owned();
        let db = tokio::task::spawn_blocking(move || TestDb::create(&test_name))
            .await
            .expect("join")?;
        let up = FakeUpstream::start().await;
        // Rate-limit counters are named by project and key: unique per run.
        let project = format!("Fleet-{:08x}", rand::random::<u32>());
        let config = format!(
            r#"
[upstream]
base_url = "{up}"
[attribution]
on_missing = "reject"
[[projects]]
name = "{project}"
id = "proj_fleet"
[[keys]]
name = "{project}-key"
sha256 = "{sha}"
projects = ["{project}"]
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
[limits]
store = "{redis}"
# A loaded test machine may take a while; a timeout would decide calls in memory.
store_timeout = "2s"
[admin]
token_env = "{ADMIN_ENV}"
{extra}
"#,
            up = up.url,
            sha = sha(FLEET_KEY),
            pg = db.url,
            extra = extra.replace("PROJECT", &project),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mantlegate.toml");
        std::fs::write(&path, config).expect("write");
        let env = [(ADMIN_ENV, ADMIN_TOKEN)];
        let a = serve_file(&path, "info", &env).await;
        let b = serve_file(&path, "info", &env).await;
        Some(Self {
            db,
            up,
            _dir: dir,
            a: Some(a),
            b: Some(b),
        })
    }

    fn url(&self, replica: usize) -> String {
        let served = if replica.is_multiple_of(2) {
            &self.a
        } else {
            &self.b
        };
        served.as_ref().expect("running").2.clone()
    }

    /// A `SELECT` returning one `BIGINT` from the shared ledger.
    async fn scalar(&self, sql: &str) -> i64 {
        let (url, sql) = (self.db.url.clone(), sql.to_owned());
        tokio::task::spawn_blocking(move || common::pg::scalar(&url, &sql))
            .await
            .expect("join")
    }

    /// Every request id in the shared ledger.
    async fn request_ids(&self) -> HashSet<String> {
        let url = self.db.url.clone();
        tokio::task::spawn_blocking(move || {
            common::pg::runtime().block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                let task = tokio::spawn(conn);
                let rows = client
                    .query("SELECT request_id FROM calls", &[])
                    .await
                    .expect("select");
                drop(client);
                let _ = task.await;
                rows.iter().map(|r| r.get(0)).collect()
            })
        })
        .await
        .expect("join")
    }

    async fn budget(&self, replica: usize) -> serde_json::Value {
        let r = client()
            .get(format!("{}/admin/v1/budgets", self.url(replica)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send");
        let body: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
        body["data"][0].clone()
    }
}

async fn chat(url: &str, body: &'static str, head_delay_ms: u64) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(FLEET_KEY)
        .header("content-type", "application/json")
        .header("x-test-head-delay-ms", head_delay_ms.to_string())
        .body(body)
        .send()
        .await
        .expect("send")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_record_every_call_once_and_hold_one_rate_limit() {
    let extra = r#"
[[rate_limits]]
key = "PROJECT-key"
requests_per_minute = 30
"#;
    let Some(fleet) = Fleet::start("fleet rate limit", extra).await else {
        return;
    };
    let started = Instant::now();
    let calls: Vec<_> = (0..80)
        .map(|i| {
            let url = fleet.url(i);
            tokio::spawn(async move {
                let r = chat(&url, CHAT, 0).await;
                let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
                let status = r.status().as_u16();
                let body = r.bytes().await.expect("body");
                (status, id, body)
            })
        })
        .collect();
    let mut ok = 0u64;
    let mut ids = HashSet::new();
    for c in calls {
        let (status, id, body) = c.await.expect("join");
        match status {
            200 => ok += 1,
            429 => {
                let e: serde_json::Value = serde_json::from_slice(&body).expect("json");
                assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{e}");
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
        assert!(ids.insert(id), "request ids are unique");
    }
    // 30 a minute for the fleet: the burst, plus what refilled while the test ran.
    let refilled = u64::try_from(started.elapsed().as_millis() * 30 / 60_000).expect("short");
    assert!(
        (30..=30 + refilled).contains(&ok),
        "{ok} calls admitted across two replicas for a limit of 30 a minute"
    );
    assert_eq!(
        fleet.up.requests().len() as u64,
        ok,
        "only admitted calls went upstream"
    );
    // Every call, admitted or refused, in the shared ledger once, within the 1 s promise.
    eventually(
        Duration::from_secs(5),
        "80 records in postgresql",
        || async { fleet.scalar("SELECT count(*) FROM calls").await == 80 },
    )
    .await;
    assert_eq!(fleet.request_ids().await, ids);
    assert_eq!(
        fleet
            .scalar("SELECT count(*) FROM calls WHERE outcome = 'forwarded'")
            .await,
        i64::try_from(ok).expect("small")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_budget_holds_for_the_fleet_not_for_each_replica() {
    let extra = r#"
[[budgets]]
name = "fleet-monthly"
project = "PROJECT"
monthly_usd = "0.61"
action = "block"
"#;
    let Some(fleet) = Fleet::start("fleet budget", extra).await else {
        return;
    };
    // Six calls in flight on replica A (held 1.5 s at the upstream) reserve about $0.36.
    let on_a: Vec<_> = (0..6)
        .map(|_| {
            let url = fleet.url(0);
            tokio::spawn(async move { chat(&url, capped(), 1500).await.status().as_u16() })
        })
        .collect();
    // Replica B sees all six within its refresh (not just the first: seeing five, it would
    // admit one call more)...
    eventually(
        Duration::from_secs(5),
        "A's six calls at the upstream",
        || async { fleet.up.requests().len() == 6 },
    )
    .await;
    let reserved_on_a = fleet.budget(0).await["reserved_usd"].clone();
    assert_ne!(reserved_on_a, "0", "A reserves for its calls in flight");
    eventually(
        Duration::from_secs(5),
        "B sees A's six reservations",
        || async { fleet.budget(1).await["other_replicas_reserved_usd"] == reserved_on_a },
    )
    .await;
    // ...so of six calls sent to B, only those that fit the rest of the budget are admitted.
    let on_b: Vec<_> = (0..6)
        .map(|_| {
            let url = fleet.url(1);
            tokio::spawn(async move {
                let r = chat(&url, capped(), 0).await;
                (r.status().as_u16(), r.bytes().await.expect("body"))
            })
        })
        .collect();
    let mut admitted_b = 0;
    for c in on_b {
        match c.await.expect("join") {
            (200, _) => admitted_b += 1,
            (429, body) => {
                let e: serde_json::Value = serde_json::from_slice(&body).expect("json");
                assert_eq!(e["error"]["code"], "budget_exceeded", "{e}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for c in on_a {
        assert_eq!(c.await.expect("join"), 200);
    }
    assert_eq!(
        admitted_b, 4,
        "B admits what A's reservations leave: (0.61 - 6 x 0.06) / 0.06"
    );
    // Spend settles in the shared ledger; both replicas converge on it and refuse.
    eventually(Duration::from_secs(5), "12 calls in the ledger", || async {
        fleet.scalar("SELECT count(*) FROM calls").await == 12
    })
    .await;
    let spent = fleet
        .scalar("SELECT COALESCE(sum(cost_pico), 0)::bigint FROM calls")
        .await;
    assert!(
        spent <= 610_000_000_000,
        "fleet spend {spent} within the limit"
    );
    assert_eq!(
        fleet.scalar("SELECT spent_pico FROM budget_spend").await,
        spent,
        "the shared figure is the ledger's sum"
    );
    for replica in [0, 1] {
        let expected = mantlegate::pricing::from_pico(spent)
            .normalize()
            .to_string();
        eventually(
            Duration::from_secs(5),
            "each replica shows the fleet's spend",
            || {
                let expected = expected.clone();
                let fleet = &fleet;
                async move { fleet.budget(replica).await["spend_usd"] == expected }
            },
        )
        .await;
        let r = chat(&fleet.url(replica), capped(), 0).await;
        assert_eq!(
            r.status(),
            429,
            "replica {replica} refuses once the fleet spent it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_no_completed_call_and_a_ledger_outage_is_buffered() {
    let Some(mut fleet) = Fleet::start("fleet crash and outage", "").await else {
        return;
    };
    // Calls through both replicas, all completed.
    let mut completed = HashSet::new();
    for i in 0..20 {
        let r = chat(&fleet.url(i), CHAT, 0).await;
        assert_eq!(r.status(), 200);
        completed.insert(r.headers()["x-request-id"].to_str().expect("id").to_owned());
        r.bytes().await.expect("body");
    }
    // The durability promise: committed within 1 s. Then replica A dies without a word.
    eventually(
        Duration::from_secs(1),
        "20 calls committed within 1 s",
        || async { fleet.scalar("SELECT count(*) FROM calls").await == 20 },
    )
    .await;
    let (mut a, _, _) = fleet.a.take().expect("a");
    a.start_kill().expect("SIGKILL");
    a.wait().await.expect("wait");
    assert_eq!(
        fleet.request_ids().await,
        completed,
        "no completed call lost"
    );

    // PostgreSQL goes away: replica B keeps serving, its records wait in memory.
    tokio::task::block_in_place(|| {
        fleet.db.allow_connections(false);
        fleet.db.terminate_connections();
    });
    let b_url = fleet.url(1);
    for _ in 0..30 {
        let r = chat(&b_url, CHAT, 0).await;
        assert_eq!(r.status(), 200, "served while the ledger is down");
        completed.insert(r.headers()["x-request-id"].to_str().expect("id").to_owned());
        r.bytes().await.expect("body");
    }
    let metrics = || async {
        client()
            .get(format!("{b_url}/metrics"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text")
    };
    eventually(
        Duration::from_secs(10),
        "records queued while down",
        || async {
            metrics()
                .await
                .lines()
                .any(|l| l.starts_with("mantlegate_ledger_queue_depth") && !l.ends_with(" 0"))
        },
    )
    .await;
    // Back: the buffered records are written, once each.
    tokio::task::block_in_place(|| fleet.db.allow_connections(true));
    eventually(
        Duration::from_secs(15),
        "50 calls in the ledger",
        || async { fleet.scalar("SELECT count(*) FROM calls").await == 50 },
    )
    .await;
    assert_eq!(fleet.request_ids().await, completed);
    assert!(
        metrics()
            .await
            .lines()
            .any(|l| l == "mantlegate_ledger_queue_depth 0")
    );
    let (b, lines, _) = fleet.b.take().expect("b");
    let logs = stop(b, lines).await;
    assert!(
        logs.iter().any(|l| l.contains("ledger write failed")),
        "the outage was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_response_is_metered_once_whichever_replica_sees_it_finish() {
    let Some(fleet) = Fleet::start("fleet background", "").await else {
        return;
    };
    let created = client()
        .post(format!("{}/v1/responses", fleet.url(0)))
        .bearer_auth(FLEET_KEY)
        .header("content-type", "application/json")
        .body(r#"{"model":"openai.gpt-oss-120b","input":"hi","background":true}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(created.status(), 200);
    created.bytes().await.expect("body");
    eventually(
        Duration::from_secs(2),
        "the pending response is shared",
        || async {
            fleet
                .scalar("SELECT count(*) FROM pending_background")
                .await
                == 1
        },
    )
    .await;
    let get = |replica: usize| {
        let url = fleet.url(replica);
        async move {
            let r = client()
                .get(format!("{url}/v1/responses/resp_bg1"))
                .bearer_auth(FLEET_KEY)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200, "replica {replica}");
            r.bytes().await.expect("body");
        }
    };
    let billed = || {
        fleet.scalar(
            "SELECT COALESCE(sum(input_tokens), 0)::bigint FROM calls WHERE api = 'responses'",
        )
    };
    // B did not create it, yet seeing it finished, B meters it...
    get(1).await;
    eventually(
        Duration::from_secs(2),
        "B bills the 1000 input tokens",
        || async { billed().await == 1000 },
    )
    .await;
    // ...and A, which created it and still holds it as pending, sees it finished too: the
    // fleet bills it once.
    get(0).await;
    eventually(Duration::from_secs(2), "three records", || async {
        fleet.scalar("SELECT count(*) FROM calls").await == 3
    })
    .await;
    assert_eq!(billed().await, 1000, "billed once");
    assert_eq!(
        fleet
            .scalar("SELECT count(*) FROM calls WHERE usage_source = 'reported'")
            .await,
        1
    );
    assert_eq!(
        fleet
            .scalar("SELECT count(*) FROM pending_background")
            .await,
        0
    );
    // It went upstream in the project that created it.
    for r in fleet.up.requests() {
        assert_eq!(r.headers["openai-project"], "proj_fleet");
    }
}

/// A client that sends its own `x-request-id`, behind an upstream (or gateway) that answers
/// with the same id: every call is still a row of its own in the shared ledger, counted in
/// the daily roll-up and the budget. Keyed on the request id and time, calls of the same
/// millisecond were one row and the others' cost vanished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_calls_with_one_client_request_id_are_forty_calls_for_the_fleet() {
    const CLIENT_ID: &str = "client-chosen-id-1";
    let extra = r#"
[[budgets]]
name = "fleet-monthly"
project = "PROJECT"
monthly_usd = "1000"
action = "block"
"#;
    let Some(fleet) = Fleet::start("fleet shared request id", extra).await else {
        return;
    };
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let url = fleet.url(i);
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(FLEET_KEY)
                    .header("content-type", "application/json")
                    .header("x-request-id", CLIENT_ID)
                    .body(CHAT)
                    .send()
                    .await
                    .expect("send");
                let status = r.status().as_u16();
                let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
                r.bytes().await.expect("body");
                (status, id)
            })
        })
        .collect();
    for c in calls {
        // The id the client sees is the upstream's, here its own echoed back (README).
        assert_eq!(c.await.expect("join"), (200, CLIENT_ID.to_owned()));
    }
    let upstream = fleet.up.requests();
    assert_eq!(upstream.len(), 40);
    for r in &upstream {
        assert_eq!(r.headers["x-request-id"], CLIENT_ID, "forwarded as sent");
    }
    eventually(
        Duration::from_secs(5),
        "40 records in postgresql",
        || async { fleet.scalar("SELECT count(*) FROM calls").await == 40 },
    )
    .await;
    assert_eq!(
        fleet.request_ids().await,
        HashSet::from([CLIENT_ID.to_owned()])
    );
    // Each row is known by mantlegate's own id.
    assert_eq!(
        fleet
            .scalar("SELECT count(DISTINCT call_id) FROM calls WHERE call_id LIKE 'mg\\_%'")
            .await,
        40
    );
    assert_eq!(
        fleet
            .scalar("SELECT sum(requests)::bigint FROM daily")
            .await,
        40
    );
    let cost = fleet.scalar("SELECT max(cost_pico) FROM calls").await;
    assert!(cost > 0);
    assert_eq!(
        fleet
            .scalar(
                "SELECT count(*) FROM calls WHERE cost_pico = (SELECT max(cost_pico) FROM calls)"
            )
            .await,
        40,
        "every call costs the same"
    );
    assert_eq!(
        fleet
            .scalar("SELECT sum(cost_pico)::bigint FROM daily")
            .await,
        40 * cost
    );
    assert_eq!(
        fleet.scalar("SELECT spent_pico FROM budget_spend").await,
        40 * cost,
        "the fleet's budget figure counts all 40"
    );
}
