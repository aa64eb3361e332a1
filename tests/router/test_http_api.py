"""The OpenAI HTTP API against a real in-process deployment: outputs equal the
single-process engine's, the response shapes, and the bad-input suite (every one a 4xx
JSON error, never a 500)."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import httpx
import pytest

from router.core import RequestFailed
from router.http_server import build_http_app
from router.ledger import Overloaded

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
N = 12
MODEL_NAME = "SmolLM2-135M-Instruct"     # tests/router/conftest.py serves it


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.http_url, timeout=120) as c:
        yield c


def stream_events(client: httpx.Client, path: str, body: dict) -> list[Any]:
    """POST with stream=true; returns parsed `data:` payloads ("[DONE]" kept as is)."""
    out: list[Any] = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and isinstance(err["message"], str)
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- happy paths ---------------------------------------------------------------------------
def test_chat_matches_engine(client, reference):
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": CHAT,
                                                  "max_tokens": N, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant",
                                 "content": reference("chat", CHAT, N)}
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 0 < u["completion_tokens"] <= N and u["prompt_tokens"] > 10
    assert "cached_tokens" in u["prompt_tokens_details"]


def test_completions_text_and_token_ids_match_engine(client, reference, served):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == reference("prompt", PROMPT, N)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == N
    ids = served.frontend.tokenizer.encode(PROMPT)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": N, "temperature": 0})
    assert r.json()["choices"][0]["text"] == reference("ids", ids, N)


def test_chat_stream_with_usage(client, reference):
    events = stream_events(client, "/v1/chat/completions",
                           {"messages": CHAT, "max_tokens": N, "temperature": 0,
                            "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference("chat", CHAT, N)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == (usage["usage"]["prompt_tokens"]
                                              + usage["usage"]["completion_tokens"])


def test_completions_stream_without_usage(client, reference):
    events = stream_events(client, "/v1/completions",
                           {"prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == reference("prompt", PROMPT, N)
    assert all(c["choices"] for c in events[:-1])     # no usage chunk unless asked


def test_completion_logprobs_shape(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                             "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]
    assert all(len(t) == 2 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])
    # Greedy: the chosen token is the most likely one.
    assert lp["tokens"][0] in lp["top_logprobs"][0]
    assert lp["text_offset"][0] == 0


def test_chat_logprobs_shape(client):
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3,
                                                  "temperature": 0, "logprobs": True,
                                                  "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


def test_stop_string_is_excluded(client, reference):
    full = reference("prompt", PROMPT, N)
    stop = full.split()[1]                      # a word from the middle of the answer
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N,
                                             "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_health_models_metrics(client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL_NAME
    assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200
    assert_error(client.get("/v1/models/other"), 404)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "pdserve:time_to_first_token_seconds" in metrics.text
    assert_error(client.get("/no/such/route"), 404)


def test_deadline_header_gives_504(client, served):
    r = client.post("/v1/completions", headers={"x-pdserve-timeout-s": "0.3"},
                    json={"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True,
                          "temperature": 0})
    assert assert_error(r, 504)["code"] == "deadline_exceeded"
    assert_error(client.post("/v1/completions", headers={"x-pdserve-timeout-s": "soon"},
                             json={"prompt": PROMPT}), 400)
    stats = served.wait_idle()
    assert all(s["kv_blocks_in_use"] == 0 for s in stats.values()), stats


def test_client_disconnect_mid_stream_frees_blocks(client, served):
    before = served.deployment.router.ledger.counts["cancelled"]
    with client.stream("POST", "/v1/completions",
                       json={"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True,
                             "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(5)) if line.startswith("data: ")]
        assert got
    stats = served.wait_idle()
    assert all(s["kv_blocks_in_use"] == 0 for s in stats.values()), stats
    assert stats["decode-0"]["reservations"] == 0 and stats["decode-0"]["requests"] == 0
    assert served.deployment.router.ledger.counts["cancelled"] == before + 1



def test_client_gone_during_non_streaming_request_cancels_it(served):
    ledger = served.deployment.router.ledger
    before = ledger.counts["cancelled"]
    with httpx.Client(base_url=served.http_url, timeout=0.5) as short:
        with pytest.raises(httpx.ReadTimeout):   # the client gives up and hangs up
            short.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 500,
                                                "ignore_eos": True, "temperature": 0})
    stats = served.wait_idle()
    assert all(s["kv_blocks_in_use"] == 0 for s in stats.values()), stats
    assert ledger.inflight == 0 and ledger.counts["cancelled"] == before + 1

# -- bad input -----------------------------------------------------------------------------
BAD = [
    ("chat", b'{"messages": [', 400),
    ("chat", b"[1, 2]", 400),
    ("chat", b"", 400),
    ("chat", json.dumps({"messages": "hello"}).encode(), 400),
    ("chat", json.dumps({"messages": []}).encode(), 400),
    ("chat", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400),
    ("chat", json.dumps({"messages": [{"content": "hi"}]}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "max_tokens": -1}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "max_tokens": 0}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "max_tokens": 10 ** 12}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "max_tokens": "8"}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "temperature": -0.5}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "temperature": 1e9}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "top_p": 0}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "stream": "yes"}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "n": 2}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "top_logprobs": 2}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "logprobs": True, "top_logprobs": 99}).encode(), 400),
    ("chat", json.dumps({"messages": CHAT, "model": "gpt-9"}).encode(), 404),
    ("chat", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("completions", json.dumps({"prompt": ""}).encode(), 400),
    ("completions", json.dumps({"prompt": ["a", "b"]}).encode(), 400),
    ("completions", json.dumps({"prompt": [-1, 5]}).encode(), 400),
    ("completions", json.dumps({"prompt": [10 ** 9]}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "stop": 7}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "stop": ["x"] * 100}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "stop_token_ids": [10 ** 10]}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "seed": 2 ** 80}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "top_k": 2 ** 40}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "min_tokens": 50, "max_tokens": 5}).encode(), 400),
    ("completions", json.dumps({"prompt": PROMPT, "echo": True}).encode(), 400),
    ("completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("completions", b"\xff\xfe{}", 400),
    ("completions", json.dumps({"max_tokens": 5}).encode(), 400),
]


@pytest.mark.parametrize("route,body,status", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_json_4xx(client, route, body, status):
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(r, status)


def test_too_long_prompt(client, served):
    r = client.post("/v1/completions", json={"prompt": "hello " * (served.frontend.max_model_len + 10)})
    err = assert_error(r, 400)
    assert "prompt" in err["message"] and str(served.frontend.max_model_len) in err["message"]
    assert err["code"] == "context_length_exceeded"


def test_oversized_body_is_413(client, served):
    body = b'{"prompt": "' + b"a" * (served.frontend.max_body_bytes + 1) + b'"}'
    assert assert_error(client.post("/v1/completions", content=body), 413)


# -- failures mapped to status codes (a stand-in router, served by ASGITransport) ------------
def asgi_call(served, frontend, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_http_app(frontend))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, path, **kw)
    return served.run(go())


@pytest.mark.parametrize("exc,status", [
    (Overloaded("busy", retry_after_s=2.5), 429),
    (RequestFailed("invalid", "bad"), 400), (RequestFailed("exhausted", "full"), 429),
    (RequestFailed("unavailable", "gone"), 503), (RequestFailed("deadline", "late"), 504),
    (RequestFailed("internal", "boom"), 500)])
def test_router_failures_map_to_status(served, fake_router, exc, status):
    fe = replace(served.frontend, router=fake_router(exc))
    for stream in (False, True):
        r = asgi_call(served, fe, "POST", "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 4, "stream": stream})
        assert_error(r, status)
        if status == 429:
            assert int(r.headers["retry-after"]) >= 1
    if isinstance(exc, Overloaded):
        assert r.headers["retry-after"] == "3"


def test_error_after_first_chunk_is_an_sse_event_without_done(served, fake_router):
    router = fake_router(RequestFailed("unavailable", "decode worker lost"), after_first=True)
    fe = replace(served.frontend, router=router)
    r = asgi_call(served, fe, "POST", "/v1/chat/completions",
                  json={"messages": CHAT, "stream": True})
    assert r.status_code == 200
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in data
    assert json.loads(data[-1])["error"]["message"] == "decode worker lost"
    assert router.closed == 1
    # No healthy decode worker behind this frontend: /health says so.
    assert asgi_call(served, fe, "GET", "/health").status_code == 503


def test_api_key_required(served):
    fe = replace(served.frontend, api_key="s3cret")
    for path in ("/v1/models", "/metrics"):
        err = assert_error(asgi_call(served, fe, "GET", path), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(asgi_call(served, fe, "GET", path,
                               headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(asgi_call(served, fe, "POST", "/v1/completions", json={"prompt": "x"}), 401)
    assert asgi_call(served, fe, "GET", "/health").status_code == 200
    ok = asgi_call(served, fe, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
