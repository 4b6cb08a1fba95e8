"""mantlegate end to end, driven by the official OpenAI Python SDK.

The proxy runs in front of `mantlegate simulate` (see conftest.py). Every call is checked on three
sides: what the SDK returns, the project the upstream received (`x-simulated-project`, echoed by
the simulator) and the proxy's own access-log line for that call (matched by `x-request-id`).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from harness import (
    CAPPED_KEY,
    CHATBOT_KEY,
    LIMITED_KEY,
    SEARCH_KEY,
    SECRETS,
    UNASSIGNED_KEY,
    UNKNOWN_KEY,
    Proxy,
)

CHAT_MODEL = "openai.gpt-oss-120b"  # served under the default /v1 prefix
GPT5_MODEL = "openai.gpt-5.4"  # served under /openai/v1 (upstream.model_prefixes)
MESSAGES = [{"role": "user", "content": "Say hello to the end-to-end suite."}]


def projects_of(raw: Any) -> tuple[str | None, str | None]:
    """(project the proxy attributed, project the upstream received) from response headers."""
    return raw.headers.get("x-mantlegate-project"), raw.headers.get("x-simulated-project")


def assert_openai_error(err: openai.APIStatusError, status: int, code: str, kind: str) -> None:
    """The rejection is the SDK's exception with an OpenAI-shaped body."""
    assert err.status_code == status
    error = err.response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["code"] == code
    assert error["type"] == kind
    assert error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    # The SDK parsed the same body into the exception.
    assert err.body == error
    assert err.code == code
    # Refusals tell the SDK not to retry; a rate limit lets it back off and retry instead.
    if code == "rate_limit_exceeded":
        assert "x-should-retry" not in err.response.headers
    else:
        assert err.response.headers.get("x-should-retry") == "false"


# ---------------------------------------------------------------------------------------------
# Chat Completions


@pytest.mark.parametrize("model", [CHAT_MODEL, GPT5_MODEL])
def test_chat_completion_is_forwarded_and_attributed_to_the_keys_project(
    proxy: Proxy, model: str
) -> None:
    client = proxy.client(CHATBOT_KEY)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    completion = raw.parse()

    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.total_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")

    line = proxy.access(raw.headers["x-request-id"])
    assert line["key"] == "chatbot-backend"
    assert line["project"] == "CustomerChatbot-Prod"
    assert line["project_id"] == "proj_chatbot"
    assert line["api"] == "chat.completions"
    assert line["model"] == model
    assert line["stream"] is False
    assert line["status"] == 200
    assert line["outcome"] == "forwarded"


def test_chat_completion_stream(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")

    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert len(chunks) > 2, "the answer should arrive in several chunks"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)

    line = proxy.access(raw.headers["x-request-id"])
    assert line["stream"] is True
    assert line["outcome"] == "forwarded"
    assert line["project_id"] == "proj_chatbot"
    assert line["ttfb_ms"] is not None


