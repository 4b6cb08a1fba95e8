//! Rate limits shared through Redis by two limiters (two replicas). Needs
//! `MANTLEGATE_TEST_REDIS_URL` (tests/common/services.rs), but for the tests of its absence.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mantlegate::ratelimit::redis::{
    KEY_PREFIX, RedisBackend, RedisOptions, RuleIdentity, SCRIPT, SCRIPT_NAME, Scope, cell_keys,
};
use mantlegate::ratelimit::{RateHeaders, RateLimiter, RateRule};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The Redis of the tests, or `None` when `test` is skipped (see `common::services::url`).
fn redis_url(test: &str) -> Option<String> {
    common::services::url(common::services::REDIS_ENV, test)
}

/// A name no other test run uses (the keys of a run expire within 3 minutes).
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{nanos}", std::process::id())
}

fn rule(rpm: Option<u64>, tpm: Option<u64>) -> RateRule {
    RateRule {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    }
}

/// One replica: its own connection to Redis and a limiter over `rules`.
fn replica(
    url: &str,
    options: RedisOptions,
    rules: &[RuleIdentity<'_>],
) -> (RedisBackend, RateLimiter) {
    let backend = RedisBackend::connect(url, options).expect("a valid URL");
    let store = backend.store(cell_keys(rules));
    let limiter =
        RateLimiter::with_shared_store(rules.iter().map(|r| r.rule).collect(), Arc::new(store));
    (backend, limiter)
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_a_minute_admits_ten_across_two_replicas_under_load() {
    let Some(url) = redis_url("ten_a_minute_admits_ten_across_two_replicas_under_load") else {
        return;
    };
    let project = unique("chatbot");
    let rules = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(10), None),
    }];
    let (backend_a, a) = replica(&url, RedisOptions::default(), &rules);
    let (backend_b, b) = replica(&url, RedisOptions::default(), &rules);
    backend_a.ping().await.expect("Redis answers");
    backend_b.ping().await.expect("Redis answers");

    let admitted = Arc::new(AtomicUsize::new(0));
    let mut calls = JoinSet::new();
    for i in 0..400 {
        let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
        let admitted = Arc::clone(&admitted);
        calls.spawn(async move {
            match limiter.acquire_async(&[0], 0, Instant::now()).await {
                Ok(admission) => {
                    admitted.fetch_add(1, Ordering::SeqCst);
                    assert!(admission.headers.remaining_requests < Some(10));
                }
                Err(refused) => {
                    assert_eq!(refused.which, "requests");
                    assert_eq!(refused.headers.remaining_requests, Some(0));
                    assert!(refused.retry_after <= Duration::from_secs(6));
                    assert!(refused.retry_after > Duration::from_secs(5));
                }
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("call task");
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 10, "across both replicas");
    for backend in [&backend_a, &backend_b] {
        let stats = backend.stats();
        assert!(stats.up);
        assert_eq!(stats.fallbacks, 0, "every call was decided by Redis");
    }
    // Either replica sees the shared state.
    let status = b.status_async(0, Instant::now()).await;
    assert_eq!(status.remaining_requests, Some(0));
    assert!(status.reset_requests > Some(Duration::from_secs(59)));

    // The key names the rule; it expires two windows after its TAT (60 s ahead now).
    let key = format!("{KEY_PREFIX}project:{project}:requests:10");
    let mut conn = raw_connection(&url).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!((170_000..=180_001).contains(&pttl), "{pttl}");
    // The TAT, in nanoseconds since the Unix epoch on the Redis server's clock.
    let tat: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    let tat: u128 = tat.parse().expect("decimal nanoseconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let ahead = Duration::from_nanos(u64::try_from(tat.saturating_sub(now)).expect("small"));
    assert!(
        ahead > Duration::from_secs(55) && ahead <= Duration::from_secs(65),
        "{ahead:?}"
    );

    // Without the shared store each replica would have admitted its own 10.
    let local = RateLimiter::new(vec![rule(Some(10), None)]);
    let other = RateLimiter::new(vec![rule(Some(10), None)]);
    let now = Instant::now();
    let per_replica = (0..40)
        .filter(|i| {
            let limiter = if i % 2 == 0 { &local } else { &other };
            limiter.acquire(&[0], 0, now).is_ok()
        })
        .count();
    assert_eq!(per_replica, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_tokens_moves_the_shared_tat() {
    let Some(url) = redis_url("settling_tokens_moves_the_shared_tat") else {
        return;
    };
    let key_name = unique("ci-bot");
    // 6 tokens a minute: one every 10 s, so the test's own duration does not show.
    let rules = [RuleIdentity {
        scope: Scope::Key,
        name: &key_name,
        rule: rule(None, Some(6)),
    }];
    let (_backend_a, a) = replica(&url, RedisOptions::default(), &rules);
    let (_backend_b, b) = replica(&url, RedisOptions::default(), &rules);

    let first = a
        .acquire_async(&[0], 1, Instant::now())
        .await
        .expect("room");
    assert_eq!(first.headers.remaining_tokens, Some(5));
    // Used 3, estimated 1: a debt of 2 that replica B must see.
    first.settle(3, Instant::now());
    wait_for_tokens(&b, 3).await;

    // Estimated 2, used 0: given back.
    let second = b
        .acquire_async(&[0], 2, Instant::now())
        .await
        .expect("room");
    assert_eq!(second.headers.remaining_tokens, Some(1));
    second.settle(0, Instant::now());
    wait_for_tokens(&a, 3).await;

    // 4 more do not fit into the 3 left; the refusal waits for the one missing token.
    let refused = a
        .acquire_async(&[0], 4, Instant::now())
        .await
        .expect_err("no room");
    assert_eq!(refused.which, "tokens");
    assert!(refused.retry_after <= Duration::from_secs(10));
    assert!(refused.retry_after > Duration::from_secs(8));
    // A debt beyond the whole minute is kept in full, and seen by both.
    let third = a
        .acquire_async(&[0], 3, Instant::now())
        .await
        .expect("room");
    third.settle(13, Instant::now());
    // 16 tokens taken of 6 a minute: the bucket is full again in 160 s.
    wait_until(&b, |h| h.reset_tokens > Some(Duration::from_secs(150))).await;
    let refused = b
        .acquire_async(&[0], 0, Instant::now())
        .await
        .expect_err("in debt");
    assert!(
        refused.retry_after > Duration::from_secs(98),
        "{:?}",
        refused.retry_after
    );
}

/// Polls `limiter` until its shared state shows `remaining` tokens (a settle lands in the
/// background, after the call).
async fn wait_for_tokens(limiter: &RateLimiter, remaining: u64) {
    wait_until(limiter, |h| h.remaining_tokens == Some(remaining)).await;
}

/// Polls rule 0 of `limiter` until its shared state satisfies `done`, for at most 3 s.
async fn wait_until(limiter: &RateLimiter, done: impl Fn(&RateHeaders) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let seen = limiter.status_async(0, Instant::now()).await;
        if done(&seen) {
            return;
        }
        assert!(Instant::now() < deadline, "still {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_one_rule_takes_nothing_from_the_others() {
    let Some(url) = redis_url("a_refusal_by_one_rule_takes_nothing_from_the_others") else {
        return;
    };
    let (project, key) = (unique("team"), unique("key"));
    let rules = [
        RuleIdentity {
            scope: Scope::Project,
            name: &project,
            rule: rule(Some(6), Some(60)),
        },
        RuleIdentity {
            scope: Scope::Key,
            name: &key,
            rule: rule(Some(1), None),
        },
    ];
    let (_ba, a) = replica(&url, RedisOptions::default(), &rules);
    // The same replica, built the way `serve` builds it.
    let b = RedisBackend::connect(&url, RedisOptions::default())
        .expect("a valid URL")
        .limiter(&rules);
    assert!(b.is_shared());
    let admitted = a
        .acquire_async(&[0, 1], 5, Instant::now())
        .await
        .expect("room");
    assert_eq!(
        admitted.headers.remaining_requests,
        Some(0),
        "the key's is lower"
    );
    let refused = b
        .acquire_async(&[0, 1], 5, Instant::now())
        .await
        .expect_err("key");
    assert_eq!(refused.which, "requests");
    assert!(refused.retry_after > Duration::from_secs(59));
    let project_state = b.status_async(0, Instant::now()).await;
    assert_eq!(project_state.remaining_requests, Some(5));
    assert_eq!(project_state.remaining_tokens, Some(55));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_version_owns_its_keys() {
    let Some(url) = redis_url("the_script_version_owns_its_keys") else {
        return;
    };
    let project = unique("upgrade");
    let rules = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(3), None),
    }];
    let (backend, v1) = replica(&url, RedisOptions::default(), &rules);
    backend.ping().await.expect("Redis answers");
    let mut conn = raw_connection(&url).await;

    // The v1 script refuses to touch a key of another version.
    let v2_key = format!("mantlegate:rl:{{v2}}:project:{project}:requests:3");
    let err = redis::Script::new(SCRIPT)
        .key(&v2_key)
        .arg("acquire")
        .arg(20_000_000_000_u64)
        .arg(60_000_000_000_u64)
        .invoke_async::<Vec<i64>>(&mut conn)
        .await
        .expect_err("a v2 key");
    assert!(
        err.to_string()
            .contains(&format!("{SCRIPT_NAME}: refusing key")),
        "{err}"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&v2_key)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "the refused key was not written");

    // A v2 (here: the same text renamed) is another script over other keys: a fleet half
    // upgraded counts apart on each side and never mixes the two.
    let v2_source = SCRIPT
        .replace("mantlegate_rl_v1", "mantlegate_rl_v2")
        .replace("{v1}", "{v2}");
    let v2 = redis::Script::new(&v2_source);
    assert_ne!(v2.get_hash(), redis::Script::new(SCRIPT).get_hash());
    for _ in 0..3 {
        let reply: Vec<i64> = v2
            .key(&v2_key)
            .arg("acquire")
            .arg(20_000_000_000_u64)
            .arg(60_000_000_000_u64)
            .invoke_async(&mut conn)
            .await
            .expect("v2 acquire");
        assert_eq!(reply[0], 1);
    }
    for _ in 0..3 {
        drop(
            v1.acquire_async(&[0], 0, Instant::now())
                .await
                .expect("v1 untouched by v2"),
        );
    }
    v1.acquire_async(&[0], 0, Instant::now())
        .await
        .expect_err("v1 full");
    let name: String = v2.arg("ping").invoke_async(&mut conn).await.expect("ping");
    assert_eq!(name, "mantlegate_rl_v2");
    let _: i64 = redis::cmd("DEL")
        .arg(&v2_key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_a_rule_keeps_its_counters() {
    let Some(url) = redis_url("a_reload_that_moves_a_rule_keeps_its_counters") else {
        return;
    };
    let (project, key) = (unique("stable"), unique("newkey"));
    let before = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(10), None),
    }];
    let (backend, limiter) = replica(&url, RedisOptions::default(), &before);
    for _ in 0..3 {
        drop(
            limiter
                .acquire_async(&[0], 0, Instant::now())
                .await
                .expect("room"),
        );
    }
    // The reloaded config has a new rule first: the project's rule is now rule 1.
    let after = [
        RuleIdentity {
            scope: Scope::Key,
            name: &key,
            rule: rule(Some(5), None),
        },
        before[0],
    ];
    let reloaded = backend.limiter(&after);
    let status = reloaded.status_async(1, Instant::now()).await;
    assert_eq!(status.remaining_requests, Some(7));
    assert_eq!(
        reloaded
            .status_async(0, Instant::now())
            .await
            .remaining_requests,
        Some(5)
    );
    // A changed limit is another rule: a full bucket.
    let changed = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(20), None),
    }];
    let status = backend
        .limiter(&changed)
        .status_async(0, Instant::now())
        .await;
    assert_eq!(status.remaining_requests, Some(20));
}

