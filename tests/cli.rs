//! The binary as an operator runs it: check, keys new, serve (port 0, access log, no secrets).

mod common;

use std::time::Duration;

use common::binary::{BIN, serve, stop};
use common::*;

#[test]
fn check_summarises_a_valid_config() {
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", "config/mantlegate.example.toml"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 project(s), 3 key(s), 1 route(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("CustomerChatbot-Prod"), "{stdout}");
    // One node's embedded ledger: check says what that means for a fleet.
    assert!(stdout.contains("budgets are per process"), "{stdout}");
    assert!(stdout.contains("rate limits are per replica"), "{stdout}");
    // The webhook by its host only (its URL may carry a token).
    assert!(
        stdout.contains("alerts: webhook to hooks.example.com (an attempt may take 10s"),
        "{stdout}"
    );
    assert!(!stdout.contains("hooks.example.com/"), "{stdout}");
}

#[test]
fn check_lists_every_problem_with_its_place_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[upstream]
base_url = "ftp://nowhere"
[[projects]]
name = "A"
id = "not-an-id"
[[keys]]
name = "k"
sha256 = "abc"
projects = ["B"]
"#,
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "upstream.base_url",
        "projects[0].id",
        "keys[0].sha256",
        "keys[0].projects[0]",
        "4 problem(s)",
    ] {
        assert!(stderr.contains(needle), "{needle} missing in:\n{stderr}");
    }

    std::fs::write(
        &path,
        "[upstream]\nbase_url = \"https://x\"\nbase_ulr = 1\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("base_ulr"), "{stderr}");
}

#[test]
fn keys_new_prints_a_key_and_its_block() {
    let out = std::process::Command::new(BIN)
        .args([
            "keys",
            "new",
            "--name",
            "svc",
            "--project",
            "A",
            "--project",
            "B",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find(|l| l.starts_with("mg-"))
        .expect("a key line");
    assert!(key.len() >= 46, "{key}");
    assert!(
        stdout.contains(&format!("sha256 = \"{}\"", sha(key))),
        "{stdout}"
    );
    assert!(stdout.contains("projects = [\"A\", \"B\"]"), "{stdout}");
    assert_eq!(
        stdout.matches(key).count(),
        1,
        "the key is printed once, never in the block"
    );
}

/// A config for `upstream` whose ledger lives in `dir`.
fn config_in(dir: &std::path::Path, upstream: &str) -> String {
    let db = dir.join("ledger.db");
    config(
        upstream,
        "reject",
        &format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
}

#[tokio::test]
async fn serve_logs_one_access_line_per_call_and_never_a_secret() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Trace level everywhere: not even the HTTP libraries' debug output may show a key.
    let (child, lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "trace").await;
    let c = client();
    let ok = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CHAT_KEY)
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
    let upstream_id = ok.headers()["x-request-id"].clone();
    ok.bytes().await.expect("body");
    let rejected = c
        .post(format!("{url}/v1/chat/completions"))
        .header("x-api-key", "mg-wrong-secret-key")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(rejected.status(), 401);
    let forbidden = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(BARE_KEY)
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(forbidden.status(), 400);

    let all = stop(child, lines).await;
    let text = all.join("\n");
    for secret in [CHAT_KEY, BARE_KEY, UPSTREAM_KEY, "mg-wrong-secret-key"] {
        assert!(!text.contains(secret), "a secret reached the logs");
    }
    let access: Vec<serde_json::Value> = all
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "access")
        .collect();
    assert_eq!(access.len(), 3, "{access:?}");
    let a = &access[0];
    assert_eq!(a["outcome"], "forwarded");
    assert_eq!(a["status"], 200);
    assert_eq!(a["upstream_status"], 200);
    assert_eq!(a["key"], "chatbot-backend");
    assert_eq!(a["project"], "Chatbot");
    assert_eq!(a["project_id"], "proj_chat");
    assert_eq!(a["model"], "openai.gpt-oss-120b");
    assert_eq!(a["stream"], false);
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/v1/chat/completions");
    assert_eq!(
        a["request_id"],
        upstream_id.to_str().expect("id"),
        "the upstream's id"
    );
    assert!(
        a["duration_ms"].as_f64().is_some() && a["ttfb_ms"].as_f64().is_some(),
        "{a}"
    );
    assert_eq!(access[1]["outcome"], "rejected");
    assert_eq!(access[1]["status"], 401);
    assert_eq!(access[1]["error_code"], "invalid_api_key");
    assert!(
        access[1]["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("mg_"))
    );
    assert_eq!(access[2]["error_code"], "project_required");
    assert_eq!(access[2]["key"], "bare");
}

fn ledger_count(dir: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("ledger.db")).expect("open ledger");
    conn.query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
        .expect("count")
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_and_flushes_the_ledger() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "info").await;
    // A slow call in flight when SIGTERM arrives still completes.
    let arrived = up.controls.received.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let slow = tokio::spawn({
        let url = url.clone();
        async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(CHAT_KEY)
                .header("x-test-head-delay-ms", "500")
                .body(CHAT_BODY)
                .send()
                .await
                .expect("send")
                .status()
        }
    });
    // Wait until the upstream has the call, so it is really in flight.
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the call reached the upstream");
    let all = stop(child, lines).await;
    assert_eq!(
        slow.await.expect("join"),
        200,
        "the in-flight call finished"
    );
    assert!(all.iter().any(|l| l.contains("shutting down")));
    assert_eq!(ledger_count(dir.path()), 1, "flushed before exit");
}

