#!/usr/bin/env python3
"""Fleet soak: two mantlegate replicas sharing a PostgreSQL ledger and a Redis, under faults.

Usage: bench/fleet_soak.py --mantlegate target/release/mantlegate [--seconds 1800] [...]
(or `bench/run.sh fleet-soak`, which builds the binary first). Standard library only, plus
`psql` and `redis-server` on the PATH.

What it starts, each on a free loopback port, and stops at the end:
  - the simulated bedrock-mantle (`mantlegate simulate`, stream events --event-delay-ms apart);
  - its own `redis-server` (no persistence) as the replicas' `[limits] store`;
  - a scratch database on --pg (created here, dropped at the end) behind a TCP proxy in this
    script, which can cut PostgreSQL off (listener closed: connections refused; open ones reset)
    and stall it (bytes held, in both directions, until the stall ends);
  - two replicas (`mantlegate serve`) with the same config: four projects, keys, a block budget
    the traffic runs out of, an alert budget and a tag budget it spends against, a Redis rate
    limit the traffic runs into, the SQLite-free PostgreSQL ledger (through the proxy).

--concurrency clients (keep-alive, each on one replica, alternating) send for --seconds a mix
of non-streamed chat, chat streams with and without usage asked, Responses streams and streams
hung up on after their first event, on three keys (the app's, the capped project's, the rate
limited one's). Every answer is checked: 200 with a complete body, or 429 `budget_exceeded` /
`rate_limit_exceeded` on the keys that can get them; anything else is a failed call.

Meanwhile: every --reload-every seconds the config is rewritten (an unused key disabled or
enabled, that key's rate limit changed, the alert budget's thresholds changed) and both
replicas get SIGHUP; Redis is killed and restarted twice; PostgreSQL is cut off twice and
stalled once (durations scale with short runs; see `schedule`).

At the end, with the traffic stopped and both replicas' ledger queues empty:
  - the ledger holds exactly one row per call a client sent, each under the x-request-id the
    client got, with the status the client got (a hang-up: the stream's 200), and nothing else;
  - each budget's spend on both replicas (`/admin/v1/budgets`) equals, to the digit, the sum
    of cost_pico over its calls of the month computed by SQL from `calls`, and nothing is
    reserved on either (`reserved_usd` and `other_replicas_reserved_usd` 0);
  - memory is flat on both replicas (the rule of bench/soak.py);
  - no record dropped, no config reload refused.
Prints the Markdown report to stdout (or --out); exits 1 when any check fails.
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import (CHAT, RESPONSES, machine, commit, mib, problem, proc_status,  # noqa: E402
                  read_chunk, read_head, verdict, FLAT_MIB, FLAT_PERCENT)

ADMIN_TOKEN = "mg-soak-admin-token"
# Client keys (public: they guard nothing but this run's throwaway replicas).
KEYS = {
    "soak-app": "mg-soak-app-0123456789abcdef",
    "soak-capped": "mg-soak-capped-0123456789abcdef",
    "soak-limited": "mg-soak-limited-0123456789abcdef",
    "soak-idle": "mg-soak-idle-0123456789abcdef",
}
# Share of calls per key (soak-idle sends none: it is the one the reloads toggle).
KEY_SHARES = {"soak-app": 70, "soak-capped": 15, "soak-limited": 15}
# Refusals a key's calls may get.
ALLOWED_REFUSALS = {"soak-app": set(), "soak-capped": {"budget_exceeded"},
                    "soak-limited": {"rate_limit_exceeded"}}
# kind: (share in %, path, body); "hang_up" is a stream closed after its first event.
MIX = {
    "chat": (40, "/v1/chat/completions", CHAT),
    "chat_stream": (25, "/v1/chat/completions", {**CHAT, "stream": True}),
    "chat_stream_usage": (10, "/v1/chat/completions",
                          {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    "responses_stream": (20, "/v1/responses", RESPONSES),
    "hang_up": (5, None, None),
}
CALL_TIMEOUT = 120


def log(msg):
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# PostgreSQL through a proxy the script controls


class Conn:
    def __init__(self, cr, cw, ur, uw):
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.dead = False

    def reset(self):
        """Both sides closed with a TCP reset."""
        self.dead = True
        for w in (self.cw, self.uw):
            sock = w.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            w.transport.abort()


class PgProxy:
    """TCP proxy to PostgreSQL: `up`, `cut` (refused, open connections reset) or `stalled`
    (connections accepted, bytes held both ways until the stall ends; a side that closes
    meanwhile takes the other with it)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.server = None
        self.conns = set()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.state = "up"
        self.accepted = 0
        self.resets = 0

    async def listen(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port,
                                                 reuse_address=True)

    async def handle(self, cr, cw):
        self.accepted += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.transport.abort()
            return
        conn = Conn(cr, cw, ur, uw)
        self.conns.add(conn)
        try:
            await asyncio.gather(self.pump(cr, uw, conn), self.pump(ur, cw, conn))
        finally:
            self.conns.discard(conn)
            if not conn.dead:
                conn.reset()

    async def pump(self, src, dst, conn):
        """Reads `src` all along (so a peer leaving is seen, stalled or not) into a buffer that
        is written to `dst` while the proxy is not stalled."""
        buf = bytearray()
        have = asyncio.Event()
        ended = False

        async def write():
            while True:
                await have.wait()
                await self.flowing.wait()
                if conn.dead:
                    return
                if buf:
                    data = bytes(buf)
                    buf.clear()
                    dst.write(data)
                    await dst.drain()
                if ended and not buf:
                    return
                if not buf:
                    have.clear()

        writer = asyncio.ensure_future(write())
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                buf += data
                have.set()
            if self.flowing.is_set():
                # The peer is done: what it sent last still goes through.
                ended = True
                have.set()
                await asyncio.wait_for(writer, 10)
        except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            writer.cancel()
            if not conn.dead:
                conn.reset()

    async def cut(self):
        self.state = "cut"
        self.server.close()
        await self.server.wait_closed()
        for c in list(self.conns):
            c.reset()
            self.resets += 1

    async def restore(self):
        if self.state == "cut":
            await self.listen()
        self.state = "up"
        self.flowing.set()

    def stall(self):
        self.state = "stalled"
        self.flowing.clear()


