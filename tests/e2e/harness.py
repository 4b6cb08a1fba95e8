"""Processes and logs for the end-to-end suite: the simulated upstream, the proxy, their output.

Everything here waits on output lines with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import openai

REPO = Path(__file__).resolve().parents[2]

# Caller keys of the test configuration, and the upstream (Bedrock) key the proxy holds.
CHATBOT_KEY = "mg-e2e-chatbot"
SEARCH_KEY = "mg-e2e-search"
UNASSIGNED_KEY = "mg-e2e-unassigned"
UNKNOWN_KEY = "mg-e2e-not-configured"
LIMITED_KEY = "mg-e2e-limited"
CAPPED_KEY = "mg-e2e-capped"
UPSTREAM_KEY = "e2e-upstream-key"
SECRETS = (CHATBOT_KEY, SEARCH_KEY, UNASSIGNED_KEY, UNKNOWN_KEY, LIMITED_KEY, CAPPED_KEY, UPSTREAM_KEY)

START_TIMEOUT = 20.0  # seconds for a process to print its `listening` line
LOG_TIMEOUT = 10.0  # seconds for an access-log line to appear after its call
STOP_TIMEOUT = 15.0  # seconds for a process to exit after SIGTERM


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mantlegate_bin() -> Path:
    return Path(os.environ.get("MANTLEGATE_BIN", REPO / "target" / "debug" / "mantlegate"))


def proxy_config(upstream_addr: str, ledger: Path) -> str:
    return f"""\
[ledger]
path = "{ledger}"

[upstream]
base_url = "http://{upstream_addr}"
[[upstream.model_prefixes]]
model = "openai.gpt-5*"
prefix = "/openai/v1"

[attribution]
on_missing = "reject"

[[projects]]
name = "CustomerChatbot-Prod"
id = "proj_chatbot"
tags = {{ Team = "CX" }}
[[projects]]
name = "DocSearch-Dev"
id = "proj_search"

[[keys]]
name = "chatbot-backend"
sha256 = "{sha256_hex(CHATBOT_KEY)}"
projects = ["CustomerChatbot-Prod"]
[[keys]]
name = "search-team"
sha256 = "{sha256_hex(SEARCH_KEY)}"
projects = ["DocSearch-Dev", "CustomerChatbot-Prod"]
[[keys]]
name = "unassigned"
sha256 = "{sha256_hex(UNASSIGNED_KEY)}"
projects = []

[[routes]]
prefix = "/docsearch"
project = "DocSearch-Dev"

# Governance: a key limited to 2 requests a minute, and a project whose budget is spent.
[[projects]]
name = "Capped"
id = "proj_capped"
[[keys]]
name = "limited"
sha256 = "{sha256_hex(LIMITED_KEY)}"
projects = ["DocSearch-Dev"]
[[keys]]
name = "capped"
sha256 = "{sha256_hex(CAPPED_KEY)}"
projects = ["Capped"]
[[rate_limits]]
key = "limited"
requests_per_minute = 2
[[budgets]]
name = "capped-monthly"
project = "Capped"
monthly_usd = "0.000001"
action = "block"
"""


# Looked up once here: the child, between fork and exec, only calls it.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, SIGTERM the child if pytest itself dies, so that a
    killed test run leaves no proxy or simulator behind."""
    if _prctl is not None:
        PR_SET_PDEATHSIG = 1
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Process:
    """A mantlegate subcommand whose stdout (JSON lines) and stderr are collected as they come.

    Stdout lines are parsed into `records` (non-JSON lines are kept as `{"raw": line}`);
    `wait_for` blocks on a condition variable until a record matches or the deadline passes.
    """

    def __init__(self, name: str, args: list[str], env: Optional[dict[str, str]] = None):
        self.name = name
        self.args = args
        self.raw_stdout: list[str] = []
        self.raw_stderr: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            preexec_fn=_die_with_parent,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{name}-stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    record = {"raw": line}
            except json.JSONDecodeError:
                record = {"raw": line}
            with self._cond:
                self.raw_stdout.append(line)
                self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw_stderr.append(line.rstrip("\n"))

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float
    ) -> dict[str, Any]:
        """The first record matching `predicate`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for record in self.records[seen:]:
                    if predicate(record):
                        return record
                seen = len(self.records)
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
        state = f"exited with {self.proc.poll()}" if self.proc.poll() is not None else "running"
        raise AssertionError(
            f"{self.name} ({state}): no {what} within {timeout}s.\n"
            f"--- stdout (last 20) ---\n" + "\n".join(self.raw_stdout[-20:]) + "\n"
            f"--- stderr (last 20) ---\n" + "\n".join(self.raw_stderr[-20:])
        )

    def wait_listening(self) -> str:
        """The `addr` of the `listening` line (the port 0 picked)."""
        record = self.wait_for(
            lambda r: r.get("message") == "listening", "`listening` line", START_TIMEOUT
        )
        return record["addr"]

    def all_output(self) -> list[str]:
        with self._cond:
            return self.raw_stdout + self.raw_stderr

    def stop(self) -> Optional[int]:
        """SIGTERM, then wait; SIGKILL only if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        for t in self._threads:
            t.join(STOP_TIMEOUT)
        return self.proc.returncode


class Proxy:
    """The running proxy: its address, client factory and access log."""

    def __init__(self, process: Process, addr: str, ledger: Path):
        self.process = process
        self.addr = addr
        self.ledger = ledger

    def ledger_row(self, request_id: str, timeout: float = LOG_TIMEOUT) -> dict[str, Any]:
        """The ledger record of a call, once the background writer has committed it."""
        deadline = time.monotonic() + timeout
        while True:
            with sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True) as conn:
                conn.row_factory = sqlite3.Row
                row = conn.execute("SELECT * FROM calls WHERE request_id = ?", (request_id,)).fetchone()
            if row is not None:
                return dict(row)
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger record for {request_id} after {timeout}s")
            # The writer commits within milliseconds; this is a bounded wait for that commit.
            time.sleep(0.02)

    def base_url(self, route: str = "") -> str:
        return f"http://{self.addr}{route}/v1"

    def client(
        self,
        api_key: str,
        *,
        project: Optional[str] = None,
        route: str = "",
        max_retries: int = 2,
    ) -> openai.OpenAI:
        """An SDK client as a team would configure it: base_url, api_key and maybe project."""
        return openai.OpenAI(
            base_url=self.base_url(route),
            api_key=api_key,
            project=project,
            max_retries=max_retries,
            timeout=15.0,
        )

    def access_lines(self) -> list[dict[str, Any]]:
        with self.process._cond:
            return [r for r in self.process.records if r.get("message") == "access"]

    def access(self, request_id: str) -> dict[str, Any]:
        """The access-log line of the call whose response carried `x-request-id: request_id`."""
        assert request_id, "the response carried no x-request-id"
        return self.process.wait_for(
            lambda r: r.get("message") == "access" and r.get("request_id") == request_id,
            f"access line with request_id={request_id}",
            LOG_TIMEOUT,
        )