#[tokio::test]
async fn sigkill_loses_no_completed_call() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "info").await;
    let c = client();
    let n = 50;
    for i in 0..n {
        let body = if i % 2 == 0 {
            CHAT_BODY.to_owned()
        } else {
            r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#.to_owned()
        };
        let r = c
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CHAT_KEY)
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("whole body");
    }
    // The durability promise: a completed call is in the ledger within 1 second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("wait");
    assert_eq!(ledger_count(dir.path()), n);
    // A restart opens the same ledger and serves.
    let (child, lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "info").await;
    let r = c.get(format!("{url}/readyz")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    stop(child, lines).await;
    assert_eq!(ledger_count(dir.path()), n);
}

#[test]
fn keys_list_shows_state_expiry_and_last_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let extra = format!(
        "[ledger]\npath = {:?}\n[[keys]]\nname = \"old\"\nsha256 = \"{}\"\nexpires_at = \"2020-01-01T00:00:00Z\"\n[[keys]]\nname = \"off\"\nsha256 = \"{}\"\ndisabled = true\n",
        dir.path().join("none.db").display().to_string(),
        sha("mg-old"),
        sha("mg-off")
    );
    std::fs::write(&path, config("http://127.0.0.1:9", "reject", &extra)).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["keys", "list", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in:\n{stdout}"))
            .to_owned()
    };
    assert!(
        line("chatbot-backend").contains("active") && line("chatbot-backend").contains("never")
    );
    assert!(line("old").contains("expired") && line("old").contains("2020-01-01T00:00:00Z"));
    assert!(line("off").contains("disabled"));
    assert!(!stdout.contains("mg-old"), "keys are never printed");
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, mut lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "info").await;
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("mg-added-by-reload")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "not yet known");
    let added = format!(
        "{}\n[[keys]]\nname = \"added\"\nsha256 = \"{}\"\nprojects = [\"Search\"]\n",
        config_in(dir.path(), &up.url),
        sha("mg-added-by-reload")
    );
    std::fs::write(dir.path().join("mantlegate.toml"), added).expect("write");
    let pid = child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("a reload within 20 s")
            .expect("serve is running");
        if line.contains("config reloaded") {
            break;
        }
    }
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("mg-added-by-reload")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "the reloaded config knows the key");
    stop(child, lines).await;
}

/// Reads log lines until one contains every needle (20 s at most); returns it.
async fn wait_for_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needles: &[&str],
) -> String {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("no log line with {needles:?} within 20 s"))
            .expect("serve is running");
        if needles.iter().all(|n| line.contains(n)) {
            return line;
        }
    }
}

