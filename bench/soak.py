#!/usr/bin/env python3
"""Soak scenario of bench/run.sh: mixed traffic through mantlegate for minutes, memory sampled.

--concurrency workers call mantlegate for --seconds, each on its own keep-alive connection
(standard library only: asyncio and raw HTTP/1.1). Each call is drawn from this mix (--mix
changes the shares, e.g. `--mix responses_stream=0`):

  40 %  chat completions, not streamed
  25 %  chat completions streamed without usage asked (mantlegate injects include_usage and
        strips the usage chunk: the common case with the OpenAI SDKs)
  10 %  chat completions streamed with stream_options.include_usage
  20 %  responses, streamed
   5 %  a stream (chat or responses) the client hangs up on after its first event

Every answer is checked (status 200; a non-streamed body with usage; a stream ending in
`data: [DONE]` or `response.completed`, the usage chunk present exactly when asked for).
Every --sample seconds it records mantlegate's VmRSS and VmHWM (/proc/PID/status), open file
descriptors, threads, ledger rows, calls in flight and ledger queue depth (/metrics), and the
calls sent so far. At the end it waits for the ledger to hold every call sent and prints the
Markdown report. Exits 1 when memory grew, the ledger does not hold one record per call sent,
or calls failed.

Memory is flat when the largest RSS sampled in the last window is within 10 % or 4 MiB
(whichever is larger) of the largest sampled in the window right after warm-up; a window is a
minute (a fifth of the run when that is shorter), and the first window is warm-up.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone

SYSTEM = "You are a concise assistant for an internal developer platform."
QUESTION = ("Explain in one paragraph what a reverse proxy in front of an LLM endpoint does, "
            "and why it should add almost no latency.")
CHAT = {"model": "openai.gpt-oss-120b",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        "max_completion_tokens": 512}
RESPONSES = {"model": "openai.gpt-oss-120b", "instructions": SYSTEM, "input": QUESTION,
             "max_output_tokens": 512, "stream": True}
# kind: (share in %, path, body)
MIX = {
    "chat": (40, "/v1/chat/completions", CHAT),
    "chat_stream": (25, "/v1/chat/completions", {**CHAT, "stream": True}),
    "chat_stream_usage": (10, "/v1/chat/completions",
                          {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    "responses_stream": (20, "/v1/responses", RESPONSES),
    "hang_up": (5, None, None),
}
FLAT_PERCENT = 10
FLAT_MIB = 4


class Stats:
    def __init__(self):
        self.sent = {k: 0 for k in MIX}
        self.ok = {k: 0 for k in MIX}
        self.failed = {}
        self.connections = 0
        self.running = True

    def total_sent(self):
        return sum(self.sent.values())

    def fail(self, kind, why):
        key = f"{kind}: {why}"
        self.failed[key] = self.failed.get(key, 0) + 1


def request(args, path, body):
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunk(reader):
    """The data of the next chunk; b"" for the last one (its trailers read)."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
    if size == 0:
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        return b""
    return (await reader.readexactly(size + 2))[:-2]


