#!/usr/bin/env python3
"""Memory scenario client of bench/run.sh: many slow streams held open at once, each checked.

Opens --streams connections (standard library only: asyncio and raw HTTP/1.1), one streamed
call on each: a third chat completions without stream_options, a third chat completions with
include_usage, a third responses. Every stream is read to its end and checked: 20 text deltas,
the usage chunk exactly when the client asked for it, `data: [DONE]` (chat) or
`response.completed` with usage (responses). Prints one JSON object; exits 1 if any failed.
"""

import argparse
import asyncio
import json
import sys
import time

SYSTEM = "You are a concise assistant for an internal developer platform."
QUESTION = "Explain what a reverse proxy in front of an LLM endpoint does."
CALLS = {
    "chat": (
        "/v1/chat/completions",
        {"model": "openai.gpt-oss-120b", "stream": True,
         "messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": QUESTION}]},
    ),
    "chat_usage": (
        "/v1/chat/completions",
        {"model": "openai.gpt-oss-120b", "stream": True,
         "stream_options": {"include_usage": True},
         "messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": QUESTION}]},
    ),
    "responses": (
        "/v1/responses",
        {"model": "openai.gpt-oss-120b", "stream": True,
         "instructions": SYSTEM, "input": QUESTION},
    ),
}


class State:
    def __init__(self, total):
        self.total = total
        self.open = 0
        self.max_open = 0
        self.all_open_at = None
        self.started = time.monotonic()


async def read_chunked(reader, state, on_first):
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        data = await reader.readexactly(size + 2)
        if not body:
            on_first()
        body += data[:-2]


def events(body):
    """(event name, data text) of each SSE event."""
    out = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            out.append((name, "\n".join(data)))
    return out


def check(kind, body, deltas):
    evs = events(body)
    if kind in ("chat", "chat_usage"):
        if not evs or evs[-1][1] != "[DONE]":
            return "no [DONE] at the end"
        chunks = [json.loads(d) for _, d in evs[:-1]]
        content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        usage = [c for c in chunks if not c["choices"] and c.get("usage")]
        if len(content) != deltas:
            return f"{len(content)} content chunks, expected {deltas}"
        if kind == "chat" and usage:
            return "usage chunk relayed to a client that did not ask for it"
        if kind == "chat_usage" and (len(usage) != 1 or usage[0]["usage"]["prompt_tokens"] != 87):
            return "usage chunk missing for a client that asked for it"
        return None
    names = [n for n, _ in evs]
    if names.count("response.output_text.delta") != deltas:
        return f"{names.count('response.output_text.delta')} text deltas, expected {deltas}"
    if names[-1] != "response.completed":
        return f"last event {names[-1]}, expected response.completed"
    if json.loads(evs[-1][1])["response"]["usage"]["input_tokens"] != 87:
        return "response.completed without its usage"
    return None


async def one(i, args, state, errors):
    kind = ("chat", "chat_usage", "responses")[i % 3]
    path, payload = CALLS[kind]
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    opened = False

    def on_first():
        nonlocal opened
        opened = True
        state.open += 1
        state.max_open = max(state.max_open, state.open)
        if state.open == state.total and state.all_open_at is None:
            state.all_open_at = time.monotonic() - state.started
            print(f"all {state.total} streams open after {state.all_open_at:.1f} s",
                  file=sys.stderr, flush=True)

    try:
        reader, writer = await asyncio.open_connection(args.host, args.port)
        writer.write(head + body)
        await writer.drain()
        response_head = await reader.readuntil(b"\r\n\r\n")
        status = int(response_head.split(b" ", 2)[1])
        if status != 200:
            errors.append(f"status {status}")
            writer.close()
            return
        if b"transfer-encoding: chunked" not in response_head.lower():
            errors.append("answer not chunked")
            writer.close()
            return
        answer = await read_chunked(reader, state, on_first)
        writer.close()
        problem = check(kind, answer, args.deltas)
        if problem:
            errors.append(f"{kind}: {problem}")
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
        errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    finally:
        if opened:
            state.open -= 1


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True, help="HOST:PORT of mantlegate")
    p.add_argument("--key", required=True)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--deltas", type=int, default=20)
    p.add_argument("--ramp-seconds", type=float, default=2.0,
                   help="spread the connects over this long")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    args.host, args.port = args.addr.rsplit(":", 1)
    state = State(args.streams)
    errors = []
    tasks = []
    for i in range(args.streams):
        tasks.append(asyncio.create_task(one(i, args, state, errors)))
        await asyncio.sleep(args.ramp_seconds / max(args.streams, 1))
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for t in pending:
        t.cancel()
    errors.extend(["timed out"] * len(pending))
    summary = {}
    for e in errors:
        summary[e] = summary.get(e, 0) + 1
    result = {
        "streams": args.streams,
        "ok": args.streams - len(errors),
        "failed": len(errors),
        "errors": summary,
        "max_open": state.max_open,
        "all_open_after_s": state.all_open_at,
        "duration_s": round(time.monotonic() - state.started, 1),
    }
    print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
