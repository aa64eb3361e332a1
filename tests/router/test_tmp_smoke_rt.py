import httpx, json
def test_smoke(served):
    c = httpx.Client(base_url=served.http_url, timeout=60)
    r = c.post("/v1/chat/completions", json={"messages":[{"role":"user","content":"What is the capital of France?"}], "max_tokens": 12, "temperature": 0})
    print(r.status_code, r.text)
    r = c.post("/v1/completions", json={"prompt":"The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 2})
    print(r.status_code, r.text)
    with c.stream("POST", "/v1/chat/completions", json={"messages":[{"role":"user","content":"Hi"}], "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1}) as r:
        print(r.status_code, r.headers)
        for line in r.iter_lines(): print(line)
    for body in [b"{", b"\xff\xfe", b"[]", json.dumps({"prompt": "x", "max_tokens": "a"}).encode(), json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), json.dumps({"prompt": "x", "temperature": -1}).encode(), json.dumps({"prompt": "x", "model": "nope"}).encode(), json.dumps({"messages": []}).encode(), json.dumps({"prompt": "x", "n": 2}).encode(), json.dumps({"prompt": ["a","b"]}).encode(), json.dumps({"prompt": [99999999]}).encode(), json.dumps({"prompt": "x", "seed": 2**70}).encode(), b"x"*(2<<20)]:
        r = c.post("/v1/completions", content=body)
        print(r.status_code, r.text[:300])
    print(c.get("/health").text, c.get("/v1/models").text, c.get("/nope").text, c.get("/metrics").text[:300])
    print(served.wait_idle())
