"""The committed pdserve.v1 stubs match the .proto files and behave as the API says."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = [f"pdserve.v1.{name}{suffix}" for name in ("generation", "worker", "kv")
           for suffix in ("_pb2", "_pb2_grpc")]


def test_committed_stubs_match_a_fresh_generation():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stale stubs:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(name)


def test_grpc_stubs_import_under_grpcio_1_84_0():
    # The GPU image has grpcio 1.84.0; the generator lowers the stubs' floor to it.
    for name in MODULES:
        if name.endswith("_grpc"):
            assert importlib.import_module(name).GRPC_GENERATED_VERSION == "1.84.0"


def _roundtrip(msg):
    return type(msg).FromString(msg.SerializeToString())


def test_generate_request_oneof_variants_roundtrip():
    from pdserve.v1 import generation_pb2 as pb

    variants = {
        "prompt": pb.GenerateRequest(model="m", prompt="Hello"),
        "token_ids": pb.GenerateRequest(model="m", token_ids=pb.TokenIds(ids=[1, 2, 70000])),
        "messages": pb.GenerateRequest(model="m", messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="user", content="What is the capital of France?")])),
    }
    for which, req in variants.items():
        back = _roundtrip(req)
        assert back == req
        assert back.WhichOneof("input") == which
    assert list(_roundtrip(variants["token_ids"]).token_ids.ids) == [1, 2, 70000]
    assert _roundtrip(variants["messages"]).messages.messages[1].role == "user"
    # Setting one member of the oneof clears the others.
    req = pb.GenerateRequest(prompt="x")
    req.token_ids.ids.append(5)
    assert req.WhichOneof("input") == "token_ids" and not req.HasField("prompt")
    assert pb.GenerateRequest().WhichOneof("input") is None


def test_sampling_optional_fields_keep_presence():
    from pdserve.v1 import generation_pb2 as pb

    optional = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty",
                "logprobs", "skip_special_tokens")
    unset = _roundtrip(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams()))
    assert unset.HasField("sampling")
    for name in optional:
        assert not unset.sampling.HasField(name), name
    # Explicit zeros (greedy, seed 0, logprobs 0, skip_special_tokens false) survive.
    zeros = pb.SamplingParams(max_tokens=0, temperature=0.0, top_p=0.0, seed=0,
                              repetition_penalty=0.0, logprobs=0, skip_special_tokens=False)
    back = _roundtrip(pb.GenerateRequest(prompt="x", sampling=zeros)).sampling
    for name in optional:
        assert back.HasField(name), name
        assert not getattr(back, name)
    full = pb.SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05,
                             seed=-(2 ** 63), stop=["\n\n", "END"], stop_token_ids=[2, 7],
                             repetition_penalty=1.1, presence_penalty=-0.5,
                             frequency_penalty=2.0, ignore_eos=True, min_tokens=3,
                             logprobs=5, skip_special_tokens=True)
    back = _roundtrip(full)
    assert back == full
    assert back.temperature == 0.7 and back.top_p == 0.9  # doubles: exact
    assert back.seed == -(2 ** 63) and list(back.stop) == ["\n\n", "END"]
    # Plain proto3 fields have no presence.
    with pytest.raises(ValueError):
        back.HasField("top_k")


def test_generate_response_last_message_roundtrip():
    from pdserve.v1 import generation_pb2 as pb

    resp = pb.GenerateResponse(
        request_id="req-1", token_ids=[11, 12], text="Paris.",
        logprobs=[pb.TokenLogprob(token_id=11, logprob=-0.25,
                                  top_logprobs=[pb.TopLogprob(token_id=11, logprob=-0.25)])],
        finish_reason=pb.FINISH_REASON_STOP, stop_reason="\n", stop_token_id=2,
        usage=pb.Usage(prompt_tokens=9, completion_tokens=7, cached_tokens=8))
    back = _roundtrip(resp)
    assert back == resp and back.HasField("usage") and back.HasField("stop_token_id")
    assert pb.FinishReason.Name(back.finish_reason) == "FINISH_REASON_STOP"
    assert not _roundtrip(pb.GenerateResponse(request_id="r")).HasField("stop_token_id")


def test_internal_messages_roundtrip():
    from pdserve.v1 import generation_pb2 as gpb
    from pdserve.v1 import kv_pb2 as kpb
    from pdserve.v1 import worker_pb2 as wpb

    res = wpb.Reservation(reservation_id="r1", decode_worker_id="decode-0",
                          endpoint="127.0.0.1:7701", block_ids=[4, 9, 2], num_tokens=40,
                          lease_expiry_unix_ms=1_800_000_000_000, compat_hash=2 ** 64 - 1,
                          attempt_id=2, transport="grpc", block_size=16,
                          transport_params={"rank": "1"})
    task = wpb.PrefillTask(request_id="q", attempt_id=2, prompt_token_ids=[1] * 40,
                           sampling=gpb.SamplingParams(temperature=0.0), reservation=res,
                           deadline_unix_ms=1)
    assert _roundtrip(task) == task and _roundtrip(task).reservation.compat_hash == 2 ** 64 - 1
    rec = wpb.CompletionRecord(request_id="q", attempt_id=2, reservation_id="r1",
                               first_token_id=42, num_prompt_tokens=40, kv_checksum=2 ** 32 - 1,
                               num_chunks=3, kv_bytes=123)
    assert not _roundtrip(rec).HasField("first_token_logprob")
    rec.first_token_logprob = -0.5
    assert _roundtrip(rec).HasField("first_token_logprob")
    batch = wpb.DecodeOutputBatch(outputs=[
        wpb.DecodeOutput(request_id="q", token_ids=[5], text="a", first_token_index=1),
        wpb.DecodeOutput(request_id="z", finish_reason=gpb.FINISH_REASON_ERROR, error="boom")])
    assert _roundtrip(batch) == batch
    load = wpb.WorkerLoad(worker_id="w", role=wpb.ROLE_DECODE, kv_blocks_total=10,
                          kv_blocks_free=4, kv_usage=0.6)
    assert _roundtrip(load).role == wpb.ROLE_DECODE
    header = kpb.KVChunkHeader(request_id="q", attempt_id=2, reservation_id="r1",
                               layer_start=0, layer_end=30, block_ids=[4, 9, 2],
                               dtype=kpb.KV_DTYPE_BFLOAT16, shape=[30, 2, 3, 16, 3, 64],
                               chunk_index=0, num_chunks=0, payload_bytes=4,
                               crc32c=0xDEADBEEF, compat_hash=2 ** 64 - 1)
    chunk = kpb.KVChunk(header=header, payload=b"\x00\x01\x02\x03")
    assert _roundtrip(chunk) == chunk
    assert kpb.KVPushAck().code == kpb.KV_STATUS_UNSPECIFIED != kpb.KV_STATUS_OK


def _methods(service):
    return {m.name: m for m in service.methods}


def test_service_descriptors():
    from pdserve.v1 import generation_pb2, kv_pb2

    gen = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert gen.full_name == "pdserve.v1.Generation"
    methods = _methods(gen)
    assert set(methods) == {"Generate", "Tokenize", "ListModels"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert methods["Generate"].input_type.name == "GenerateRequest"
    assert methods["Generate"].output_type.name == "GenerateResponse"
    for name in ("Tokenize", "ListModels"):
        assert not methods[name].server_streaming and not methods[name].client_streaming

    kv = kv_pb2.DESCRIPTOR.services_by_name["KVTransfer"]
    methods = _methods(kv)
    assert set(methods) == {"Push", "Complete"}
    assert methods["Push"].client_streaming and not methods["Push"].server_streaming
    assert methods["Push"].input_type.name == "KVChunk"
    assert methods["Push"].output_type.name == "KVPushAck"
    assert methods["Complete"].input_type.full_name == "pdserve.v1.CompletionRecord"
    assert methods["Complete"].output_type.name == "CompleteAck"


def test_grpc_classes_exist():
    from pdserve.v1 import generation_pb2_grpc, kv_pb2_grpc

    for mod, svc in ((generation_pb2_grpc, "Generation"), (kv_pb2_grpc, "KVTransfer")):
        assert hasattr(mod, f"{svc}Stub") and hasattr(mod, f"{svc}Servicer")
        assert hasattr(mod, f"add_{svc}Servicer_to_server")


def test_check_reports_stale_and_leftover_files(tmp_path, monkeypatch):
    pytest.importorskip("grpc_tools")
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    monkeypatch.setattr(gen_proto, "ROOT", tmp_path)
    monkeypatch.setattr(gen_proto, "PROTO_ROOT", tmp_path / "proto")

    assert gen_proto.main([]) == 0
    assert gen_proto.check() == []
    pkg = tmp_path / "pdserve" / "v1"
    (pkg / "kv_pb2.py").write_text("# edited\n")
    (pkg / "worker_pb2.pyi").unlink()
    (pkg / "old_pb2.py").write_text("")
    stale = gen_proto.check()
    assert sorted(stale) == ["pdserve/v1/kv_pb2.py (differs)",
                             "pdserve/v1/old_pb2.py (no .proto generates it)",
                             "pdserve/v1/worker_pb2.pyi (missing)"]
    assert gen_proto.main(["--check"]) == 1


def test_stubs_work_over_a_loopback_channel():
    """A toy servicer per service: server streaming, client streaming, metadata."""
    from concurrent import futures

    import grpc

    from pdserve.v1 import generation_pb2 as gpb
    from pdserve.v1 import generation_pb2_grpc as ggrpc
    from pdserve.v1 import kv_pb2 as kpb
    from pdserve.v1 import kv_pb2_grpc as kgrpc

    class Gen(ggrpc.GenerationServicer):
        def Generate(self, request, context):
            yield gpb.GenerateResponse(request_id="srv-1", token_ids=[1], text="Par")
            yield gpb.GenerateResponse(request_id="srv-1", token_ids=[2], text="is",
                                       finish_reason=gpb.FINISH_REASON_STOP,
                                       usage=gpb.Usage(prompt_tokens=3, completion_tokens=2))

    class KV(kgrpc.KVTransferServicer):
        def Push(self, request_iterator, context):
            if dict(context.invocation_metadata()).get("x-pdserve-secret") != "s3cret":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad secret")
            n = size = 0
            for chunk in request_iterator:
                n, size = n + 1, size + len(chunk.payload)
            return kpb.KVPushAck(accepted_chunks=n, accepted_bytes=size, code=kpb.KV_STATUS_OK)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ggrpc.add_GenerationServicer_to_server(Gen(), server)
    kgrpc.add_KVTransferServicer_to_server(KV(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            out = list(ggrpc.GenerationStub(channel).Generate(
                gpb.GenerateRequest(prompt="capital of France?"), timeout=10))
            assert "".join(r.text for r in out) == "Paris"
            assert out[-1].finish_reason == gpb.FINISH_REASON_STOP
            chunks = [kpb.KVChunk(header=kpb.KVChunkHeader(chunk_index=i), payload=b"ab")
                      for i in range(3)]
            kv = kgrpc.KVTransferStub(channel)
            ack = kv.Push(iter(chunks), metadata=[("x-pdserve-secret", "s3cret")], timeout=10)
            assert (ack.accepted_chunks, ack.accepted_bytes, ack.code) == (3, 6, kpb.KV_STATUS_OK)
            with pytest.raises(grpc.RpcError) as info:
                kv.Push(iter(chunks), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)
