#!/usr/bin/env python3
"""Turns bench/run.sh's raw measurements (a work directory) into the Markdown report."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
RUN_COLUMNS = [
    "scenario", "conc", "target", "run", "requests", "duration_us", "bytes", "p50_us",
    "p99_us", "max_us", "err_connect", "err_read", "err_write", "err_status", "err_timeout",
    "cpu_ticks", "upstream_ticks", "queue_end", "queue_max", "user_ticks",
]
TARGETS = ["direct", "mantlegate", "mantlegate-base", "nginx", "floor", "floor-hyper"]


def read_tsv(path, columns):
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            values = line.rstrip("\n").split("\t")
            rows.append(dict(zip(columns, values)))
    return rows


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def run_figures(r):
    requests = num(r["requests"])
    seconds = num(r["duration_us"]) / 1e6
    cpu = num(r["cpu_ticks"])
    user = num(r.get("user_ticks"))
    up = num(r["upstream_ticks"])
    errors = sum(int(r[k]) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return {
        "requests": requests,
        "rps": requests / seconds if seconds else 0,
        "p50_ms": num(r["p50_us"]) / 1000,
        "p99_ms": num(r["p99_us"]) / 1000,
        "cpu_us": cpu * TICK_US / requests if cpu is not None and requests else None,
        "user_us": user * TICK_US / requests if user is not None and requests else None,
        "kernel_us": (cpu - user) * TICK_US / requests
        if cpu is not None and user is not None and requests else None,
        "busy": cpu * TICK_US / 1e6 / seconds if cpu is not None and seconds else None,
        "up_us": up * TICK_US / requests if up is not None and requests else None,
        "bytes_per_call": num(r["bytes"]) / requests if requests else 0,
        "errors": errors,
        "queue_end": r["queue_end"],
        "queue_max": r["queue_max"],
    }


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1, suffix=""):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}{suffix}"


def ratio(a, b):
    return a / b if a is not None and b else None


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
    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "not installed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = os.environ.get("BENCH_REV") or version(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = "" if os.environ.get("BENCH_REV") else version(
        ["git", "-C", root, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    rev += " (release build)"
    if os.environ.get("BENCH_MANTLEGATE"):
        # Another binary than the checkout's build: the checkout's revision would mislead.
        rev = f"binary {os.environ['BENCH_MANTLEGATE']} (BENCH_MANTLEGATE; set BENCH_REV to name its revision)"
        if os.environ.get("BENCH_REV"):
            rev = f"{os.environ['BENCH_REV']} ({os.environ['BENCH_MANTLEGATE']})"
    if os.environ.get("BENCH_MANTLEGATE_BASE"):
        rev += f"; mantlegate-base: {os.environ['BENCH_MANTLEGATE_BASE']}"
    return {
        "cpu": f"{os.cpu_count()} × {model}",
        "kernel": platform.release(),
        "nginx": version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "rev": rev + (" (checkout with uncommitted changes in src/)" if dirty and dirty != "not installed" else ""),
    }


def throughput(work, out):
    runs = read_tsv(os.path.join(work, "runs.tsv"), RUN_COLUMNS)
    if not runs:
        return None
    scenarios = []
    for r in runs:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    table = {}
    for s in scenarios:
        for t in TARGETS:
            figs = [run_figures(r) for r in runs
                    if r["scenario"] == s and r["target"] == t and r["run"] != "warmup"]
            if figs:
                table[s, t] = {k: med([f[k] for f in figs]) if k not in ("queue_end", "queue_max")
                               else ", ".join(f[k] for f in figs)
                               for k in figs[0]}
                table[s, t]["n"] = len(figs)
                table[s, t]["errors"] = sum(f["errors"] for f in figs)

    have_nginx = any(t == "nginx" for _, t in table)
    out.append("## Throughput, latency and CPU per call (medians)\n")
    out.append("| scenario | req/s direct | req/s mantlegate | req/s nginx | RPS mantlegate/nginx "
               "| CPU µs/call mantlegate | CPU µs/call nginx | CPU mantlegate/nginx "
               "| added p50 mantlegate | added p50 nginx | p99 mantlegate | p99 nginx |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in scenarios:
        d, m, n = (table.get((s, t), {}) for t in ("direct", "mantlegate", "nginx"))
        added = lambda x: (x["p50_ms"] - d["p50_ms"]) * 1000 if x and d else None  # noqa: E731
        out.append(
            f"| {s.replace('_c', ', c=')} | {fmt(d.get('rps'), 0)} | {fmt(m.get('rps'), 0)} | {fmt(n.get('rps'), 0)} "
            f"| {fmt(ratio(m.get('rps'), n.get('rps')), 2)} "
            f"| {fmt(m.get('cpu_us'))} | {fmt(n.get('cpu_us'))} | {fmt(ratio(m.get('cpu_us'), n.get('cpu_us')), 2)} "
            f"| {fmt(added(m), 0, ' µs')} | {fmt(added(n), 0, ' µs')} "
            f"| {fmt(m.get('p99_ms'), 2, ' ms')} | {fmt(n.get('p99_ms'), 2, ' ms')} |")
    if not have_nginx:
        out.append("\nnginx was not installed: its columns are empty.")
    out.append("")
    if any(t == "floor" for _, t in table):
        out.append("### The floor: a bare proxy (bench/floor.rs)\n")
        out.append("The same HTTP parts as mantlegate (hyper's server, mantlegate's upstream client, the same runtime) "
                   "doing none of its work: what is left above it is mantlegate's own.\n")
        out.append("| scenario | CPU µs/call floor | CPU µs/call mantlegate | mantlegate − floor "
                   "| CPU µs/call nginx | floor/nginx |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for s in scenarios:
            f, m, n = (table.get((s, t), {}) for t in ("floor", "mantlegate", "nginx"))
            own = m["cpu_us"] - f["cpu_us"] if m.get("cpu_us") is not None and f.get("cpu_us") is not None else None
            out.append(f"| {s.replace('_c', ', c=')} | {fmt(f.get('cpu_us'))} | {fmt(m.get('cpu_us'))} | {fmt(own)} "
                       f"| {fmt(n.get('cpu_us'))} | {fmt(ratio(f.get('cpu_us'), n.get('cpu_us')), 2)} |")
        out.append("")
    if any(t == "mantlegate-base" for _, t in table):
        out.append("### This build against the base build (BENCH_MANTLEGATE_BASE)\n")
        out.append("The same config, upstream and load, targets interleaved in one run.\n")
        out.append("| scenario | CPU µs/call mantlegate | CPU µs/call base | mantlegate/base "
                   "| mantlegate/nginx | base/nginx | req/s mantlegate | req/s base |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in scenarios:
            m, b, n = (table.get((s, t), {}) for t in ("mantlegate", "mantlegate-base", "nginx"))
            out.append(f"| {s.replace('_c', ', c=')} | {fmt(m.get('cpu_us'))} | {fmt(b.get('cpu_us'))} "
                       f"| {fmt(ratio(m.get('cpu_us'), b.get('cpu_us')), 2)} "
                       f"| {fmt(ratio(m.get('cpu_us'), n.get('cpu_us')), 2)} "
                       f"| {fmt(ratio(b.get('cpu_us'), n.get('cpu_us')), 2)} "
                       f"| {fmt(m.get('rps'), 0)} | {fmt(b.get('rps'), 0)} |")
        out.append("")
    if any(t == "floor-hyper" for _, t in table):
        out.append("### mantlegate's upstream client against hyper's (two floors)\n")
        out.append("The floor forwarding through mantlegate's own HTTP/1 client (src/upstream.rs: each call's task "
                   "reads its answer) and through hyper's (hyper-util's pooled client: a task per connection, "
                   "the body handed over through a channel), everything else the same.\n")
        out.append("| scenario | CPU µs/call floor | CPU µs/call floor-hyper | floor/floor-hyper "
                   "| user floor | user floor-hyper | req/s floor | req/s floor-hyper |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in scenarios:
            f, h = (table.get((s, t), {}) for t in ("floor", "floor-hyper"))
            out.append(f"| {s.replace('_c', ', c=')} | {fmt(f.get('cpu_us'))} | {fmt(h.get('cpu_us'))} "
                       f"| {fmt(ratio(f.get('cpu_us'), h.get('cpu_us')), 2)} "
                       f"| {fmt(f.get('user_us'))} | {fmt(h.get('user_us'))} "
                       f"| {fmt(f.get('rps'), 0)} | {fmt(h.get('rps'), 0)} |")
        out.append("")
    split_targets = [t for t in ("nginx", "floor", "floor-hyper", "mantlegate") if any(x == t for _, x in table)]
    if split_targets:
        out.append("### Where the proxy's CPU goes: its own code (user) and the kernel\n")
        out.append("User time is the proxy's own code (HTTP parsing, and for mantlegate its metering, "
                   "logging and ledger); kernel time is the sockets, wake-ups of the load core and "
                   "file writes. From /proc's utime and stime, µs per call, medians.\n")
        out.append("| scenario | " + " | ".join(f"user {t}" for t in split_targets) + " | "
                   + " | ".join(f"kernel {t}" for t in split_targets) + " |")
        out.append("|---|" + "---:|" * (2 * len(split_targets)))
        for s in scenarios:
            xs = [table.get((s, t), {}) for t in split_targets]
            out.append(f"| {s.replace('_c', ', c=')} | "
                       + " | ".join(fmt(x.get("user_us")) for x in xs) + " | "
                       + " | ".join(fmt(x.get("kernel_us")) for x in xs) + " |")
        out.append("")
    out.append("### Per target\n")
    out.append("| scenario | target | req/s | p50 | p99 | proxy CPU µs/call | proxy core busy "
               "| upstream CPU µs/call | bytes/call | errors | ledger queue at end (max) |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in scenarios:
        for t in TARGETS:
            x = table.get((s, t))
            if not x:
                continue
            queue = "—"
            if t == "mantlegate":
                ends = x["queue_end"].split(", ")
                maxes = x["queue_max"].split(", ")
                queue = f"{', '.join(ends)} (max {max(int(q) for q in maxes if q.isdigit()) if any(q.isdigit() for q in maxes) else '—'})"
            out.append(
                f"| {s} | {t} | {fmt(x['rps'], 0)} | {fmt(x['p50_ms'], 3, ' ms')} | {fmt(x['p99_ms'], 2, ' ms')} "
                f"| {fmt(x['cpu_us'])} | {fmt(x['busy'] * 100 if x['busy'] is not None else None, 0, ' %')} "
                f"| {fmt(x['up_us'])} | {fmt(x['bytes_per_call'], 0)} | {x['errors']} | {queue} |")
    out.append("")
    return runs


def ledger_check(work, runs, out):
    rows = read_tsv(os.path.join(work, "ledger.tsv"),
                    ["scenario", "conc", "rows", "forwarded", "disconnect", "other", "reported",
                     "non200", "hwm_kb", "dropped", "wrk_runs"])
    if not rows:
        return
    out.append("### Ledger through the throughput runs (warm-up included)\n")
    out.append("| scenario | wrk completed | ledger rows | forwarded | client_disconnect | other "
               "| forwarded with reported usage | rows − completed (≤ c × wrk runs) | dropped | mantlegate peak RSS |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        completed = sum(int(x["requests"]) for x in runs
                        if x["scenario"] == r["scenario"] and x["target"] == "mantlegate")
        bound = int(r["conc"]) * int(r["wrk_runs"])
        diff = int(r["rows"]) - completed
        verdict = "ok" if 0 <= diff <= bound else "MISMATCH"
        out.append(
            f"| {r['scenario']} | {completed:,} | {int(r['rows']):,} | {int(r['forwarded']):,} "
            f"| {int(r['disconnect']):,} | {int(r['other']):,} | {int(r['reported']):,} "
            f"| {diff:,} (≤ {bound}) {verdict} | {r['dropped'] or '0'} | {int(r['hwm_kb']) / 1024:.1f} MiB |")
    out.append("\nwrk counts responses it read whole; when a run's time is up it closes its "
               "connections with calls in flight, which mantlegate records as `client_disconnect` "
               "(or `forwarded`, when the answer had just been sent). So rows = completed + at most "
               "c per wrk run.\n")


def memory(work, out):
    path = os.path.join(work, "memory.tsv")
    if not os.path.exists(path):
        return
    with open(path) as f:
        streams, delay, idle, max_rss, hwm, inflight, rows, reported, client = f.read().rstrip("\n").split("\t")
    c = json.loads(client)
    out.append("## Memory: slow streams held open through mantlegate\n")
    out.append("| streams | event spacing | all open after | max in flight | streams correct "
               "| ledger rows (usage reported) | idle RSS | peak RSS (VmHWM) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    out.append(
        f"| {int(streams):,} | {int(delay) / 1000:.1f} s | {fmt(c.get('all_open_after_s'), 1, ' s')} | {inflight} "
        f"| {c['ok']:,} / {c['streams']:,} | {int(rows):,} ({int(reported):,}) | {int(idle) / 1024:.1f} MiB "
        f"| {int(hwm) / 1024:.1f} MiB |")
    if c["errors"]:
        out.append(f"\nFailures: {json.dumps(c['errors'])}")
    out.append("")


def ledger_bench(work, out):
    path = os.path.join(work, "ledger-bench.txt")
    if not os.path.exists(path):
        return
    out.append("## Ledger writer alone (ledger-bench, SQLite, one writer thread)\n")
    out.append("| mode | records | elapsed | records/s | max queue depth | CPU µs/record | writer thread CPU µs/record |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    with open(path) as f:
        for line in f:
            if not line.startswith("ledger-bench:"):
                continue
            kv = dict(p.split("=", 1) for p in line.split()[1:])
            out.append(f"| {kv['mode']} | {int(kv['records']):,} | {kv['elapsed_s']} s "
                       f"| {int(kv['records_per_s']):,} | {int(kv['max_queue_depth']):,} | {kv['cpu_us_per_record']} "
                       f"| {kv.get('writer_cpu_us_per_record', 'n/a')} |")
    out.append("\nburst: every record queued at once, time until all are committed. paced: the "
               "proxy's best measured rate offered steadily; a writer that keeps up keeps the "
               "queue near one batch. CPU µs/record is the whole process's (making the records, "
               "and in paced mode the pacing's sleeps and wake-ups, included); the writer "
               "thread's alone is what the proxy pays for its ledger. Half the records are "
               "Responses calls, whose scattered response ids each land on their own page of "
               "the response-id index.\n")


def raw_runs(runs, out):
    out.append("<details><summary>Every run</summary>\n")
    out.append("| scenario | target | run | requests | req/s | p50 µs | p99 µs | proxy CPU µs/call | errors |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        f = run_figures(r)
        out.append(f"| {r['scenario']} | {r['target']} | {r['run']} | {int(f['requests']):,} | {f['rps']:,.0f} "
                   f"| {r['p50_us']} | {r['p99_us']} | {fmt(f['cpu_us'])} | {f['errors']} |")
    out.append("\n</details>\n")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("work")
    p.add_argument("--settings", default="")
    p.add_argument("--mantlegate", default="")
    args = p.parse_args()
    m = machine()
    out = [f"# mantlegate benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n",
           f"- Machine: {m['cpu']}, Linux {m['kernel']}",
           f"- mantlegate {m['rev']}; nginx {m['nginx']}; {m['wrk']}",
           f"- Settings: {args.settings}",
           "- Load generator (wrk, 1 thread) and fake upstream on the load core; the proxy alone "
           "on the proxy core. CPU per call: the proxy's utime+stime from /proc over the run "
           "(ledger writes included) ÷ responses wrk completed.\n"]
    try:
        with open(os.path.join(args.work, "loadavg")) as f:
            loads = f.read().split("\n")
        out.insert(4, f"- Load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]} "
                      "(the benchmark itself adds about 2; more means other work shared the cores)")
    except (OSError, IndexError):
        pass
    runs = throughput(args.work, out)
    if runs:
        ledger_check(args.work, runs, out)
    memory(args.work, out)
    ledger_bench(args.work, out)
    if runs:
        raw_runs(runs, out)
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