# ------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process whose stdout lines are read as they come: `listening` lines give its
    address; mantlegate's access lines are counted and dropped, other lines kept."""

    def __init__(self, name, argv, env, logpath):
        self.name, self.argv, self.env = name, argv, env
        self.log = open(logpath, "a")
        self.addr = None
        self.access_lines = 0
        self.reloads = 0
        self.messages = {}
        self.proc = None
        self.listening = asyncio.Event()

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.reader = asyncio.ensure_future(self.read())
        await asyncio.wait_for(self.listening.wait(), 30)
        return self

    async def read(self):
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace")
            if '"message":"access"' in text:
                self.access_lines += 1
                continue
            self.log.write(text)
            self.log.flush()
            m = re.search(r'"message":"((?:[^"\\]|\\.)*)"', text)
            if m:
                msg = m.group(1)
                lvl = re.search(r'"level":"([A-Z]+)"', text)
                key = f"{lvl.group(1) if lvl else '?'} {msg}"
                self.messages[key] = self.messages.get(key, 0) + 1
                if msg == "config reloaded":
                    self.reloads += 1
                if msg == "listening" and self.addr is None:
                    a = re.search(r'"addr":"([^"]+)"', text)
                    if a:
                        self.addr = a.group(1)
                        self.listening.set()
            elif "Ready to accept connections" in text or "ready to accept" in text:
                self.listening.set()

    @property
    def pid(self):
        return self.proc.pid

    async def stop(self, sig=signal.SIGTERM, timeout=40):
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        try:
            await asyncio.wait_for(self.reader, 5)
        except asyncio.TimeoutError:
            pass
        return self.proc.returncode


def psql(url, sql):
    out = subprocess.run(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                         capture_output=True, text=True, env={**os.environ,
                                                               "PGOPTIONS": "--client-min-messages=warning"})
    if out.returncode != 0:
        raise RuntimeError(f"psql: {out.stderr.strip()}")
    return out.stdout


async def apsql(url, sql):
    return await asyncio.to_thread(psql, url, sql)


# ------------------------------------------------------------------------------------------
# Config


def config_text(args, n, upstream, pg_url, redis_port):
    """The replicas' config at reload `n`: even and odd differ in what no traffic depends on
    (soak-idle disabled or not, its rate limit, the alert budget's thresholds)."""
    odd = n % 2 == 1
    keys = "".join(
        f'[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
        f'projects = ["{proj}"]\n' + ("disabled = true\n" if name == "soak-idle" and odd else "")
        + "\n"
        for name, secret, proj in [
            ("soak-app", KEYS["soak-app"], "Soak-App"),
            ("soak-capped", KEYS["soak-capped"], "Soak-Capped"),
            ("soak-limited", KEYS["soak-limited"], "Soak-Limited"),
            ("soak-idle", KEYS["soak-idle"], "Soak-Idle"),
        ])
    thresholds = "[0.25, 0.5, 0.75, 1.0]" if odd else "[0.5, 0.8, 1.0]"
    return f"""# Written by bench/fleet_soak.py (reload {n}).
[server]
listen = "127.0.0.1:0"
drain_timeout = "20s"

[upstream]
base_url = "http://{upstream}"
api_key_env = "SOAK_BEDROCK_API_KEY"
retries = 0

[attribution]
on_missing = "reject"

[[projects]]
name = "Soak-App"
id = "proj_soakapp"
tags = {{ Team = "Soak", Environment = "Production" }}

[[projects]]
name = "Soak-Capped"
id = "proj_soakcapped"
tags = {{ Team = "Soak", Environment = "Development" }}

[[projects]]
name = "Soak-Limited"
id = "proj_soaklimited"
tags = {{ Team = "Limited", Environment = "Production" }}

[[projects]]
name = "Soak-Idle"
id = "proj_soakidle"
tags = {{ Team = "Soak", Environment = "Staging" }}

{keys}[ledger]
url = "{pg_url}"
budget_refresh = "1s"

[admin]
token_env = "SOAK_ADMIN_TOKEN"

[pricing]
builtin = true

[[budgets]]
name = "app-alert"
project = "Soak-App"
monthly_usd = "{args.app_usd}"
action = "alert"
alert_at = {thresholds}

[[budgets]]
name = "capped-block"
project = "Soak-Capped"
monthly_usd = "{args.capped_usd}"
action = "block"

[[budgets]]
name = "team-soak"
tag = {{ Team = "Soak" }}
monthly_usd = "1000"
action = "alert"

[[rate_limits]]
key = "soak-limited"
requests_per_minute = {args.limited_rpm}

[[rate_limits]]
project = "Soak-Limited"
tokens_per_minute = {args.limited_tpm}

[[rate_limits]]
key = "soak-idle"
requests_per_minute = {120 if odd else 60}

[limits]
store = "redis://127.0.0.1:{redis_port}/0"
"""


