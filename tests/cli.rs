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