/// A local port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_fails_open_to_per_replica_limits() {
    // Needs no Redis: the point is its absence.
    let url = format!("redis://127.0.0.1:{}", closed_port().await);
    let project = unique("down");
    let rules = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(3), None),
    }];
    let (backend, limiter) = replica(&url, RedisOptions::default(), &rules);
    assert!(backend.ping().await.is_err());
    assert!(!backend.stats().up);
    let started = Instant::now();
    let admitted = {
        let mut n = 0;
        for _ in 0..5 {
            if limiter.acquire_async(&[0], 0, Instant::now()).await.is_ok() {
                n += 1;
            }
        }
        n
    };
    // Fail open, to the same limits in this replica, from empty buckets (nothing is known of
    // what the fleet admitted): none of 5 at once, and no wait for Redis.
    assert_eq!(admitted, 0);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    let stats = backend.stats();
    assert!(!stats.up);
    assert_eq!(stats.fallbacks, 5);
    assert_eq!(stats.outages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_costs_one_timeout_then_nothing() {
    // Needs no Redis either. Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let project = unique("silent");
    let rules = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(3), None),
    }];
    let options = RedisOptions {
        timeout: Duration::from_millis(100),
        retry_every: Duration::from_secs(1),
    };
    let (backend, limiter) = replica(&format!("redis://127.0.0.1:{port}"), options, &rules);
    let started = Instant::now();
    // Decided locally, by a fallback that knows nothing of the fleet yet: empty, refused.
    limiter
        .acquire_async(&[0], 0, Instant::now())
        .await
        .expect_err("decided locally, from an empty bucket");
    let first = started.elapsed();
    assert!(
        first >= Duration::from_millis(90) && first < Duration::from_millis(500),
        "{first:?}"
    );
    let started = Instant::now();
    for _ in 0..10 {
        let _ = limiter.acquire_async(&[0], 0, Instant::now()).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.stats().fallbacks, 11);
    hold.abort();
}