fn hangup(child: &tokio::process::Child) {
    let pid = child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
}

fn mkfifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
}

#[tokio::test]
async fn a_config_path_turned_into_a_fifo_or_a_device_is_a_reload_error_and_sighup_still_works() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_in(dir.path(), &up.url);
    let (child, mut lines, url) = serve(dir.path(), &text, "info").await;
    let path = dir.path().join("mantlegate.toml");
    let call = |key: &'static str| {
        let url = url.clone();
        async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .body(CHAT_BODY)
                .send()
                .await
                .expect("send")
                .status()
        }
    };

    // A FIFO nobody writes to: reading it would wait forever, in the watcher or on SIGHUP.
    std::fs::remove_file(&path).expect("remove");
    mkfifo(&path);
    hangup(&child);
    let line = wait_for_line(&mut lines, &["config reload refused", "SIGHUP", "FIFO"]).await;
    assert!(line.contains("not a regular file (it is a FIFO)"), "{line}");
    assert_eq!(call(CHAT_KEY).await, 200, "the old config keeps serving");

    // A symlink to /dev/zero: endless bytes, never read.
    std::fs::remove_file(&path).expect("remove");
    std::os::unix::fs::symlink("/dev/zero", &path).expect("symlink");
    hangup(&child);
    let line = wait_for_line(&mut lines, &["config reload refused", "SIGHUP", "device"]).await;
    assert!(
        line.contains("not a regular file (it is a character device)"),
        "{line}"
    );
    assert_eq!(call(CHAT_KEY).await, 200, "the old config keeps serving");
    assert_eq!(call("mg-added-by-reload").await, 401);

    // The path fixed: SIGHUP takes the new config.
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(
        &path,
        format!(
            "{text}\n[[keys]]\nname = \"added\"\nsha256 = \"{}\"\nprojects = [\"Search\"]\n",
            sha("mg-added-by-reload")
        ),
    )
    .expect("write");
    hangup(&child);
    wait_for_line(&mut lines, &["config reloaded"]).await;
    assert_eq!(call("mg-added-by-reload").await, 200);
    assert_eq!(call(CHAT_KEY).await, 200);
    stop(child, lines).await;
}

#[tokio::test]
async fn a_config_path_that_is_not_a_regular_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.toml");
    mkfifo(&fifo);
    let zero = dir.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    for (path, what) in [(&fifo, "a FIFO"), (&zero, "a character device")] {
        for command in ["check", "serve"] {
            let run = tokio::process::Command::new(BIN)
                .args([command, "--config"])
                .arg(path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(20), run)
                .await
                .unwrap_or_else(|_| panic!("`{command}` on {what} did not end within 20 s"))
                .expect("run");
            assert_eq!(out.status.code(), Some(1), "{command} on {what}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!("not a regular file (it is {what})")),
                "{command}: {stderr}"
            );
        }
    }
}

/// `ledger import` rolls up as the writer does, under the config's `[ledger]
/// max_models_per_day`: a key's models past it that day go under `(other)`, not the default cap.
#[test]
fn ledger_import_rolls_up_under_the_configured_max_models_per_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let config = config_in(dir.path(), "http://127.0.0.1:9")
        .replace("[ledger]\n", "[ledger]\nmax_models_per_day = 2\n");
    assert!(config.contains("max_models_per_day = 2"), "{config}");
    std::fs::write(&path, config).expect("write");
    let lines: String = (1..=5)
        .map(|n| {
            format!(
                r#"{{"call_id":"mg_models{n}","ts_ms":{ts},"request_id":"r{n}","key_name":"scraper","key_fp":null,"route":null,"project_name":"Search","project_id":"proj_search","tags":"{{}}","api":"chat.completions","model":"m{n}","stream":false,"status":200,"outcome":"forwarded","error_code":null,"input_tokens":10,"cached_input_tokens":0,"output_tokens":5,"reasoning_tokens":0,"usage_source":"reported","cost_pico":5,"duration_ms":1.0,"ttfb_ms":null,"upstream_response_id":null}}"#,
                ts = 1_780_000_000_000_i64 + i64::from(n)
            ) + "\n"
        })
        .collect();
    let input = dir.path().join("calls.jsonl");
    std::fs::write(&input, lines).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["ledger", "import", "--config"])
        .arg(&path)
        .arg("--input")
        .arg(&input)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).expect("open ledger");
    let mut stmt = conn
        .prepare("SELECT model, requests FROM daily ORDER BY model")
        .expect("prepare");
    let rows: Vec<(String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        rows,
        vec![
            ("(other)".to_owned(), 3),
            ("m1".to_owned(), 1),
            ("m2".to_owned(), 1),
        ]
    );
}

