//! The real binary, as an operator runs it: `serve` on port 0, its log lines, SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::UPSTREAM_KEY;

/// The `mantlegate` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_mantlegate");

/// A running `serve`: the child (killed when dropped), its log lines, its URL.
pub type Served = (Child, mpsc::UnboundedReceiver<String>, String);

/// Writes `config_text` to `dir/mantlegate.toml` and runs `serve` with it.
pub async fn serve(dir: &Path, config_text: &str, log_level: &str) -> Served {
    let path = dir.join("mantlegate.toml");
    std::fs::write(&path, config_text).expect("write");
    serve_file(&path, log_level, &[]).await
}

/// Runs `serve --listen 127.0.0.1:0 --config path` (with `env` added) and waits for its
/// `listening` line; the lines before it stay in the returned receiver.
pub async fn serve_file(path: &Path, log_level: &str, env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(path)
        .env("BEDROCK_API_KEY", UPSTREAM_KEY)
        .env("MANTLEGATE_LOG", log_level)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let (tx, mut rx) = mpsc::unbounded_channel();
    for reader in [
        Box::new(child.stdout.take().expect("stdout"))
            as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut before = Vec::new();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("serve logs within 20s")
            .unwrap_or_else(|| panic!("serve exited: {before:?}"));
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["message"] == "listening"
        {
            let addr = v["addr"].as_str().expect("addr").to_owned();
            assert!(!addr.ends_with(":0"), "the log shows the real port: {line}");
            break format!("http://{addr}");
        }
        before.push(line);
    };
    let (tx2, rx2) = mpsc::unbounded_channel();
    for l in before {
        let _ = tx2.send(l);
    }
    tokio::spawn(async move {
        while let Some(l) = rx.recv().await {
            if tx2.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx2, url)
}

/// Sends SIGTERM, expects a clean exit within 20 s, and returns every log line.
pub async fn stop(mut child: Child, mut lines: mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    let mut all = Vec::new();
    while let Some(l) = lines.recv().await {
        all.push(l);
    }
    all
}
