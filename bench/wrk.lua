-- wrk script of bench/run.sh: POSTs one fixed body and prints a machine-readable summary.
-- BENCH_BODY picks the call (chat, chat_stream, responses, responses_stream); BENCH_KEY is the
-- client key sent as `Authorization: Bearer` (mantlegate needs it; others ignore it).
local bodies = {
  chat = {
    path = "/v1/chat/completions",
    body = '{"model":"openai.gpt-oss-120b","messages":[{"role":"system","content":"You are a concise assistant for an internal developer platform."},{"role":"user","content":"Explain in one paragraph what a reverse proxy in front of an LLM endpoint does, and why it should add almost no latency."}],"max_completion_tokens":512,"temperature":0.2}',
  },
  chat_stream = {
    path = "/v1/chat/completions",
    body = '{"model":"openai.gpt-oss-120b","messages":[{"role":"system","content":"You are a concise assistant for an internal developer platform."},{"role":"user","content":"Explain in one paragraph what a reverse proxy in front of an LLM endpoint does, and why it should add almost no latency."}],"max_completion_tokens":512,"temperature":0.2,"stream":true}',
  },
  responses = {
    path = "/v1/responses",
    body = '{"model":"openai.gpt-oss-120b","instructions":"You are a concise assistant for an internal developer platform.","input":"Explain in one paragraph what a reverse proxy in front of an LLM endpoint does, and why it should add almost no latency.","max_output_tokens":512}',
  },
  responses_stream = {
    path = "/v1/responses",
    body = '{"model":"openai.gpt-oss-120b","instructions":"You are a concise assistant for an internal developer platform.","input":"Explain in one paragraph what a reverse proxy in front of an LLM endpoint does, and why it should add almost no latency.","max_output_tokens":512,"stream":true}',
  },
}

local kind = os.getenv("BENCH_BODY") or "chat"
local call = bodies[kind]
if call == nil then
  error("BENCH_BODY must be one of chat, chat_stream, responses, responses_stream")
end

wrk.method = "POST"
wrk.path = call.path
wrk.body = call.body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")

-- One line for bench/run.sh; latencies in microseconds, duration in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "@@bench requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
