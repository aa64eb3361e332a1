"""`pdserve serve` as a user runs it (a subprocess; Ray actors except for --transport
local): gRPC Generate (streaming) and HTTP chat completions (streaming and not) give
exactly LLM.generate's greedy tokens, for each transport that runs on CPU and in
colocated mode; 2 prefill + 2 decode workers serve 64 concurrent mixed requests and
return to their baseline block usage; /metrics shows the serving histograms, KV usage
per role and transfer bytes; Ctrl-C shuts it down cleanly."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.v1 import generation_pb2, generation_pb2_grpc

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The three primary colors are", "A short poem about autumn:",
           "def fibonacci(n):", "List of European capitals: Paris, Berlin,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str) -> None:
        self.grpc_port, self.http_port = _free_port(), _free_port()
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--num-blocks", "512",
               "--dtype", "float32", "--device", "cpu",
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *args]
        env = dict(os.environ, PDSERVE_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
        # The log goes to a file: a pipe nobody drains would block the server once full.
        self.logfile = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        end = time.monotonic() + 240
        ready = False
        while time.monotonic() < end and self.proc.poll() is None:
            if "  HTTP" in self.read_log():
                ready = True
                break
            time.sleep(0.5)
        if not ready:
            self.stop()
            raise RuntimeError("pdserve serve did not start:\n" + self.read_log()[-4000:])
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def read_log(self) -> str:
        with open(self.logfile.name) as f:
            return f.read()

    @property
    def log(self) -> list[str]:
        return self.read_log().splitlines(keepends=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    # -- clients -------------------------------------------------------------------------
    def grpc_generate(self, **kw) -> tuple[list[int], str, int]:
        req = generation_pb2.GenerateRequest(model=MODEL, **kw)
        ids, text, finish = [], "", 0
        for r in self.stub.Generate(req, timeout=120):
            ids.extend(r.token_ids)
            text += r.text
            finish = r.finish_reason or finish
        return ids, text, finish

    def chat(self, messages, max_tokens: int, stream: bool) -> str:
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        if not stream:
            r = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=120)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        text, done = "", False
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
        assert done
        return text

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=512)


GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flags", [
    ("--transport", "grpc"),
    ("--transport", "nccl"),
    ("--transport", "local"),
    ("--mode", "colocated"),
], ids=["grpc", "nccl-gloo", "local", "colocated"])
def test_serve_matches_llm(flags, llm):
    chat_ref = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=20))[0]
    gen_ref = llm.generate(PROMPTS, SamplingParams(**GREEDY))
    srv = Server(*flags)
    try:
        # gRPC Generate, streaming: prompt text, token ids and chat messages.
        for p, ref in zip(PROMPTS, gen_ref):
            ids, _, finish = srv.grpc_generate(prompt=p, sampling=generation_pb2.SamplingParams(**GREEDY))
            assert ids == ref.token_ids and finish == generation_pb2.FINISH_REASON_LENGTH
        ids, _, _ = srv.grpc_generate(token_ids=generation_pb2.TokenIds(ids=gen_ref[0].prompt_token_ids),
                                      sampling=generation_pb2.SamplingParams(**GREEDY))
        assert ids == gen_ref[0].token_ids
        msgs = generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(**m) for m in QUESTION])
        ids, text, _ = srv.grpc_generate(messages=msgs, sampling=generation_pb2.SamplingParams(
            temperature=0.0, max_tokens=20))
        assert ids == chat_ref.token_ids and text == chat_ref.text
        # HTTP chat completions, streaming and not.
        assert srv.chat(QUESTION, 20, stream=False) == chat_ref.text
        assert srv.chat(QUESTION, 20, stream=True) == chat_ref.text
        if flags == ("--transport", "grpc"):
            m = srv.metrics()
            assert _value(m, r'pdserve:time_to_first_token_seconds_count\{[^}]*\}') > 0
            assert _value(m, r'pdserve:inter_token_latency_seconds_count\{[^}]*\}') > 0
            assert _value(m, r'pdserve:kv_transfer_bytes_total\{[^}]*transport="grpc"[^}]*\}') > 0
            assert re.search(r'pdserve:kv_cache_usage_perc\{[^}]*role="prefill"', m)
            assert re.search(r'pdserve:kv_cache_usage_perc\{[^}]*role="decode"', m)
            # Each worker's own /metrics endpoint, printed at start-up.
            eps = re.findall(r"worker (\S+) metrics (http://\S+)", srv.read_log())
            assert {w for w, _ in eps} == {"prefill-0", "decode-0"}
            for wid, url in eps:
                wm = httpx.get(url, timeout=10).text
                assert re.search(rf'pdserve:kv_cache_usage_perc\{{[^}}]*worker="{wid}"', wm)
                assert wid.startswith("decode") or _value(wm, r"pdserve:prefix_cache_queries_total\{[^}]*\}") > 0
    finally:
        code = srv.stop()
    assert code == 0, "".join(srv.log[-20:])


def _value(text: str, pattern: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(pattern + r"\s+([0-9.e+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


@pytest.mark.timeout(600)
def test_2p2d_64_concurrent_mixed(llm):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    prompts = [" ".join(words[(i + j) % 10] for j in range(5 + (i * 37) % 150)) for i in range(64)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 13, ignore_eos=True) for i in range(64)]
    refs = llm.generate(prompts, params)
    srv = Server("--prefill", "2", "--decode", "2", "--transport", "grpc",
                 "--prefill-policy", "least_loaded", "--max-queue", "128")
    try:
        def one(i: int) -> list[int]:
            if i % 2:
                ids, _, _ = srv.grpc_generate(prompt=prompts[i], sampling=generation_pb2.SamplingParams(
                    temperature=0.0, max_tokens=params[i].max_tokens, ignore_eos=True))
                return ids
            r = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
                "model": MODEL, "prompt": prompts[i], "max_tokens": params[i].max_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        with cf.ThreadPoolExecutor(64) as ex:
            outs = list(ex.map(one, range(64)))
        for i, (o, ref) in enumerate(zip(outs, refs)):
            assert o == (ref.token_ids if isinstance(o, list) else ref.text), f"request {i}"
        # Baseline: no KV block in use on any worker once the router's view refreshes.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            m = srv.metrics()
            usage = [float(v) for v in re.findall(r'pdserve:kv_cache_usage_perc\{[^}]*\}\s+([0-9.e+-]+)', m)]
            if len(usage) == 4 and not any(usage):
                break
            time.sleep(0.3)
        assert len(usage) == 4 and not any(usage), usage
    finally:
        code = srv.stop()
    assert code == 0