def write_config(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Traffic


class Stats:
    def __init__(self):
        self.sent = {k: 0 for k in MIX}
        self.ok = {k: 0 for k in MIX}
        self.by_key = {k: {} for k in KEY_SHARES}   # key -> status/code -> n
        self.failed = {}
        self.answered = {}    # x-request-id -> status
        self.dup_ids = 0
        self.connections = 0
        self.running = True
        self.latency_max = 0.0

    def total_sent(self):
        return sum(self.sent.values())

    def fail(self, kind, why):
        k = f"{kind}: {why}"
        self.failed[k] = self.failed.get(k, 0) + 1

    def answer(self, rid, status):
        if rid in self.answered:
            self.dup_ids += 1
        self.answered[rid] = status


def render(host, port, path, body, key):
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {KEYS[key]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def read_sized_or_chunked(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if "chunked" not in headers.get("transfer-encoding", ""):
        raise ValueError("answer neither sized nor chunked")
    body = bytearray()
    while chunk := await read_chunk(reader):
        body += chunk
    return bytes(body)


async def one_call(stats, reader, writer, payload, kind, key, hang_up):
    """Sends one call and reads its answer; returns whether the connection may be reused."""
    writer.write(payload)
    await writer.drain()
    stats.sent[kind] += 1
    status, headers = await read_head(reader)
    rid = headers.get("x-request-id")
    if rid is None:
        stats.fail(kind, f"status {status} without x-request-id")
    else:
        stats.answer(rid, status)
    if hang_up and status == 200:
        await read_chunk(reader)
        stats.ok[kind] += 1
        stats.by_key[key]["200"] = stats.by_key[key].get("200", 0) + 1
        return False
    body = await read_sized_or_chunked(reader, headers)
    reuse = headers.get("connection", "").lower() != "close"
    if status == 200:
        why = None if hang_up else problem(kind, body)
        if why:
            stats.fail(kind, why)
        else:
            stats.ok[kind] += 1
            stats.by_key[key]["200"] = stats.by_key[key].get("200", 0) + 1
        return reuse
    code = None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        pass
    label = f"{status} {code}"
    stats.by_key[key][label] = stats.by_key[key].get(label, 0) + 1
    if status == 429 and code in ALLOWED_REFUSALS[key]:
        stats.ok[kind] += 1
    else:
        stats.fail(kind, f"{key}: {label}")
    return reuse


async def worker(i, args, stats, rng, replicas, requests):
    kinds = list(MIX)
    weights = [MIX[k][0] for k in kinds]
    keys = list(KEY_SHARES)
    key_weights = [KEY_SHARES[k] for k in keys]
    streams = ["chat_stream", "responses_stream"]
    conn = None
    target = replicas[i % len(replicas)]
    while stats.running:
        kind = rng.choices(kinds, weights)[0]
        key = rng.choices(keys, key_weights)[0]
        hang_up = kind == "hang_up"
        body_kind = rng.choices(streams, [25, 20])[0] if hang_up else kind
        payload = requests[(target.addr, body_kind, key)]
        started = time.monotonic()
        try:
            if conn is None:
                host, port = target.addr.rsplit(":", 1)
                conn = await asyncio.open_connection(host, int(port))
                stats.connections += 1
            reuse = await asyncio.wait_for(
                one_call(stats, conn[0], conn[1], payload, kind, key, hang_up), CALL_TIMEOUT)
            if not reuse:
                conn[1].close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                asyncio.TimeoutError) as exc:
            stats.fail(kind, type(exc).__name__)
            if conn is not None:
                conn[1].close()
            conn = None
        stats.latency_max = max(stats.latency_max, time.monotonic() - started)
    if conn is not None:
        conn[1].close()


# ------------------------------------------------------------------------------------------
# Observing the replicas


async def http_get(addr, path):
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}"
                 "\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return body


async def metrics(addr):
    """mantlegate's /metrics, summed by metric name (labels dropped)."""
    out = {}
    try:
        text = (await http_get(addr, "/metrics")).decode()
    except (OSError, asyncio.TimeoutError):
        return out
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0) + float(value)
        except ValueError:
            pass
    return out


def metric(m, name):
    """A metric by name, with or without the `_total` suffix of counters."""
    for n in (name, name + "_total"):
        if n in m:
            return m[n]
    return None


async def budgets(addr):
    return {b["name"]: b for b in json.loads(await http_get(addr, "/admin/v1/budgets"))["data"]}


