"""The official `openai` client against our HTTP server: completions and chat, streaming
and not, usage reported (streaming: stream_options include_usage)."""
from __future__ import annotations

import openai
import pytest

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
N = 10


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model(served) -> str:
    return served.frontend.model_name


def test_models(client, model):
    assert [m.id for m in client.models.list().data] == [model]


def test_completion(client, model, reference):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == reference("prompt", PROMPT, N)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == N
    assert r.usage.total_tokens == r.usage.prompt_tokens + N


def test_completion_stream(client, model, reference):
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference("prompt", PROMPT, N)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == N


def test_chat(client, model, reference):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference("chat", CHAT, N)
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream(client, model, reference):
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=N,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference("chat", CHAT, N)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_errors_raise_typed_exceptions(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CHAT, temperature=-3)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
