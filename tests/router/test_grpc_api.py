"""The public gRPC API (pdserve.v1.Generation + health + reflection) against a real
in-process deployment: outputs equal the single-process engine's, status codes, and
that cancel / deadline leave no KV block in use on either worker."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.core import RequestFailed
from router.ledger import Overloaded

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


def greedy(n: int = N, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, **kw)


def collect(stub, req: pb.GenerateRequest, **kw) -> tuple[str, list[int], pb.GenerateResponse]:
    text, ids, last = [], [], None
    for resp in stub.Generate(req, timeout=120, **kw):
        text.append(resp.text)
        ids.extend(resp.token_ids)
        last = resp
    return "".join(text), ids, last


def code_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_generate_prompt_matches_engine(stub, reference):
    text, ids, last = collect(stub, pb.GenerateRequest(prompt=PROMPT, sampling=greedy()))
    assert text == reference("prompt", PROMPT, N)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(ids) == N
    assert last.usage.prompt_tokens > 0 and last.request_id.startswith("req-")


def test_generate_token_ids_and_messages_match_engine(stub, reference, served):
    ids = served.frontend.tokenizer.encode(PROMPT)
    text, _, _ = collect(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                  sampling=greedy()))
    assert text == reference("ids", ids, N)
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])
    text, _, last = collect(stub, pb.GenerateRequest(messages=msgs, sampling=greedy(),
                                                     model=served.frontend.model_name))
    assert text == reference("chat", CHAT, N)
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def test_generate_logprobs_and_stop(stub, reference):
    full = reference("prompt", PROMPT, N)
    stop = full.split()[1]
    text, ids, last = collect(stub, pb.GenerateRequest(
        prompt=PROMPT, sampling=greedy(logprobs=2, stop=[stop])))
    assert text == full[:full.index(stop)]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stop_reason == stop
    resps = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=greedy(3, logprobs=2))))
    lps = [lp for r in resps for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == [t for r in resps for t in r.token_ids]
    assert all(len(lp.top_logprobs) == 2 for lp in lps)


def test_tokenize_and_list_models(stub, served):
    tok = served.frontend.tokenizer
    r = stub.Tokenize(pb.TokenizeRequest(text=PROMPT))
    assert list(r.token_ids) == tok.encode(PROMPT) and r.count == len(r.token_ids)
    assert r.max_model_len == served.frontend.max_model_len
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])
    r = stub.Tokenize(pb.TokenizeRequest(messages=msgs))
    assert list(r.token_ids) == tok.apply_chat_template(CHAT)
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.id for m in models] == [served.frontend.model_name]
    assert models[0].max_model_len == served.frontend.max_model_len


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pdserve.v1.Generation"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("req", [
    pb.GenerateRequest(),
    pb.GenerateRequest(prompt=""),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=0)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=10 ** 9)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(temperature=-1)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(top_p=2.0)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(logprobs=50)),
    pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(stop_token_ids=[10 ** 9])),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10 ** 9])),
    pb.GenerateRequest(messages=pb.ChatMessages()),
    pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="x", content="hi")])),
    pb.GenerateRequest(prompt="hello " * 9000),
], ids=lambda r: str(r).replace("\n", " ")[:60])
def test_invalid_argument(stub, req):
    err = code_of(lambda: list(stub.Generate(req, timeout=30)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details()


def test_unknown_model_and_bad_tokenize(stub):
    err = code_of(lambda: list(stub.Generate(pb.GenerateRequest(model="gpt-9", prompt="hi"))))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "gpt-9" in err.details()
    err = code_of(lambda: stub.Tokenize(pb.TokenizeRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unauthenticated(served):
    server, port = served.start_grpc(api_key="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                err = code_of(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = code_of(lambda: list(stub.Generate(pb.GenerateRequest(prompt="hi"))))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ListModels(pb.ListModelsRequest(),
                                 metadata=[("authorization", "Bearer s3cret")])
            assert len(ok.models) == 1
            health = health_pb2_grpc.HealthStub(ch)   # exempt
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        served.run(server.stop(0))


def test_deadline_exceeded_stops_work(stub, served):
    req = pb.GenerateRequest(prompt=PROMPT, sampling=greedy(500, ignore_eos=True))
    err = code_of(lambda: list(stub.Generate(req, timeout=0.5)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = served.wait_idle()
    assert all(s["kv_blocks_in_use"] == 0 for s in stats.values()), stats


def test_cancel_mid_stream_frees_blocks(stub, served):
    ledger = served.deployment.router.ledger
    before = ledger.counts["cancelled"]
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=greedy(500, ignore_eos=True)))
    got = [next(call) for _ in range(2)]
    assert all(r.token_ids for r in got)
    call.cancel()
    stats = served.wait_idle(timeout=2.0)
    assert stats["prefill-0"]["kv_blocks_in_use"] == 0, stats
    assert stats["decode-0"]["kv_blocks_in_use"] == 0, stats
    assert stats["decode-0"]["reservations"] == 0 and stats["decode-0"]["requests"] == 0
    assert ledger.inflight == 0 and ledger.counts["cancelled"] == before + 1


@pytest.mark.parametrize("exc,code", [
    (Overloaded("busy", retry_after_s=2.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestFailed("unavailable", "gone"), grpc.StatusCode.UNAVAILABLE),
    (RequestFailed("internal", "boom"), grpc.StatusCode.INTERNAL)])
def test_router_failures_map_to_codes(served, fake_router, exc, code):
    router = fake_router(exc, after_first=isinstance(exc, RequestFailed))
    server, port = served.start_grpc(router=router)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="hi"))
            seen = []
            err = code_of(lambda: seen.extend(call))
            assert err.code() == code and err.details()
            assert len(seen) == (1 if isinstance(exc, RequestFailed) else 0)
            if isinstance(exc, Overloaded):
                assert dict(call.trailing_metadata())["retry-after"] == "2"
            health = health_pb2_grpc.HealthStub(ch)  # no decode worker behind it
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        assert router.closed == 1
    finally:
        served.run(server.stop(0))