async def sample(replicas, stats, started, db_url, pg, events):
    rows = int((await apsql(db_url, "SELECT count(*) FROM calls")).strip())
    out = {"t": time.monotonic() - started, "sent": stats.total_sent(), "rows": rows,
           "pg": pg.state, "events": list(events), "replicas": []}
    events.clear()
    for r in replicas:
        s = proc_status(r.pid)
        m = await metrics(r.addr)
        out["replicas"].append({
            "rss_kib": s["VmRSS"], "hwm_kib": s["VmHWM"], "fds": s["fds"],
            "threads": s["Threads"],
            "queue": metric(m, "mantlegate_ledger_queue_depth"),
            "in_flight": metric(m, "mantlegate_in_flight_requests"),
            "store_up": metric(m, "mantlegate_rate_limit_store_up"),
        })
    return out


# ------------------------------------------------------------------------------------------
# The run


def parse_faults(text):
    """`--faults`: `WHAT@AT+FOR,...` (seconds), WHAT one of redis_kill, pg_cut, pg_stall."""
    out = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(redis_kill|pg_cut|pg_stall)@([\d.]+)\+([\d.]+)", item.strip())
        if not m:
            raise argparse.ArgumentTypeError(f"--faults: cannot read {item!r}")
        out.append((float(m.group(2)), m.group(1), float(m.group(3))))
    return sorted(out)


def schedule(seconds):
    """(time, what, duration) of the faults: Redis killed twice, PostgreSQL cut off twice and
    stalled once, spread over the run (durations shrink for short runs)."""
    outage = min(30.0, seconds / 10)
    stall = min(35.0, seconds / 10)
    redis_down = min(20.0, seconds / 12)
    return sorted([
        (0.20 * seconds, "redis_kill", redis_down),
        (0.35 * seconds, "pg_cut", outage),
        (0.55 * seconds, "pg_cut", outage),
        (0.65 * seconds, "redis_kill", redis_down),
        (0.78 * seconds, "pg_stall", stall),
    ])