#[test]
fn ledger_import_refuses_a_bad_line_by_number_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, config_in(dir.path(), "http://127.0.0.1:9")).expect("write");
    let line = |n: u32, cost: i64| {
        format!(
            r#"{{"call_id":"mg_import{n}","ts_ms":1780000000000,"request_id":"r{n}","key_name":null,"key_fp":null,"route":null,"project_name":"Search","project_id":"proj_search","tags":"{{}}","api":"chat.completions","model":"m","stream":false,"status":200,"outcome":"forwarded","error_code":null,"input_tokens":10,"cached_input_tokens":0,"output_tokens":5,"reasoning_tokens":0,"usage_source":"reported","cost_pico":{cost},"duration_ms":1.0,"ttfb_ms":null,"upstream_response_id":null}}"#
        )
    };
    let input = dir.path().join("calls.jsonl");
    let import = || {
        std::process::Command::new(BIN)
            .args(["ledger", "import", "--config"])
            .arg(&path)
            .arg("--input")
            .arg(&input)
            .output()
            .expect("run")
    };
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n{}\n",
            line(1, 5),
            line(2, 5),
            line(3, -1_000_000_000_000)
        ),
    )
    .expect("write");
    let out = import();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3: cost_pico is negative"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(ledger_count(dir.path()), 0);

    std::fs::write(&input, format!("{}\n{}\n", line(1, 5), line(2, 5))).expect("write");
    for _ in 0..2 {
        let out = import();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(ledger_count(dir.path()), 2);
    }
}

/// `mantlegate health ARGS`: its exit code, stdout and stderr, and how long it took.
async fn health(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(BIN)
            .arg("health")
            .args(&args)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn health_is_0_for_a_ready_proxy_and_1_with_the_reason_when_it_has_no_upstream_key() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, lines, url) = serve(dir.path(), &config_in(dir.path(), &up.url), "info").await;
    let (code, stdout, stderr, _) = health(&["--url", &format!("{url}/readyz")]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), r#"200 {"status":"ready"}"#);
    stop(child, lines).await;

    // The variable the config names for the upstream key is not set: up, but not ready.
    let keyless = config_tuned(
        &up.url,
        "",
        "api_key_env = \"MANTLEGATE_TEST_HEALTH_UNSET_KEY\"",
        &format!(
            "[ledger]\npath = {:?}\n",
            dir.path().join("keyless.db").display().to_string()
        ),
    );
    let (child, lines, url) = serve(dir.path(), &keyless, "info").await;
    let (code, stdout, stderr, _) = health(&["--url", &format!("{url}/readyz")]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("answered 503"), "{stderr}");
    assert!(stderr.contains("no upstream credentials"), "{stderr}");
    let (code, stdout, stderr, _) = health(&["--url", &format!("{url}/healthz")]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    stop(child, lines).await;
}

/// A peer on a port of its own that, for each connection, reads the request head and then
/// does `answer` with the socket.
fn peer(answer: fn(&mut std::net::TcpStream)) -> String {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/readyz", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut socket in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                answer(&mut socket);
            });
        }
    });
    url
}