async def read_body(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if "chunked" not in headers.get("transfer-encoding", ""):
        raise ValueError("answer neither sized nor chunked")
    body = bytearray()
    while chunk := await read_chunk(reader):
        body += chunk
    return bytes(body)


def problem(kind, body):
    """What is wrong with a complete answer of `kind`, or None."""
    if kind == "chat":
        return None if b'"usage"' in body else "no usage in the answer"
    if kind == "responses_stream":
        return None if b"event: response.completed" in body else "no response.completed"
    if not body.rstrip().endswith(b"data: [DONE]"):
        return "no [DONE] at the end"
    has_usage = b'"choices":[]' in body
    if kind == "chat_stream" and has_usage:
        return "usage chunk relayed to a client that did not ask for it"
    if kind == "chat_stream_usage" and not has_usage:
        return "no usage chunk for a client that asked for it"
    return None


async def worker(args, stats, rng, requests):
    conn = None
    kinds = list(args.mix)
    weights = [args.mix[k] for k in kinds]
    # Hang-ups are on the streams of the mix, in their proportions.
    streams = ["chat_stream", "responses_stream"]
    stream_weights = [args.mix[k] for k in streams]
    if not any(stream_weights):
        stream_weights = [1, 0]
    while stats.running:
        kind = rng.choices(kinds, weights)[0]
        hang_up = kind == "hang_up"
        payload = requests[rng.choices(streams, stream_weights)[0] if hang_up else kind]
        try:
            if conn is None:
                conn = await asyncio.open_connection(args.host, args.port)
                stats.connections += 1
            reader, writer = conn
            writer.write(payload)
            await writer.drain()
            stats.sent[kind] += 1
            status, headers = await read_head(reader)
            if hang_up:
                # Gone after the first event, with the rest of the stream still to come.
                await read_chunk(reader)
                writer.close()
                conn = None
                if status == 200:
                    stats.ok[kind] += 1
                else:
                    stats.fail(kind, f"status {status}")
                continue
            body = await read_body(reader, headers)
            if headers.get("connection", "").lower() == "close":
                writer.close()
                conn = None
            if status != 200:
                stats.fail(kind, f"status {status}")
            elif why := problem(kind, body):
                stats.fail(kind, why)
            else:
                stats.ok[kind] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            stats.fail(kind, type(exc).__name__)
            if conn is not None:
                conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def http_get(args, path):
    reader, writer = await asyncio.open_connection(args.host, args.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {args.host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[-1]


async def gauges(args):
    """mantlegate's calls in flight and ledger queue depth, from /metrics."""
    out = {"mantlegate_in_flight_requests": None, "mantlegate_ledger_queue_depth": None}
    try:
        text = (await http_get(args, "/metrics")).decode()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in out:
            out[parts[0]] = int(float(parts[1]))
    return out


def proc_status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def ledger_query(path, sql):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql).fetchone()
    finally:
        con.close()


async def sample(args, stats, started):
    m = await gauges(args)
    s = proc_status(args.pid)
    return {
        "t": time.monotonic() - started,
        "rss_kib": s["VmRSS"],
        "hwm_kib": s["VmHWM"],
        "fds": s["fds"],
        "threads": s["Threads"],
        "sent": stats.total_sent(),
        "rows": ledger_query(args.ledger, "SELECT count(*) FROM calls")[0],
        "in_flight": m["mantlegate_in_flight_requests"],
        "queue": m["mantlegate_ledger_queue_depth"],
    }


async def wait_for_ledger(args, stats):
    """Waits (at most 30 s) until the ledger holds a record of every call sent."""
    deadline = time.monotonic() + 30
    rows = None
    while time.monotonic() < deadline:
        rows = ledger_query(args.ledger, "SELECT count(*) FROM calls")[0]
        if rows >= stats.total_sent() and (await gauges(args))["mantlegate_ledger_queue_depth"] == 0:
            break
        await asyncio.sleep(0.2)
    # Anything still arriving after that would be a second record of some call.
    await asyncio.sleep(1.5)
    return ledger_query(args.ledger, "SELECT count(*) FROM calls")[0]


def mib(kib):
    return kib / 1024


def verdict(samples, seconds):
    samples = [s for s in samples if not s.get("after")]
    window = min(60.0, seconds / 5)
    early = [s["rss_kib"] for s in samples if window < s["t"] <= 2 * window + 1]
    late = [s["rss_kib"] for s in samples if s["t"] > seconds - window - 1 and s["t"] > 2 * window + 1]
    if not early or not late:
        return None
    early_max, late_max = max(early), max(late)
    allowed = max(early_max * FLAT_PERCENT / 100, FLAT_MIB * 1024)
    # Least-squares slope of RSS after warm-up, in KiB per minute.
    pts = [(s["t"], s["rss_kib"]) for s in samples if s["t"] > window]
    slope = None
    if len(pts) >= 2:
        mt = sum(t for t, _ in pts) / len(pts)
        mr = sum(r for _, r in pts) / len(pts)
        var = sum((t - mt) ** 2 for t, _ in pts)
        if var:
            slope = sum((t - mt) * (r - mr) for t, r in pts) / var * 60
    return {
        "window": window,
        "early_max": early_max,
        "late_max": late_max,
        "allowed": allowed,
        "flat": late_max <= early_max + allowed,
        "slope": slope,
    }


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} × {model}, Linux {platform.release()}"


def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        # What the binary is built from (a changed README does not make it another build).
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (with uncommitted changes to src/ or Cargo.*)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, stats, samples, rows, outcomes, load, elapsed):
    sent = stats.total_sent()
    v = verdict(samples, args.seconds)
    failed = sum(stats.failed.values())
    ledger_ok = rows == sent
    out = []
    add = out.append
    add(f"# Soak: mantlegate under mixed traffic, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    add("")
    add(f"`bench/run.sh soak`: {args.seconds:.0f} s of mixed traffic from {args.concurrency} "
        f"keep-alive clients through a release mantlegate (real config: keys, projects, prices, "
        f"SQLite ledger, metrics) to the fake upstream (streams of 20 deltas, events "
        f"{args.event_delay_ms} ms apart); mantlegate's memory sampled every {args.sample:.0f} s.")
    add("")
    add(f"- Machine: {machine()}; load average {load[0]} at the start, {load[1]} at the end "
        "(other work on the machine included).")
    add(f"- mantlegate: `{args.mantlegate}`, commit {commit()}.")
    add("")
    add("## Verdict")
    add("")
    if v is None:
        add("- **Memory: not judged** (the run is too short for a warm-up and two windows).")
    else:
        change = v["late_max"] - v["early_max"]
        line = (f"- **Memory {'flat' if v['flat'] else 'GROWING'}**: largest RSS "
                f"{mib(v['early_max']):.1f} MiB in the window after warm-up "
                f"({v['window']:.0f}–{2 * v['window']:.0f} s), {mib(v['late_max']):.1f} MiB in "
                f"the last {v['window']:.0f} s of load ({mib(change):+.1f} MiB, "
                f"{100 * change / v['early_max']:+.1f} %; allowed +{mib(v['allowed']):.1f} MiB).")
        if v["slope"] is not None:
            line += f" Trend after warm-up: {v['slope'] / 1024:+.2f} MiB/min."
        add(line)
    add(f"- **Ledger {'complete' if ledger_ok else 'MISMATCH'}**: {rows:,} records for "
        f"{sent:,} calls sent; outcomes: "
        + ", ".join(f"{k} {n:,}" for k, n in outcomes["by_outcome"])
        + f"; forwarded calls with reported usage: {outcomes['reported']:,} of "
        f"{outcomes['forwarded']:,}.")
    add(f"- **Calls**: {sent:,} in {elapsed:.0f} s ({sent / elapsed:,.0f}/s), {failed:,} failed"
        + (": " + ", ".join(f"{k} ×{n}" for k, n in sorted(stats.failed.items())) if failed else "")
        + f"; {stats.connections:,} connections opened.")
    add(f"- Peak RSS (VmHWM) {mib(samples[-1]['hwm_kib']):.1f} MiB; RSS before the load "
        f"{mib(samples[0]['rss_kib']):.1f} MiB.")
    add("")
    add("## Traffic")
    add("")
    add("| call | share | sent | answered as expected |")
    add("|---|---:|---:|---:|")
    total_share = sum(args.mix.values())
    for kind in MIX:
        share = 100 * args.mix[kind] / total_share
        add(f"| {kind} | {share:.0f} % | {stats.sent[kind]:,} | {stats.ok[kind]:,} |")
    add("")
    add("`hang_up`: a chat or responses stream the client closes after its first event (the "
        "ledger records it as `client_disconnect`, or `forwarded` when the stream was already "
        "complete).")
    add("")
    add(f"Responses created: {outcomes['responses']:,}. mantlegate keeps each one's id in an "
        "in-process index for 2 minutes (which project it belongs to; after that the ledger "
        "answers), so that index is bounded after the first 2 minutes of a run.")
    add("")
    add("## Samples")
    add("")
    add("| t (s) | RSS (MiB) | VmHWM (MiB) | fds | threads | calls sent | ledger rows | in flight | ledger queue |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        t = f"{s['t']:.0f} (drained)" if s.get("after") else f"{s['t']:.0f}"
        add(f"| {t} | {mib(s['rss_kib']):.1f} | {mib(s['hwm_kib']):.1f} | {s['fds']} | "
            f"{s['threads']} | {s['sent']:,} | {s['rows']:,} | {s['in_flight']} | {s['queue']} |")
    add("")
    ok = (v is None or v["flat"]) and ledger_ok and failed == 0
    return "\n".join(out), ok, v


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True, help="HOST:PORT of mantlegate")
    p.add_argument("--key", required=True)
    p.add_argument("--pid", type=int, required=True, help="mantlegate's pid")
    p.add_argument("--ledger", required=True, help="mantlegate's SQLite ledger")
    p.add_argument("--mantlegate", default="mantlegate", help="the binary, for the report")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--sample", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--event-delay-ms", type=int, default=5, help="the upstream's, for the report")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mix", default="", help="KIND=SHARE,... overriding the default shares")
    args = p.parse_args()
    overrides, args.mix = args.mix, {k: share for k, (share, _, _) in MIX.items()}
    for item in filter(None, overrides.split(",")):
        kind, _, share = item.partition("=")
        if kind not in MIX:
            p.error(f"--mix: unknown kind {kind}; kinds: {', '.join(MIX)}")
        args.mix[kind] = float(share)
    if not sum(args.mix.values()):
        p.error("--mix: all shares are 0")
    args.host, args.port = args.addr.rsplit(":", 1)
    with open("/proc/loadavg") as f:
        load_start = " ".join(f.read().split()[:3])
    requests = {k: request(args, path, body) for k, (_, path, body) in MIX.items() if path}
    stats = Stats()
    started = time.monotonic()
    samples = [await sample(args, stats, started)]
    workers = [asyncio.create_task(worker(args, stats, random.Random(args.seed * 1000 + i), requests))
               for i in range(args.concurrency)]
    n = 1
    while (due := started + n * args.sample) <= started + args.seconds + 0.001:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        samples.append(await sample(args, stats, started))
        print(f"  {samples[-1]['t']:5.0f} s  RSS {mib(samples[-1]['rss_kib']):6.1f} MiB  "
              f"sent {samples[-1]['sent']:>9,}  ledger {samples[-1]['rows']:>9,}",
              file=sys.stderr, flush=True)
        n += 1
    stats.running = False
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - started
    rows = await wait_for_ledger(args, stats)
    by_outcome = []
    con = sqlite3.connect(f"file:{args.ledger}?mode=ro", uri=True, timeout=5)
    try:
        by_outcome = con.execute(
            "SELECT outcome, count(*) FROM calls GROUP BY outcome ORDER BY count(*) DESC").fetchall()
        forwarded, reported, responses = con.execute(
            "SELECT coalesce(sum(outcome = 'forwarded'), 0), "
            "coalesce(sum(outcome = 'forwarded' AND usage_source = 'reported'), 0), "
            "count(upstream_response_id) FROM calls").fetchone()
    finally:
        con.close()
    # After the load, with every record written: not part of the verdict.
    samples.append({**await sample(args, stats, started), "after": True})
    with open("/proc/loadavg") as f:
        load_end = " ".join(f.read().split()[:3])
    text, ok, v = report(args, stats, samples, rows,
                         {"by_outcome": by_outcome, "forwarded": forwarded, "reported": reported,
                          "responses": responses},
                         (load_start, load_end), elapsed)
    print(text)
    if v is not None:
        print(f"memory {'flat' if v['flat'] else 'GROWING'}: {mib(v['early_max']):.1f} MiB after "
              f"warm-up, {mib(v['late_max']):.1f} MiB at the end", file=sys.stderr)
    print(f"ledger: {rows:,} records for {stats.total_sent():,} calls sent", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
