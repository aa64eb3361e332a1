"""The official `openai` client against `pdserve serve` (HTTP on 127.0.0.1:8000).

    pip install openai && python examples/openai_client.py

Set PDSERVE_API_KEY if the server was started with --api-key."""
from __future__ import annotations

import os

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1",
                api_key=os.environ.get("PDSERVE_API_KEY", "unused"))
model = client.models.list().data[0].id

# Chat, non-streaming.
chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=32, temperature=0)
print(chat.choices[0].message.content)
print("usage:", chat.usage)

# Chat, streaming, with a final usage chunk.
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print("\nusage:", chunk.usage)

# Plain completion with logprobs; pdserve's extra sampling fields go in extra_body.
completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
    logprobs=2, extra_body={"top_k": 20, "repetition_penalty": 1.1})
print(completion.choices[0].text)
print(completion.choices[0].logprobs.top_logprobs[0])