/// A TCP relay to the test Redis that can be cut and restored on the same port.
struct Relay {
    port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(target: String) -> Self {
        let mut relay = Self {
            port: closed_port().await,
            target,
            task: None,
        };
        relay.resume().await;
        relay
    }

    async fn resume(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind");
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut links = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                links.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        let _ = server.shutdown().await;
                    }
                });
            }
        }));
    }

    /// Closes the listener and every relayed connection (the `JoinSet` aborts them).
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_go_local_while_redis_is_away_and_shared_when_it_is_back() {
    let Some(url) = redis_url("limits_go_local_while_redis_is_away_and_shared_when_it_is_back")
    else {
        return;
    };
    let parsed = reqwest::Url::parse(&url).expect("url");
    let target = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port().unwrap_or(6379)
    );
    let mut relay = Relay::start(target).await;
    let mut via_relay = parsed.clone();
    via_relay.set_host(Some("127.0.0.1")).expect("host");
    via_relay.set_port(Some(relay.port)).expect("port");

    let project = unique("outage");
    let rules = [RuleIdentity {
        scope: Scope::Project,
        name: &project,
        rule: rule(Some(4), None),
    }];
    let options = RedisOptions {
        timeout: Duration::from_millis(200),
        retry_every: Duration::from_millis(100),
    };
    let (backend, limiter) = replica(via_relay.as_str(), options, &rules);
    // The other replica reaches Redis directly all along.
    let (_direct, other) = replica(&url, RedisOptions::default(), &rules);
    backend.ping().await.expect("through the relay");
    drop(
        limiter
            .acquire_async(&[0], 0, Instant::now())
            .await
            .expect("shared"),
    );
    assert_eq!(
        other
            .status_async(0, Instant::now())
            .await
            .remaining_requests,
        Some(3)
    );

    relay.cut().await;
    // Decided locally, from what Redis last answered (3 left), never from a full bucket.
    let mut local = 0;
    for _ in 0..6 {
        if limiter.acquire_async(&[0], 0, Instant::now()).await.is_ok() {
            local += 1;
        }
    }
    assert_eq!(local, 3);
    assert!(!backend.stats().up);
    assert!(backend.stats().fallbacks >= 6);
    assert_eq!(
        other
            .status_async(0, Instant::now())
            .await
            .remaining_requests,
        Some(3)
    );

    relay.resume().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.stats().up {
        // Asking while down starts the background probes (a status takes nothing).
        let _ = limiter.status_async(0, Instant::now()).await;
        assert!(
            Instant::now() < deadline,
            "Redis not back through the relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = backend.stats().fallbacks;
    drop(
        limiter
            .acquire_async(&[0], 0, Instant::now())
            .await
            .expect("shared again"),
    );
    assert_eq!(backend.stats().fallbacks, fallbacks);
    assert_eq!(
        other
            .status_async(0, Instant::now())
            .await
            .remaining_requests,
        Some(2)
    );
    relay.cut().await;
}