#[tokio::test]
async fn health_gives_up_on_closed_silent_dripping_and_non_http_peers_within_its_timeout() {
    use std::io::Write as _;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/readyz", l.local_addr().expect("addr"))
    };
    let silent = peer(|_| std::thread::sleep(Duration::from_secs(30)));
    let drip = peer(|s| {
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let endless_head = peer(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nx-filler: ");
        while s.write_all(&[b'a'; 1024]).is_ok() {}
    });
    let many_headers = peer(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
        while s.write_all(b"x-a: b\r\n").is_ok() {}
    });
    let not_http = peer(|s| {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
    });
    let hangs_up = peer(|_| {});
    let escapes = peer(|s| {
        let _ =
            s.write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 12\r\n\r\nbad\x1b[2J\x07\n\xffok");
    });
    for (url, says) in [
        (closed.as_str(), "cannot reach"),
        (&silent, "no whole answer within 500ms"),
        (&drip, "no whole answer within 500ms"),
        (&endless_head, "a response head longer than 16 KiB"),
        (&many_headers, "too many headers"),
        (&not_http, "did not answer with HTTP"),
        (&hangs_up, "closed before a whole head"),
        (&escapes, "answered 500: bad [2J"),
    ] {
        let (code, stdout, stderr, took) = health(&["--url", url, "--timeout", "500ms"]).await;
        assert_eq!(code, Some(1), "{url}: {stdout}{stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
        assert!(
            !stderr.contains('\x1b'),
            "no escape reaches the terminal: {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(took < Duration::from_secs(3), "{url}: {took:?}");
    }
    // URLs it cannot probe: refused before any connection, with what to give instead.
    for (url, says) in [
        ("https://127.0.0.1:8080/readyz", "only plain http"),
        (
            "127.0.0.1:8080",
            "give one like http://127.0.0.1:8080/readyz",
        ),
    ] {
        let (code, _, stderr, _) = health(&["--url", url]).await;
        assert_eq!(code, Some(1), "{url}: {stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
    }
}

#[tokio::test]
async fn the_admin_api_renders_a_table_as_the_cli_does() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for (key, body) in [
        (CHAT_KEY, CHAT_BODY),
        (SEARCH_KEY, CHAT_BODY),
        (SEARCH_KEY, r#"{"model":"acme.unpriced-1","messages":[]}"#),
    ] {
        let r = proxy.chat_body(key, body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    proxy.wait_for_records(3).await;
    // The CLI reads the proxy's ledger file through a config naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let ledger = format!("[ledger]\npath = {:?}\n", proxy.db.display().to_string());
    std::fs::write(&path, config(&up.url, "reject", &ledger)).expect("write");
    for group_by in ["project", "project,model", "tag:Team,key"] {
        let r = client()
            .get(format!(
                "{}/admin/v1/costs?group_by={group_by}&format=table",
                proxy.url
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; charset=utf-8",
            "{group_by}"
        );
        let api = r.text().await.expect("body");
        let out = std::process::Command::new(BIN)
            .args([
                "report",
                "--format",
                "table",
                "--group-by",
                group_by,
                "--config",
            ])
            .arg(&path)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cli = String::from_utf8_lossy(&out.stdout);
        assert_eq!(api, cli, "group by {group_by}");
        assert!(api.contains("TOTAL"), "{api}");
        assert!(api.contains("note: 1 request had no price"), "{api}");
    }
    // An unknown format is still refused, naming the ones there are.
    let r = client()
        .get(format!("{}/admin/v1/costs?format=xml", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let e = error_of(r).await;
    assert_eq!(e["code"], "invalid_format");
    assert!(
        e["message"].as_str().expect("message").contains("table"),
        "{e}"
    );
}

/// Runs the binary with `args` (the upstream key variable removed); `(success, stdout, stderr)`.
fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("BEDROCK_API_KEY")
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_report_by_a_tag_no_project_has_warns_naming_the_tags_there_are() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let ledger = format!("[ledger]\npath = {:?}\n", proxy.db.display().to_string());
    std::fs::write(&path, config(&up.url, "reject", &ledger)).expect("write");
    let config = path.to_str().expect("utf-8 path");

    let (ok, stdout, stderr) = run(&["report", "--config", config, "--group-by", "tag:Teams"]);
    assert!(ok, "still a report: {stderr}");
    assert!(stdout.contains("(none)"), "{stdout}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning in: {stderr}"));
    for needle in [
        "`Teams`",
        "the tags there are: Team",
        "did you mean --group-by tag:Team?",
    ] {
        assert!(warning.contains(needle), "{needle:?} missing in: {warning}");
    }
    assert!(
        !stdout.contains("warning"),
        "the report itself stays clean: {stdout}"
    );

    // A tag that exists: no warning.
    let (ok, stdout, stderr) = run(&["report", "--config", config, "--group-by", "tag:Team"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("CX"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn budgets_and_report_before_the_ledger_exists_say_so_in_a_sentence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let db = dir.path().join("not-yet.db");
    let extra = format!(
        "[ledger]\npath = {:?}\n[[budgets]]\nname = \"b\"\nproject = \"Chatbot\"\nmonthly_usd = \"5\"\n",
        db.display().to_string()
    );
    std::fs::write(&path, config("http://127.0.0.1:9", "reject", &extra)).expect("write");
    let config = path.to_str().expect("utf-8 path");
    for args in [
        vec!["budgets", "--config", config],
        vec!["report", "--config", config],
        vec!["report", "--config", config, "--format", "json"],
    ] {
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.contains(&format!("no ledger at {} yet", db.display()))
                && stderr.contains("start `mantlegate serve`")
                && stderr.contains("--ledger"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("code 14"), "{stderr}");
        assert!(
            !stderr.to_lowercase().contains("unable to open"),
            "{stderr}"
        );
    }
    assert!(!db.exists(), "reading never creates the ledger");
    // --ledger names another file: missing, it is named; present, it is read.
    let other = dir.path().join("other.db");
    let (ok, _, stderr) = run(&[
        "report",
        "--config",
        config,
        "--ledger",
        other.to_str().expect("path"),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("no ledger at {} yet", other.display())),
        "{stderr}"
    );
}

#[test]
fn check_on_the_demo_config_does_not_ask_for_a_bedrock_key() {
    let (ok, stdout, stderr) = run(&["check", "--config", "config/demo.toml"]);
    assert!(ok, "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("BEDROCK_API_KEY is not set"), "{all}");
    assert!(all.contains("the demo's config"), "{all}");
    assert!(all.contains("needs no Bedrock API key"), "{all}");
    // Any other config without the key still gets the note.
    let (ok, stdout, _) = run(&["check", "--config", "config/mantlegate.example.toml"]);
    assert!(ok);
    assert!(stdout.contains("BEDROCK_API_KEY is not set"), "{stdout}");
}

/// A config with a `payments` project, comments and a route after its one key; its ledger
/// in `dir`.
fn payments_config(upstream: &str, dir: &std::path::Path) -> String {
    format!(
        r#"# Payments team's mantlegate
[upstream]
base_url = "{upstream}"   # bedrock-mantle

[ledger]
path = {:?}

[[projects]]
name = "payments"
id = "proj_pay"

# the checkout service
[[keys]]
name = "checkout"
sha256 = "{}"
projects = ["payments"]

# apps calling /pay/v1 bill payments
[[routes]]
prefix = "/pay"
project = "payments"
"#,
        dir.join("ledger.db").display().to_string(),
        sha(CHAT_KEY)
    )
}

#[test]
fn keys_new_refuses_a_project_the_config_does_not_define_and_suggests_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let text = payments_config("http://127.0.0.1:9", dir.path());
    std::fs::write(&path, &text).expect("write");
    let config = path.to_str().expect("utf-8 path");
    for write in [false, true] {
        let mut args = vec![
            "keys",
            "new",
            "--config",
            config,
            "--name",
            "svc",
            "--project",
            "paymnts",
        ];
        if write {
            args.push("--write");
        }
        let (ok, stdout, stderr) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.contains("project `paymnts` is not defined")
                && stderr.contains("did you mean `payments`?"),
            "{stderr}"
        );
        assert!(!stdout.contains("mg-"), "no key is minted: {stdout}");
    }
    // An id where a name belongs is named for what it is.
    let (ok, _, stderr) = run(&["keys", "new", "--config", config, "--project", "proj_pay"]);
    assert!(!ok);
    assert!(stderr.contains("the id of `payments`"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        text,
        "untouched"
    );
    // --write needs the file to write to.
    let (ok, _, stderr) = run(&["keys", "new", "--write", "--project", "payments"]);
    assert!(!ok);
    assert!(stderr.contains("--config"), "{stderr}");
    // Known projects: the key and its block, the file untouched without --write.
    let (ok, stdout, stderr) = run(&["keys", "new", "--config", config, "--project", "payments"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("projects = [\"payments\"]"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
}

#[tokio::test]
async fn keys_new_write_adds_the_entry_keeping_the_file_and_the_key_works() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let text = payments_config(&up.url, dir.path());
    std::fs::write(&path, &text).expect("write");
    let config = path.to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = run(&[
        "keys",
        "new",
        "--config",
        config,
        "--name",
        "refunds \"v2\"",
        "--project",
        "payments",
        "--write",
    ]);
    assert!(ok, "{stderr}");
    let key = stdout
        .lines()
        .find(|l| l.starts_with("mg-"))
        .expect("the key, printed")
        .to_owned();
    assert_eq!(stdout.matches(&key).count(), 1, "printed once: {stdout}");
    let written = std::fs::read_to_string(&path).expect("read");
    assert!(!written.contains(&key), "the key itself is never written");
    let block = format!(
        "\n[[keys]]\nname = 'refunds \"v2\"'\nsha256 = \"{}\"\nprojects = [\"payments\"]\n",
        sha(&key)
    );
    // Right after the last [[keys]] entry; every other byte as it was.
    let expected = text.replace(
        "projects = [\"payments\"]\n\n# apps calling",
        &format!("projects = [\"payments\"]\n{block}\n# apps calling"),
    );
    assert_eq!(written, expected);
    let (ok, stdout, stderr) = run(&["check", "--config", config]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 key(s)"), "{stdout}");

    // Served, the new key is attributed to its project.
    let (child, lines, url) = serve(dir.path(), &written, "info").await;
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_pay");
    stop(child, lines).await;
}

#[test]
fn check_suggests_project_names_and_locates_problems_by_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let text = format!(
        r#"[upstream]
base_url = "https://bedrock-mantle.us-east-1.api.aws"

[[projects]]
name = "payments"
id = "proj_pay"

[[keys]]
name = "checkout"
sha256 = "{}"
projects = ["payments"]

[[keys]]
name = "refunds"
sha256 = "{}"
projects = ["paymnts"]

[[budgets]]
name = "pay-monthly"
project = "Payment"
monthly_usd = "100"

[[rate_limits]]
key = "chekout"
requests_per_minute = 10
"#,
        sha("mg-a"),
        sha("mg-b")
    );
    std::fs::write(&path, &text).expect("write");
    let (ok, _, stderr) = run(&["check", "--config", path.to_str().expect("path")]);
    assert!(!ok);
    let line_of = |needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .expect("in the fixture")
            + 1
    };
    for expected in [
        format!(
            "keys[1].projects[0] (line {}): project `paymnts` is not declared in [[projects]]; did you mean `payments`?",
            line_of("\"paymnts\"")
        ),
        format!(
            "budgets[0].project (line {}): project `Payment` is not declared in [[projects]]; did you mean `payments`?",
            line_of("\"Payment\"")
        ),
        format!(
            "rate_limits[0].key (line {}): no [[keys]] entry is named `chekout`; did you mean `checkout`?",
            line_of("\"chekout\"")
        ),
    ] {
        assert!(
            stderr.contains(&expected),
            "{expected:?} missing in:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
}

#[test]
fn check_counts_budgets_prices_and_rate_limits() {
    let (ok, stdout, stderr) = run(&["check", "--config", "config/mantlegate.example.toml"]);
    assert!(ok, "{stderr}");
    let first = stdout.lines().next().expect("summary");
    let config = std::fs::read_to_string("config/mantlegate.example.toml").expect("read");
    let count = |table: &str| config.lines().filter(|l| l.trim() == table).count();
    for expected in [
        format!("{} budget(s)", count("[[budgets]]")),
        format!("{} rate limit(s)", count("[[rate_limits]]")),
        "3 project(s), 3 key(s), 1 route(s)".to_owned(),
    ] {
        assert!(first.contains(&expected), "{expected:?} missing in {first}");
    }
    assert!(count("[[budgets]]") > 0 && count("[[rate_limits]]") > 0);
    assert!(first.contains(" price(s) ("), "{first}");
    assert!(
        stdout.contains("  budget chatbot-monthly: $500 a month"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  rate limit key batch-jobs: 60 requests a minute"),
        "{stdout}"
    );
}

#[test]
fn check_warns_of_models_priced_only_by_the_bundled_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let config = path.to_str().expect("path");
    let bundled = |stdout: &str| {
        stdout
            .lines()
            .find(|l| l.contains("priced only by the bundled table"))
            .map(str::to_owned)
    };
    // The operator prices one bundled model: it leaves the warning's list, the rest stay.
    let own = "[[prices]]\nmodel = \"openai.gpt-oss-120b\"\ninput_per_million = \"0.15\"\noutput_per_million = \"0.60\"\n";
    let with_builtin = config_with_prices(&format!("[pricing]\nbuiltin = true\n{own}"));
    std::fs::write(&path, &with_builtin).expect("write");
    let (ok, stdout, stderr) = run(&["check", "--config", config]);
    assert!(ok, "{stderr}");
    let warning = bundled(&stdout).unwrap_or_else(|| panic!("no warning in:\n{stdout}"));
    assert!(warning.contains("warning:"), "{warning}");
    assert!(warning.contains("openai.gpt-oss-20b"), "{warning}");
    assert!(
        !warning.contains("openai.gpt-oss-120b,") && !warning.contains("openai.gpt-oss-120b."),
        "{warning}"
    );
    assert!(
        warning.contains("https://aws.amazon.com/bedrock/pricing/"),
        "{warning}"
    );
    // Every price the operator's own: no warning.
    std::fs::write(
        &path,
        config_with_prices(&format!("[pricing]\nbuiltin = false\n{own}")),
    )
    .expect("write");
    let (ok, stdout, stderr) = run(&["check", "--config", config]);
    assert!(ok, "{stderr}");
    assert_eq!(bundled(&stdout), None, "{stdout}");
    assert!(
        stdout.contains("1 price(s) (0 from the bundled table)"),
        "{stdout}"
    );
}

/// The standard test config with its `[pricing]` and `[[prices]]` replaced by `prices`.
fn config_with_prices(prices: &str) -> String {
    let base = config("http://127.0.0.1:9", "reject", "");
    let start = base.find("[pricing]").expect("pricing");
    let end = base.find("[metrics]").expect("metrics");
    format!("{}{prices}\n{}", &base[..start], &base[end..])
}

#[test]
fn check_warns_of_a_tag_budget_no_project_falls_under() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let extra = "[[budgets]]\nname = \"cx\"\ntag = { Team = \"cx\" }\nmonthly_usd = \"10\"\n\
                 [[budgets]]\nname = \"by-key\"\ntag = { Teams = \"CX\" }\nmonthly_usd = \"10\"\n\
                 [[budgets]]\nname = \"fine\"\ntag = { Team = \"CX\" }\nmonthly_usd = \"10\"\n";
    std::fs::write(&path, config("http://127.0.0.1:9", "reject", extra)).expect("write");
    let (ok, stdout, stderr) = run(&["check", "--config", path.to_str().expect("path")]);
    assert!(ok, "{stderr}");
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("warning: budget"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stdout}");
    assert!(
        warnings[0].contains("budget `cx` counts the projects tagged Team=cx, and no project is; did you mean Team=CX?"),
        "{stdout}"
    );
    assert!(
        warnings[1].contains("budget `by-key`") && warnings[1].contains("did you mean tag `Team`?"),
        "{stdout}"
    );
}