def test_chat_completion_stream_with_usage_chunk(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1
    usage_chunk = with_usage[0]
    assert usage_chunk is chunks[-1]
    assert usage_chunk.choices == []
    usage = usage_chunk.usage
    assert usage.total_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"


# ---------------------------------------------------------------------------------------------
# Responses


def test_response_non_stream(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    raw = client.responses.with_raw_response.create(model=GPT5_MODEL, input="Hello, Responses API.")
    response = raw.parse()

    assert response.status == "completed"
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.total_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")

    line = proxy.access(raw.headers["x-request-id"])
    assert (line["api"], line["model"], line["outcome"]) == ("responses", GPT5_MODEL, "forwarded")


def test_response_stream(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    raw = client.responses.with_raw_response.create(
        model=GPT5_MODEL, input="Stream me an answer.", stream=True
    )
    events = list(raw.parse())
    types = [e.type for e in events]

    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip()
    completed = events[-1]
    assert completed.response.usage is not None
    assert completed.response.usage.total_tokens > 0
    assert completed.response.output_text == text

    line = proxy.access(raw.headers["x-request-id"])
    assert (line["stream"], line["outcome"], line["project_id"]) == (True, "forwarded", "proj_chatbot")


def test_stored_response_follows_the_project_that_created_it(proxy: Proxy) -> None:
    """A response created under one project is retrieved under that project: the proxy
    indexes response ids and sends follow-up calls under the creating project, for any key
    that may use it; for other keys the response does not exist."""
    created = proxy.client(CHATBOT_KEY).responses.create(model=CHAT_MODEL, input="Remember me.")

    again = proxy.client(CHATBOT_KEY).responses.retrieve(created.id)
    assert again.id == created.id
    assert again.output_text == created.output_text

    # search-team defaults to DocSearch-Dev but may use CustomerChatbot-Prod: the retrieve
    # goes to the project that created the response.
    raw = proxy.client(SEARCH_KEY).responses.with_raw_response.retrieve(created.id)
    assert raw.parse().id == created.id
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")

    # The unassigned key through the DocSearch route may not use CustomerChatbot-Prod.
    route_client = proxy.client(UNASSIGNED_KEY, max_retries=0, route="/docsearch")
    with pytest.raises(openai.NotFoundError) as caught:
        route_client.responses.retrieve(created.id)
    assert caught.value.body["code"] == "response_not_found"
    line = proxy.access(caught.value.response.headers["x-request-id"])
    assert (line["status"], line["outcome"]) == (404, "rejected")


# ---------------------------------------------------------------------------------------------
# Choosing the project


def test_multi_project_key_defaults_to_its_first_project(proxy: Proxy) -> None:
    raw = proxy.client(SEARCH_KEY).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES
    )
    assert projects_of(raw) == ("proj_search", "proj_search")
    line = proxy.access(raw.headers["x-request-id"])
    assert (line["key"], line["project"]) == ("search-team", "DocSearch-Dev")


def test_project_chosen_by_id(proxy: Proxy) -> None:
    client = proxy.client(SEARCH_KEY, project="proj_chatbot")
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")
    line = proxy.access(raw.headers["x-request-id"])
    assert (line["key"], line["project_id"], line["outcome"]) == (
        "search-team",
        "proj_chatbot",
        "forwarded",
    )


def test_project_chosen_by_name_reaches_upstream_as_its_id(proxy: Proxy) -> None:
    client = proxy.client(SEARCH_KEY, project="CustomerChatbot-Prod")
    raw = client.responses.with_raw_response.create(model=GPT5_MODEL, input="By name.")
    assert raw.parse().output_text
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")


def test_route_attributes_a_key_without_projects(proxy: Proxy) -> None:
    client = proxy.client(UNASSIGNED_KEY, route="/docsearch")
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert projects_of(raw) == ("proj_search", "proj_search")
    line = proxy.access(raw.headers["x-request-id"])
    assert (line["key"], line["route"], line["project_id"], line["outcome"]) == (
        "unassigned",
        "/docsearch",
        "proj_search",
        "forwarded",
    )


def test_route_streams_too(proxy: Proxy) -> None:
    client = proxy.client(UNASSIGNED_KEY, route="/docsearch")
    stream = client.responses.create(model=GPT5_MODEL, input="Via the route.", stream=True)
    completed = [e for e in stream if e.type == "response.completed"]
    assert len(completed) == 1
    assert completed[0].response.usage.total_tokens > 0


def test_models_list(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    ids = [m.id for m in client.models.list()]
    assert CHAT_MODEL in ids and GPT5_MODEL in ids
    assert client.models.retrieve(GPT5_MODEL).id == GPT5_MODEL


# ---------------------------------------------------------------------------------------------
# Refusals


def test_unknown_key_is_an_authentication_error(proxy: Proxy) -> None:
    client = proxy.client(UNKNOWN_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert_openai_error(caught.value, 401, "invalid_api_key", "authentication_error")
    assert "x-simulated-project" not in caught.value.response.headers  # never reached upstream

    line = proxy.access(caught.value.request_id)
    assert line["outcome"] == "rejected"
    assert line["status"] == 401
    assert line["error_code"] == "invalid_api_key"
    assert line.get("key") is None


def test_project_not_allowed_for_the_key_is_permission_denied(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY, project="proj_search", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert_openai_error(caught.value, 403, "project_forbidden", "permission_error")
    # The message says what the key may use instead.
    assert "proj_chatbot" in caught.value.body["message"]

    line = proxy.access(caught.value.request_id)
    assert (line["key"], line["outcome"], line["status"]) == ("chatbot-backend", "rejected", 403)
    assert line.get("project_id") is None


def test_route_of_another_project_is_permission_denied(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY, route="/docsearch", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.responses.create(model=GPT5_MODEL, input="Not my route.")
    assert_openai_error(caught.value, 403, "project_forbidden", "permission_error")


def test_key_without_project_and_route_is_a_bad_request(proxy: Proxy) -> None:
    client = proxy.client(UNASSIGNED_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert_openai_error(caught.value, 400, "project_required", "invalid_request_error")

    line = proxy.access(caught.value.request_id)
    assert (line["key"], line["outcome"], line["error_code"]) == (
        "unassigned",
        "rejected",
        "project_required",
    )


def test_unknown_endpoint_is_not_found(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/organization/projects", cast_to=object)
    assert_openai_error(caught.value, 404, "unknown_endpoint", "invalid_request_error")

    line = proxy.access(caught.value.request_id)
    assert (line["path"], line["outcome"]) == ("/v1/organization/projects", "rejected")


# ---------------------------------------------------------------------------------------------
# The SDK's Bedrock client


def bedrock_client(proxy: Proxy, api_key: str, root: str, **options: Any) -> openai.BedrockOpenAI:
    """`openai.BedrockOpenAI` moved from bedrock-mantle to mantlegate: host and key changed, the
    API root kept (`/openai/v1` is where the client points by default)."""
    return openai.BedrockOpenAI(
        api_key=api_key, base_url=f"http://{proxy.addr}{root}", timeout=15.0, **options
    )


@pytest.mark.parametrize("root", ["/openai/v1", "/v1"])
def test_bedrock_client_works_at_its_own_root_and_at_v1(proxy: Proxy, root: str) -> None:
    client = bedrock_client(proxy, CHATBOT_KEY, root)
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")
    line = proxy.access(raw.headers["x-request-id"])
    assert (line["path"], line["key"], line["api"], line["outcome"]) == (
        f"{root}/chat/completions",
        "chatbot-backend",
        "chat.completions",
        "forwarded",
    )

    # A model bedrock-mantle serves under /openai/v1 goes there whichever root the app uses.
    raw = client.responses.with_raw_response.create(model=GPT5_MODEL, input="Stream me.", stream=True)
    events = list(raw.parse())
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None and usage.total_tokens > 0
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")
    row = proxy.ledger_row(raw.headers["x-request-id"])
    assert (row["api"], row["model"], row["usage_source"]) == ("responses", GPT5_MODEL, "reported")
    assert (row["input_tokens"], row["output_tokens"]) == (usage.input_tokens, usage.output_tokens)


def test_bedrock_client_picks_projects_and_gets_refusals_like_the_plain_client(proxy: Proxy) -> None:
    raw = bedrock_client(
        proxy, SEARCH_KEY, "/openai/v1", project="proj_chatbot"
    ).chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    assert projects_of(raw) == ("proj_chatbot", "proj_chatbot")

    with pytest.raises(openai.AuthenticationError) as caught:
        bedrock_client(proxy, UNKNOWN_KEY, "/openai/v1", max_retries=0).chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES
        )
    assert_openai_error(caught.value, 401, "invalid_api_key", "authentication_error")

    # The Projects admin API stays out of reach under this root too.
    with pytest.raises(openai.NotFoundError) as caught:
        bedrock_client(proxy, CHATBOT_KEY, "/openai/v1", max_retries=0).get(
            "/organization/projects", cast_to=object
        )
    assert_openai_error(caught.value, 404, "unknown_endpoint", "invalid_request_error")
    assert "x-simulated-project" not in caught.value.response.headers


# ---------------------------------------------------------------------------------------------
# The access log


def test_access_log_records_forwarded_and_rejected_calls(proxy: Proxy) -> None:
    request_ids = _calls_with_every_key(proxy)
    lines = [proxy.access(rid) for rid in request_ids]
    summary = [
        (l.get("key"), l.get("route"), l.get("project_id"), l["status"], l["outcome"], l.get("error_code"))
        for l in lines
    ]
    assert summary == [
        ("chatbot-backend", None, "proj_chatbot", 200, "forwarded", None),
        ("search-team", None, "proj_search", 200, "forwarded", None),
        ("unassigned", "/docsearch", "proj_search", 200, "forwarded", None),
        (None, None, None, 401, "rejected", "invalid_api_key"),
        ("unassigned", None, None, 400, "rejected", "project_required"),
    ]
    assert [l["stream"] for l in lines] == [False, True, False, False, False]
    assert all(l["duration_ms"] >= 0 for l in lines)


def test_abandoned_stream_is_logged_as_client_disconnect(proxy: Proxy) -> None:
    client = proxy.client(CHATBOT_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True
    )
    stream = raw.parse()
    next(iter(stream))
    stream.close()  # hang up after the first chunk

    line = proxy.access(raw.headers["x-request-id"])
    assert (line["key"], line["project_id"], line["outcome"]) == (
        "chatbot-backend",
        "proj_chatbot",
        "client_disconnect",
    )


def test_no_log_line_contains_a_key(proxy: Proxy) -> None:
    """Run last, this covers every call of the session; alone, the calls it makes itself."""
    _calls_with_every_key(proxy)
    output = proxy.process.all_output()
    leaked = [(secret, line) for line in output for secret in SECRETS if secret in line]
    assert not leaked


def _calls_with_every_key(proxy: Proxy) -> list[str]:
    """Forwarded calls (plain, streamed, routed) and refusals, with every key; their request ids."""
    ids = []
    raw = proxy.client(CHATBOT_KEY).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES
    )
    ids.append(raw.headers["x-request-id"])
    raw = proxy.client(SEARCH_KEY).responses.with_raw_response.create(
        model=CHAT_MODEL, input="x", stream=True
    )
    list(raw.parse())
    ids.append(raw.headers["x-request-id"])
    raw = proxy.client(UNASSIGNED_KEY, route="/docsearch").models.with_raw_response.list()
    ids.append(raw.headers["x-request-id"])
    for key in (UNKNOWN_KEY, UNASSIGNED_KEY):
        with pytest.raises(openai.APIStatusError) as caught:
            proxy.client(key, max_retries=0).chat.completions.create(
                model=CHAT_MODEL, messages=MESSAGES
            )
        ids.append(caught.value.request_id)
    # Waiting for the last call's line means every earlier line has been read too.
    proxy.access(ids[-1])
    return ids


# ---------------------------------------------------------------------------------------------
# The ledger and governance


def test_every_call_lands_in_the_ledger_with_usage_and_cost(proxy: Proxy) -> None:
    raw = proxy.client(CHATBOT_KEY).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES
    )
    usage = raw.parse().usage
    row = proxy.ledger_row(raw.headers["x-request-id"])
    assert (row["key_name"], row["project_id"], row["tags"]) == (
        "chatbot-backend",
        "proj_chatbot",
        '{"Team":"CX"}',
    )
    assert (row["input_tokens"], row["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert row["usage_source"] == "reported"
    assert row["cost_pico"] > 0, "gpt-oss-120b is in the shipped price list"

    # A streamed call whose client did not ask for usage is metered all the same.
    stream = proxy.client(CHATBOT_KEY).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True
    )
    chunks = list(stream.parse())
    assert all(c.usage is None for c in chunks), "the client gets the stream it asked for"
    row = proxy.ledger_row(stream.headers["x-request-id"])
    assert row["usage_source"] == "reported" and row["output_tokens"] > 0


def test_request_rate_limit_surfaces_as_rate_limit_error(proxy: Proxy) -> None:
    client = proxy.client(LIMITED_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(3):  # the key may make 2 calls a minute
            client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert_openai_error(caught.value, 429, "rate_limit_exceeded", "rate_limit_error")
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1


def test_spent_budget_surfaces_as_rate_limit_error(proxy: Proxy) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client(CAPPED_KEY, max_retries=0).chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES
        )
    assert_openai_error(caught.value, 429, "budget_exceeded", "rate_limit_error")
    assert "capped-monthly" in caught.value.body["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