async def run(args, work):
    db = f"mg_fleet_soak_{os.getpid()}"
    base = args.pg.rstrip("/")
    admin_url = f"{base}/postgres"
    db_url = f"{base}/{db}"
    pg_port = int(re.search(r":(\d+)$", base.split("@")[-1]).group(1))
    procs = []
    result = {"ok": False}
    psql(admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    psql(admin_url, f"CREATE DATABASE {db}")
    log(f"scratch database {db}")
    pg = PgProxy(pg_port)
    await pg.listen()
    try:
        env = {**os.environ, "SOAK_BEDROCK_API_KEY": "soak-upstream-key",
               "SOAK_ADMIN_TOKEN": ADMIN_TOKEN, "MANTLEGATE_LOG": "info"}
        upstream = await Proc("upstream", [args.mantlegate, "simulate", "--listen", "127.0.0.1:0",
                                           "--event-delay-ms", str(args.event_delay_ms)],
                              env, f"{work}/upstream.log").start()
        procs.append(upstream)
        redis_port = free_port()
        redis_argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", work]
        redis = await Proc("redis", redis_argv, env, f"{work}/redis.log").start()
        procs.append(redis)
        pg_url = f"postgres://postgres@127.0.0.1:{pg.port}/{db}"
        cfg_paths = [f"{work}/a/mantlegate.toml", f"{work}/b/mantlegate.toml"]
        reload_n = 0
        for p in cfg_paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            write_config(p, config_text(args, reload_n, upstream.addr, pg_url, redis_port))
        replicas = []
        for name, p in zip("ab", cfg_paths):
            r = Proc(f"replica-{name}", [args.mantlegate, "serve", "--config", p], env,
                     f"{work}/replica-{name}.log")
            r.env = {**env}
            await r.start()
            replicas.append(r)
            procs.append(r)
        log(f"upstream {upstream.addr}, redis :{redis_port}, postgres proxy :{pg.port} -> "
            f":{pg_port}, replicas {replicas[0].addr} (pid {replicas[0].pid}) and "
            f"{replicas[1].addr} (pid {replicas[1].pid})")
        with open("/proc/loadavg") as f:
            load_start = " ".join(f.read().split()[:3])
        requests = {}
        for r in replicas:
            host, port = r.addr.rsplit(":", 1)
            for kind, (_, path, body) in MIX.items():
                if path:
                    for key in KEY_SHARES:
                        requests[(r.addr, kind, key)] = render(host, port, path, body, key)
        stats = Stats()
        events = []
        fault_log = []
        started = time.monotonic()
        samples = [await sample(replicas, stats, started, db_url, pg, events)]
        workers = [asyncio.create_task(worker(i, args, stats, random.Random(args.seed * 1000 + i),
                                              replicas, requests))
                   for i in range(args.concurrency)]

        async def reloader():
            nonlocal reload_n
            while stats.running:
                await asyncio.sleep(args.reload_every)
                if not stats.running:
                    break
                reload_n += 1
                for p in cfg_paths:
                    write_config(p, config_text(args, reload_n, upstream.addr, pg_url,
                                                redis_port))
                for r in replicas:
                    r.proc.send_signal(signal.SIGHUP)

        async def faults():
            nonlocal redis
            for at, what, dur in args.faults or schedule(args.seconds):
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                t = time.monotonic() - started
                if what == "redis_kill":
                    await redis.stop(signal.SIGKILL)
                    events.append("redis killed")
                    log(f"{t:6.0f} s  redis killed for {dur:.0f} s")
                    await asyncio.sleep(dur)
                    redis = await Proc("redis", redis_argv, env, f"{work}/redis.log").start()
                    procs.append(redis)
                    events.append("redis back")
                elif what == "pg_cut":
                    await pg.cut()
                    events.append("pg cut off")
                    log(f"{t:6.0f} s  postgres cut off for {dur:.0f} s")
                    await asyncio.sleep(dur)
                    await pg.restore()
                    events.append("pg back")
                else:
                    pg.stall()
                    events.append("pg stalled")
                    log(f"{t:6.0f} s  postgres stalled for {dur:.0f} s")
                    await asyncio.sleep(dur)
                    await pg.restore()
                    events.append("pg flowing")
                fault_log.append((t, what, dur))

        reload_task = asyncio.create_task(reloader())
        fault_task = asyncio.create_task(faults())
        n = 1
        while (due := started + n * args.sample) <= started + args.seconds + 0.001:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            s = await sample(replicas, stats, started, db_url, pg, events)
            samples.append(s)
            a, b = s["replicas"]
            log(f"{s['t']:6.0f} s  sent {s['sent']:>9,}  ledger {s['rows']:>9,}  pg {s['pg']:7}  "
                f"RSS {mib(a['rss_kib']):5.1f}/{mib(b['rss_kib']):5.1f} MiB  queue "
                f"{a['queue']}/{b['queue']}  redis up {a['store_up']}/{b['store_up']}"
                + (f"  failed {sum(stats.failed.values())}" if stats.failed else ""))
            n += 1
        stats.running = False
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        reload_task.cancel()
        await fault_task
        await pg.restore()
        log(f"traffic stopped after {elapsed:.0f} s: {stats.total_sent():,} calls; waiting for "
            "the ledgers")

        # The ledgers catch up: both queues empty and a row for every answer.
        deadline = time.monotonic() + args.drain_wait
        rows = 0
        while time.monotonic() < deadline:
            rows = int((await apsql(db_url, "SELECT count(*) FROM calls")).strip())
            qs = [metric(await metrics(r.addr), "mantlegate_ledger_queue_depth") for r in replicas]
            if rows >= stats.total_sent() and all(q == 0 for q in qs):
                break
            await asyncio.sleep(0.5)
        drain_secs = args.drain_wait - (deadline - time.monotonic())
        # Anything still arriving after that would be a second row for some call; two budget
        # refreshes let both replicas read the committed spend.
        await asyncio.sleep(3)
        checks = await final_checks(args, db_url, replicas, stats)
        samples.append({**await sample(replicas, stats, started, db_url, pg, events),
                        "after": True})
        final_metrics = [await metrics(r.addr) for r in replicas]
        # In a thread: its connection goes through the proxy, which runs on this event loop.
        cli = await asyncio.to_thread(
            subprocess.run, [args.mantlegate, "budgets", "--config", cfg_paths[0]],
            capture_output=True, text=True, env=env)
        budgets_cli = cli.stdout + cli.stderr
        with open("/proc/loadavg") as f:
            load_end = " ".join(f.read().split()[:3])
        result = dict(stats=stats, samples=samples, checks=checks, elapsed=elapsed,
                      drain_secs=drain_secs, load=(load_start, load_end), replicas=replicas,
                      final_metrics=final_metrics, fault_log=fault_log, reloads_sent=reload_n,
                      budgets_cli=budgets_cli, pg=pg, db=db)
        # Stop the replicas (SIGTERM: they drain) before the database goes.
        for r in replicas:
            result.setdefault("exit_codes", []).append(await r.stop())
        return result
    finally:
        for p in reversed(procs):
            await p.stop(signal.SIGKILL if p.name == "redis" else signal.SIGTERM)
        try:
            psql(admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            log(f"dropped {db}")
        except RuntimeError as e:
            log(f"could not drop {db}: {e}")


async def final_checks(args, db_url, replicas, stats):
    """The verdicts that need the ledger and the replicas still up."""
    c = {}
    # Every call a client got an answer for, once, under its id and status; nothing else.
    ledger = {}
    dups = 0
    by_outcome = {}
    text = await apsql(db_url, "COPY (SELECT request_id, status, outcome FROM calls) TO STDOUT")
    for line in text.splitlines():
        rid, status, outcome = line.split("\t")
        if rid in ledger:
            dups += 1
        ledger[rid] = int(status)
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    rows = sum(by_outcome.values())
    missing = [r for r in stats.answered if r not in ledger]
    extra = [r for r in ledger if r not in stats.answered]
    wrong_status = [r for r, s in stats.answered.items() if r in ledger and ledger[r] != s]
    c["rows"] = rows
    c["sent"] = stats.total_sent()
    c["answered"] = len(stats.answered)
    c["missing"] = missing[:5]
    c["missing_n"] = len(missing)
    c["extra"] = extra[:5]
    c["extra_n"] = len(extra)
    c["dups"] = dups
    c["wrong_status"] = [(r, stats.answered[r], ledger[r]) for r in wrong_status[:5]]
    c["wrong_status_n"] = len(wrong_status)
    c["by_outcome"] = sorted(by_outcome.items(), key=lambda kv: -kv[1])
    c["ledger_ok"] = (rows == stats.total_sent() == len(stats.answered) and not missing
                      and not extra and not dups and not wrong_status and not stats.dup_ids)
    fwd = await apsql(db_url, "SELECT count(*) FILTER (WHERE outcome = 'forwarded'), "
                              "count(*) FILTER (WHERE outcome = 'forwarded' AND "
                              "usage_source = 'reported') FROM calls")
    c["forwarded"], c["reported"] = (int(x) for x in fwd.strip().split("|"))

    # Budgets: each replica's figure against SQL over the calls, to the digit.
    now = datetime.now(timezone.utc)
    start = datetime(now.year, now.month, 1, tzinfo=timezone.utc)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=timezone.utc)
    month = f"{start:%Y-%m}"
    lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    scopes = {
        "app-alert": "project_name = 'Soak-App'",
        "capped-block": "project_name = 'Soak-Capped'",
        "team-soak": "tags::jsonb ->> 'Team' = 'Soak'",
    }
    budget_rows = []
    budgets_ok = True
    deadline = time.monotonic() + 15
    while True:
        views = [await budgets(r.addr) for r in replicas]
        budget_rows = []
        budgets_ok = True
        for name, where in scopes.items():
            sql_pico = int((await apsql(
                db_url, f"SELECT COALESCE(sum(cost_pico), 0) FROM calls WHERE {where} AND "
                        f"ts_ms >= {lo} AND ts_ms < {hi} AND cost_pico IS NOT NULL")).strip())
            table = (await apsql(db_url, "SELECT spent_pico FROM budget_spend WHERE budget = "
                                         f"'{name}' AND month = '{month}'")).strip()
            sql_usd = (Decimal(sql_pico) / Decimal(10) ** 12).normalize()
            row = {"name": name, "sql_usd": sql_usd, "sql_pico": sql_pico,
                   "table_pico": int(table) if table else None, "replicas": []}
            for v in views:
                b = v[name]
                row["replicas"].append(b)
                if (Decimal(b["spend_usd"]) != sql_usd or Decimal(b["reserved_usd"]) != 0
                        or Decimal(b["other_replicas_reserved_usd"]) != 0):
                    budgets_ok = False
            if row["table_pico"] != sql_pico:
                budgets_ok = False
            budget_rows.append(row)
        if budgets_ok or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    c["budgets"] = budget_rows
    c["budgets_ok"] = budgets_ok
    c["month"] = month
    return c


# ------------------------------------------------------------------------------------------
# Report


def redis_version():
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else "unknown"


def report(args, res):
    stats, samples, c = res["stats"], res["samples"], res["checks"]
    replicas = res["replicas"]
    out = []
    add = out.append
    sent = stats.total_sent()
    failed = sum(stats.failed.values())
    add(f"# Fleet soak: two mantlegate replicas, one PostgreSQL ledger, one Redis, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    add("")
    add(f"`bench/run.sh fleet-soak` (`bench/fleet_soak.py`): {args.seconds:.0f} s of mixed traffic "
        f"from {args.concurrency} keep-alive clients (half on each replica) through two release "
        "replicas sharing a PostgreSQL ledger (a scratch database, behind a TCP proxy in the "
        "script that cuts it off and stalls it) and a Redis for rate limits (its own "
        "`redis-server`, killed and restarted), in front of `mantlegate simulate` (stream "
        f"events {args.event_delay_ms} ms apart). Config rewritten and SIGHUP sent to both "
        f"replicas every {args.reload_every:.0f} s.")
    add("")
    add(f"- Machine: {machine()}; load average {res['load'][0]} at the start, {res['load'][1]} "
        "at the end (other work on the machine included; nothing pinned).")
    add(f"- mantlegate: `{args.mantlegate}`, commit {commit()}.")
    add(f"- PostgreSQL {psql(args.pg.rstrip('/') + '/postgres', 'SHOW server_version').strip()}, "
        f"Redis {redis_version()}.")
    if args.note:
        add(f"- Note: {args.note}")
    add("")
    add("## Verdict")
    add("")
    ok = True
    ledger_ok = c["ledger_ok"]
    ok &= ledger_ok
    add(f"- **Ledger {'exact' if ledger_ok else 'MISMATCH'}**: {c['rows']:,} rows for "
        f"{sent:,} calls sent, {c['answered']:,} answered with distinct `x-request-id`s; "
        f"missing {c['missing_n']}, extra {c['extra_n']}, duplicated {c['dups']}, status "
        f"differing {c['wrong_status_n']}. Outcomes: "
        + ", ".join(f"{k} {n:,}" for k, n in c["by_outcome"])
        + f"; forwarded calls with reported usage: {c['reported']:,} of {c['forwarded']:,}.")
    if c["missing"]:
        add(f"  - missing, e.g.: {', '.join(c['missing'])}")
    if c["extra"]:
        add(f"  - extra, e.g.: {', '.join(c['extra'])}")
    if c["wrong_status"]:
        add(f"  - status client/ledger, e.g.: {c['wrong_status']}")
    ok &= c["budgets_ok"]
    add(f"- **Budgets {'exact' if c['budgets_ok'] else 'MISMATCH'}** ({c['month']}): each "
        "replica's `/admin/v1/budgets` spend against `sum(cost_pico)` of the budget's calls by "
        "SQL and against the `budget_spend` row; reserved on each replica:")
    for row in c["budgets"]:
        reps = "; ".join(
            f"{r.name} {b['spend_usd']} (reserved {b['reserved_usd']}, others "
            f"{b['other_replicas_reserved_usd']})" for r, b in zip(replicas, row["replicas"]))
        add(f"  - `{row['name']}` ({row['replicas'][0]['action']}, limit "
            f"{row['replicas'][0]['limit_usd']} USD): SQL {row['sql_usd']} USD "
            f"({row['sql_pico']:,} pUSD), budget_spend {row['table_pico']:,} pUSD; {reps}")
    for i, r in enumerate(replicas):
        v = verdict([{"t": s["t"], "rss_kib": s["replicas"][i]["rss_kib"],
                      "after": s.get("after")} for s in samples], args.seconds)
        if v is None:
            add(f"- **Memory of {r.name}: not judged** (run too short for a warm-up and two "
                "windows).")
            continue
        ok &= v["flat"]
        change = v["late_max"] - v["early_max"]
        line = (f"- **Memory of {r.name} {'flat' if v['flat'] else 'GROWING'}**: largest RSS "
                f"{mib(v['early_max']):.1f} MiB in the window after warm-up "
                f"({v['window']:.0f}–{2 * v['window']:.0f} s), {mib(v['late_max']):.1f} MiB in "
                f"the last {v['window']:.0f} s of load ({mib(change):+.1f} MiB; allowed "
                f"+{mib(v['allowed']):.1f} MiB, the larger of {FLAT_PERCENT} % and {FLAT_MIB} "
                f"MiB); peak (VmHWM) {mib(samples[-1]['replicas'][i]['hwm_kib']):.1f} MiB.")
        if v["slope"] is not None:
            line += f" Trend after warm-up: {v['slope'] / 1024:+.2f} MiB/min."
        add(line)
    ok &= failed == 0
    add(f"- **Calls**: {sent:,} in {res['elapsed']:.0f} s ({sent / res['elapsed']:,.0f}/s), "
        f"{failed:,} failed"
        + (": " + ", ".join(f"{k} ×{n}" for k, n in sorted(stats.failed.items())) if failed
           else "")
        + f"; slowest call {stats.latency_max:.2f} s; {stats.connections:,} connections opened.")
    dropped = [metric(m, "mantlegate_ledger_records_dropped") or 0 for m in res["final_metrics"]]
    refused = [metric(m, "mantlegate_config_reload_failures") or 0 for m in res["final_metrics"]]
    ok &= not any(dropped) and not any(refused)
    add(f"- **Reloads**: {res['reloads_sent']} config rewrites + SIGHUP; `config reloaded` "
        "logged " + " and ".join(f"{r.reloads} times by {r.name}" for r in replicas)
        + f" (a rewrite is also seen by the file watcher); reloads refused: "
        + "/".join(f"{x:.0f}" for x in refused) + "; ledger records dropped: "
        + "/".join(f"{x:.0f}" for x in dropped) + ".")
    add(f"- Ledger caught up {res['drain_secs']:.1f} s after the traffic stopped. "
        "Exit status of the replicas on SIGTERM: "
        + "/".join(str(x) for x in res.get("exit_codes", [])) + ".")
    add("")
    add("## Faults")
    add("")
    add("| at (s) | what | for (s) |")
    add("|---:|---|---:|")
    for t, what, dur in res["fault_log"]:
        add(f"| {t:.0f} | {what.replace('_', ' ')} | {dur:.0f} |")
    add("")
    pg = res["pg"]
    add(f"The PostgreSQL proxy accepted {pg.accepted} connections and reset {pg.resets} at the "
        "cut-offs. Per replica at the end:")
    add("")
    names = [
        ("mantlegate_ledger_records_written", "ledger records written"),
        ("mantlegate_ledger_write_errors", "ledger write errors (retried)"),
        ("mantlegate_ledger_records_dropped", "ledger records dropped"),
        ("mantlegate_rate_limit_store_outages", "Redis outages seen"),
        ("mantlegate_rate_limit_store_fallback_calls", "calls decided in memory (Redis away)"),
        ("mantlegate_rate_limit_store_settles_dropped", "Redis token corrections dropped"),
        ("mantlegate_rate_limit_store_up", "Redis up"),
        ("mantlegate_config_reloads", "config reloads"),
    ]
    add("| figure | " + " | ".join(r.name for r in replicas) + " |")
    add("|---|" + "---:|" * len(replicas))
    for key, label in names:
        vals = [metric(m, key) for m in res["final_metrics"]]
        add(f"| {label} | " + " | ".join("—" if v is None else f"{v:,.0f}" for v in vals) + " |")
    add(f"| access log lines | " + " | ".join(f"{r.access_lines:,}" for r in replicas) + " |")
    add("")
    add("Log lines other than access lines, by level and message:")
    add("")
    for r in replicas:
        add(f"- {r.name}: " + "; ".join(f"`{k}` ×{n}" for k, n in
                                       sorted(r.messages.items(), key=lambda kv: -kv[1])))
    add("")
    add("## Traffic")
    add("")
    add("| call | share | sent | answered as expected |")
    add("|---|---:|---:|---:|")
    for kind, (share, _, _) in MIX.items():
        add(f"| {kind} | {share} % | {stats.sent[kind]:,} | {stats.ok[kind]:,} |")
    add("")
    add("| key | share | answers |")
    add("|---|---:|---|")
    for key, share in KEY_SHARES.items():
        add(f"| {key} | {share} % | " + ", ".join(
            f"{k} ×{n:,}" for k, n in sorted(stats.by_key[key].items())) + " |")
    add("")
    add(f"`soak-capped` calls fall under the block budget `capped-block` ({args.capped_usd} USD): "
        "once it is spent they get 429 `budget_exceeded`. `soak-limited` calls are under a "
        f"Redis rate limit of {args.limited_rpm} requests a minute for the key and "
        f"{args.limited_tpm:,} tokens a minute for its project: 429 `rate_limit_exceeded`. "
        "`hang_up`: a stream closed after its first event (ledger: `client_disconnect`, or "
        "`forwarded` when the stream was already complete). The reloads toggle key `soak-idle` "
        "(no traffic) between enabled and disabled, its rate limit between 60 and 120 a minute, "
        "and `app-alert`'s thresholds between [0.5, 0.8, 1.0] and [0.25, 0.5, 0.75, 1.0].")
    add("")
    add("## Samples")
    add("")
    add("| t (s) | calls sent | ledger rows | pg | RSS a (MiB) | RSS b (MiB) | fds a/b | "
        "threads a/b | queue a/b | in flight a/b | redis up a/b | events |")
    add("|---:|---:|---:|---|---:|---:|---|---|---|---|---|---|")
    for s in samples:
        a, b = s["replicas"]
        t = f"{s['t']:.0f} (drained)" if s.get("after") else f"{s['t']:.0f}"

        def fmt(x):
            return "—" if x is None else f"{x:.0f}"
        add(f"| {t} | {s['sent']:,} | {s['rows']:,} | {s['pg']} | {mib(a['rss_kib']):.1f} | "
            f"{mib(b['rss_kib']):.1f} | {a['fds']}/{b['fds']} | {a['threads']}/{b['threads']} | "
            f"{fmt(a['queue'])}/{fmt(b['queue'])} | {fmt(a['in_flight'])}/{fmt(b['in_flight'])} | "
            f"{fmt(a['store_up'])}/{fmt(b['store_up'])} | {', '.join(s['events'])} |")
    add("")
    add("`mantlegate budgets` (from the ledger) at the end:")
    add("")
    add("```")
    add(res["budgets_cli"].rstrip())
    add("```")
    add("")
    return "\n".join(out), ok


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mantlegate", required=True, help="the release binary")
    p.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432/",
                   help="PostgreSQL server (trust auth); a scratch database is made on it")
    p.add_argument("--seconds", type=float, default=1800)
    p.add_argument("--sample", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--event-delay-ms", type=int, default=5)
    p.add_argument("--reload-every", type=float, default=10)
    p.add_argument("--drain-wait", type=float, default=180,
                   help="seconds the ledgers may take to catch up at the end")
    p.add_argument("--capped-usd", default=None,
                   help="block budget of soak-capped's project (default: runs out mid-run)")
    p.add_argument("--app-usd", default=None, help="alert budget of soak-app's project")
    p.add_argument("--limited-rpm", type=int, default=600)
    p.add_argument("--limited-tpm", type=int, default=400000)
    p.add_argument("--faults", type=parse_faults, default=None,
                   help="WHAT@AT+FOR,... in place of the default schedule, e.g. "
                        "pg_cut@120+30,redis_kill@300+20,pg_stall@400+35")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--note", default="", help="a line for the report")
    p.add_argument("--out", help="write the report here (else stdout)")
    p.add_argument("--log", help="append the processes' log lines (access lines aside) here")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args()
    # Sized so that the block budget runs out about halfway and the alert budget crosses its
    # thresholds, at the rates measured on a 2-core machine.
    if args.capped_usd is None:
        args.capped_usd = str((Decimal(args.seconds) * Decimal("0.0004")).quantize(Decimal("0.01")))
    if args.app_usd is None:
        args.app_usd = str((Decimal(args.seconds) * Decimal("0.003")).quantize(Decimal("0.01")))
    work = tempfile.mkdtemp(prefix="mantlegate-fleet-soak.")
    res = await run(args, work)
    text, ok = report(args, res)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if args.log:
        with open(args.log, "a") as out:
            for name in sorted(os.listdir(work)):
                if name.endswith(".log"):
                    out.write(f"## {name}\n")
                    with open(os.path.join(work, name)) as f:
                        out.write(f.read())
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
