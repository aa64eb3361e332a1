"""KV layout, chunking and the per-chunk checks of the wire format."""
from __future__ import annotations

import os

import google_crc32c
import pytest
import torch

from kv_transfer.base import TransferError
from kv_transfer.layout import (WIRE_VERSION, KVLayout, dtype_from_proto, dtype_to_proto, gather_blocks,
                                scatter_blocks)
from kv_transfer.wire import (OutChunk, SendLedger, crc32c, crc32c_combine, decode_payload, encode_chunks,
                              parse_chunk, plan_chunks, split_ranges, target_block_ids)
from pdserve.v1 import kv_pb2, worker_pb2

# decode_payload views read-only bytes on purpose (kv_transfer/wire.py filters this at
# import; pytest resets warning filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_caches(layout: KVLayout, num_blocks: int, seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    if seed is None:
        kv = torch.zeros(shape, dtype=layout.dtype)
    else:
        kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype)
    return [(kv[l, 0], kv[l, 1]) for l in range(layout.num_layers)]


def base_header() -> kv_pb2.KVChunkHeader:
    return kv_pb2.KVChunkHeader(request_id="req", attempt_id=3, reservation_id="res", compat_hash=42)


# --- layout -----------------------------------------------------------------------------

def test_compat_hash_is_deterministic_64_bit_and_covers_every_field() -> None:
    base = KVLayout(4, 16, 2, 64, torch.bfloat16)
    h = base.compat_hash("model-a")
    assert h == KVLayout(4, 16, 2, 64, torch.bfloat16).compat_hash("model-a")
    assert 0 <= h < 1 << 64
    others = [base.compat_hash("model-b"), KVLayout(5, 16, 2, 64, torch.bfloat16).compat_hash("model-a"),
              KVLayout(4, 32, 2, 64, torch.bfloat16).compat_hash("model-a"),
              KVLayout(4, 16, 3, 64, torch.bfloat16).compat_hash("model-a"),
              KVLayout(4, 16, 2, 128, torch.bfloat16).compat_hash("model-a"),
              KVLayout(4, 16, 2, 64, torch.float16).compat_hash("model-a")]
    assert len({h, *others}) == 7
    assert WIRE_VERSION >= 1


def test_dtype_mapping_round_trips_and_rejects_unknown() -> None:
    for dtype in DTYPES:
        assert dtype_from_proto(dtype_to_proto(dtype)) == dtype
    with pytest.raises(ValueError):
        dtype_to_proto(torch.int8)
    with pytest.raises(TransferError) as e:
        dtype_from_proto(kv_pb2.KV_DTYPE_UNSPECIFIED)
    assert e.value.code == kv_pb2.KV_STATUS_INVALID
    with pytest.raises(ValueError):
        KVLayout(0, 16, 2, 64, torch.float32)


def test_layout_from_caches_and_payload_shape() -> None:
    layout = KVLayout(3, 4, 2, 8, torch.float16)
    assert KVLayout.from_caches(make_caches(layout, 5, None)) == layout
    assert layout.payload_shape(2, 7) == (2, 2, 7, 4, 2, 8)
    assert layout.payload_bytes(2, 7) == 2 * 2 * 7 * 4 * 2 * 8 * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_moves_blocks_between_different_ids(dtype: torch.dtype) -> None:
    layout = KVLayout(3, 4, 2, 8, dtype)
    src, dst = make_caches(layout, 10, seed=1), make_caches(layout, 12, None)
    payload = gather_blocks(src, 1, 3, [7, 2, 9])
    assert payload.shape == (2, 2, 3, 4, 2, 8) and payload.is_contiguous()
    scatter_blocks(dst, 1, 3, [0, 11, 4], payload)
    for l in (1, 2):
        for kv in (0, 1):
            for s, d in ((7, 0), (2, 11), (9, 4)):
                assert torch.equal(dst[l][kv][d], src[l][kv][s])
    assert not dst[0][0].any() and not dst[1][0][1].any()  # nothing else touched
    with pytest.raises(ValueError):
        scatter_blocks(dst, 0, 1, [0, 1], payload)


def test_head_major_caches_move_the_same_values() -> None:
    """A head-major cache (allocate_kv_caches(layout="head"), the CUDA engine's) has one
    buffer under its views, and gathers and scatters the same logical payload as a
    token-major one, so P and D of either layout exchange KV unchanged."""
    from kv_transfer.layout import single_buffer
    from pdserve.config import ModelConfig
    from pdserve.model.llama import allocate_kv_caches
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=32,
                                     hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    token = allocate_kv_caches(cfg, 10, 4, torch.float32, "cpu", "token")
    head = allocate_kv_caches(cfg, 10, 4, torch.float32, "cpu", "head")
    assert head[0][0].shape == token[0][0].shape == (10, 4, 2, 8)
    assert head[0][0].stride() == (64, 8, 32, 1)            # [block, Hkv, page, D] in memory
    for t, h in zip(token, head):
        for a, b in zip(t, h):
            a.normal_()
            b.copy_(a)
    base = single_buffer(head)
    assert base is not None and base.shape == (3, 2, 10, 4, 2, 8)
    want = gather_blocks(token, 0, 3, [7, 2, 9])
    assert torch.equal(gather_blocks(head, 0, 3, [7, 2, 9], base), want)
    assert torch.equal(gather_blocks(head, 0, 3, [7, 2, 9]), want)
    dst = allocate_kv_caches(cfg, 12, 4, torch.float32, "cpu", "head")
    scatter_blocks(dst, 0, 3, [0, 11, 4], want)
    for l in range(3):
        for kv in (0, 1):
            for s, d in ((7, 0), (2, 11), (9, 4)):
                assert torch.equal(dst[l][kv][d], token[l][kv][s])
    assert not dst[1][0][1].any()
    assert single_buffer([(token[0][0].clone(), token[0][1].clone())]) is None


# --- crc --------------------------------------------------------------------------------

@pytest.mark.parametrize("len_a,len_b", [(0, 5), (5, 0), (1, 1), (100, 3), (7, 123457), (1 << 20, 4 << 20)])
def test_crc32c_combine_equals_extend(len_a: int, len_b: int) -> None:
    a, b = os.urandom(len_a), os.urandom(len_b)
    want = google_crc32c.extend(google_crc32c.value(a), b)
    assert crc32c_combine(crc32c(a), crc32c(b), len_b) == want == google_crc32c.value(a + b)
    assert crc32c(memoryview(a + b)) == want


# --- chunking ---------------------------------------------------------------------------

def test_split_ranges_respects_limit_and_covers_everything() -> None:
    for layers, blocks, unit, limit in [(1, 7, 100, 250), (3, 10, 100, 700), (4, 3, 100, 10),
                                        (80, 2, 100, 1000), (2, 5, 100, 10_000)]:
        pieces = split_ranges(layers, blocks, unit, limit)
        seen = set()
        for l0, l1, b0, b1 in pieces:
            assert (l1 - l0) * (b1 - b0) * unit <= max(limit, unit)
            for l in range(l0, l1):
                for b in range(b0, b1):
                    assert (l, b) not in seen
                    seen.add((l, b))
        assert len(seen) == layers * blocks
    assert split_ranges(2, 5, 100, 10_000) == [(0, 2, 0, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_round_trip_with_uneven_chunks(dtype: torch.dtype) -> None:
    layout = KVLayout(3, 4, 2, 8, dtype)
    src = make_caches(layout, 9, seed=2)
    kv = gather_blocks(src, 1, 3, [8, 0, 3, 5, 1, 2, 7])
    column = 2 * layout.layer_block_bytes()        # one block of both layers
    limit = 2 * column + column // 3               # not a multiple of a block: 2 blocks/chunk
    d_ids = [20, 21, 22, 23, 24, 25, 26]
    chunks = encode_chunks(base_header(), 1, 3, d_ids, kv, 5, limit)
    assert [c.header.chunk_index for c in chunks] == [5, 6, 7, 8]
    assert [len(c.header.block_ids) for c in chunks] == [2, 2, 2, 1]
    running, parts = 0, []
    for c in chunks:
        h = c.header
        assert len(c.payload) == h.payload_bytes <= limit
        assert (h.request_id, h.attempt_id, h.reservation_id, h.compat_hash) == ("req", 3, "res", 42)
        assert (h.layer_start, h.layer_end, h.num_chunks) == (1, 3, 0)
        assert c.checksum() == h.crc32c == google_crc32c.value(c.payload)
        running = google_crc32c.extend(running, c.payload)
        parts.append(decode_payload(h, c.payload, layout))
    assert torch.equal(torch.cat(parts, dim=2), kv)  # bit-exact, bf16 included
    assert [b for c in chunks for b in c.header.block_ids] == d_ids


def test_bfloat16_payload_is_the_int16_bytes() -> None:
    layout = KVLayout(1, 2, 1, 4, torch.bfloat16)
    kv = torch.randn(1, 2, 1, 2, 1, 4).to(torch.bfloat16)
    (chunk,) = encode_chunks(base_header(), 0, 1, [0], kv, 0, 1 << 20)
    chunk.checksum()
    assert chunk.payload == kv.view(torch.int16).numpy().tobytes()
    assert chunk.header.dtype == kv_pb2.KV_DTYPE_BFLOAT16
    assert torch.equal(decode_payload(chunk.header, memoryview(chunk.payload), layout), kv)


def test_plan_chunks_without_checksum_and_bad_input() -> None:
    kv = torch.ones(1, 2, 3, 2, 1, 4)
    planned = plan_chunks(base_header(), 0, 1, [4, 5, 6], kv, 0, 1 << 20, checksum=False)
    assert [h.crc32c for h, _ in planned] == [0]
    with pytest.raises(ValueError):
        encode_chunks(base_header(), 0, 2, [4, 5, 6], kv, 0, 1 << 20)  # 2 layers, kv has 1
    with pytest.raises(ValueError):
        encode_chunks(base_header(), 0, 1, [4, 5], kv, 0, 1 << 20)     # 2 ids, 3 blocks


def one_chunk(layout: KVLayout) -> OutChunk:
    kv = torch.randn(layout.payload_shape(1, 2)).to(layout.dtype)
    (chunk,) = encode_chunks(base_header(), 0, 1, [1, 2], kv, 0, 1 << 20)
    chunk.checksum()            # as sending does, so the mutations below come after it
    return chunk


@pytest.mark.parametrize("mutate,code", [
    (lambda c: setattr(c.header, "dtype", kv_pb2.KV_DTYPE_FLOAT16), kv_pb2.KV_STATUS_INVALID),
    (lambda c: setattr(c.header, "dtype", 77), kv_pb2.KV_STATUS_INVALID),
    (lambda c: c.header.shape.__setitem__(3, 1), kv_pb2.KV_STATUS_INVALID),
    (lambda c: setattr(c.header, "payload_bytes", c.header.payload_bytes - 4), kv_pb2.KV_STATUS_INVALID),
    (lambda c: setattr(c, "payload", c.payload[:-4]), kv_pb2.KV_STATUS_INVALID),
    (lambda c: setattr(c.header, "layer_end", 9), kv_pb2.KV_STATUS_INVALID),
    (lambda c: setattr(c, "payload", bytes([c.payload[0] ^ 1]) + c.payload[1:]), kv_pb2.KV_STATUS_CORRUPT),
    (lambda c: setattr(c.header, "crc32c", c.header.crc32c ^ 0x80), kv_pb2.KV_STATUS_CORRUPT),
])
def test_decode_payload_rejects(mutate, code: int) -> None:  # type: ignore[no-untyped-def]
    layout = KVLayout(2, 2, 1, 4, torch.float32)
    chunk = one_chunk(layout)
    mutate(chunk)
    with pytest.raises(TransferError) as e:
        decode_payload(chunk.header, chunk.payload, layout)
    assert e.value.code == code


def test_send_ledger_holds_back_the_last_chunk() -> None:
    kv = torch.ones(1, 2, 3, 2, 1, 4)
    ledger: SendLedger[OutChunk] = SendLedger(lambda c: c.header)
    first = encode_chunks(base_header(), 0, 1, [1, 2, 3], kv, ledger.next_index, 64)
    assert len(first) == 3
    out = ledger.push(first)
    assert [c.header.chunk_index for c in out] == [0, 1]
    second = encode_chunks(base_header(), 0, 1, [1, 2, 3], kv, ledger.next_index, 1 << 20)
    out = ledger.push(second)
    assert [c.header.chunk_index for c in out] == [2]
    last = ledger.finish()
    assert last is not None and (last.header.chunk_index, last.header.num_chunks) == (3, 4)
    running = 0
    for c in first + second:
        c.SerializeToString()                       # sending stamps each chunk's crc
        running = google_crc32c.extend(running, c.payload)
    s = ledger.summary()
    assert (s.num_chunks, s.checksum, s.num_bytes) == (4, running, sum(len(c.payload) for c in first + second))
    assert ledger.finish() is None


def test_target_block_ids_skip_cached_prefix() -> None:
    r = worker_pb2.Reservation(block_ids=[9, 8, 7, 6], block_size=16, num_cached_tokens=32)
    assert target_block_ids(r) == [7, 6]
    assert target_block_ids(worker_pb2.Reservation(block_ids=[3, 4])) == [3, 4]
    with pytest.raises(ValueError):
        target_block_ids(worker_pb2.Reservation(block_ids=[3, 4], block_size=16, num_cached_tokens=8))


def test_parse_chunk_is_zero_copy_and_strict() -> None:
    kv = torch.randn(1, 2, 3, 2, 1, 4)
    (chunk,) = encode_chunks(base_header(), 0, 1, [4, 5, 300], kv, 2, 1 << 20)
    data = chunk.SerializeToString()
    wire = parse_chunk(data)
    assert wire.header == chunk.header and bytes(wire.payload) == chunk.payload
    assert wire.payload.obj is data                         # a view, not a copy
    layout = KVLayout(1, 2, 1, 4, torch.float32)
    assert torch.equal(decode_payload(wire.header, wire.payload, layout), kv)
    unknown_field = b"\x18\x07"                              # field 3, varint 7: skipped
    assert parse_chunk(unknown_field + data).header == chunk.header
    assert bytes(parse_chunk(b"").payload) == b""
    for bad in (data[:-1], data[:3], b"\x12\xff", b"\x0b", b"\x12" + b"\xff" * 11):
        with pytest.raises(ValueError):
            parse_chunk(bad)


def test_out_chunk_serializes_as_protobuf_would() -> None:
    """The one-copy serializer of P's chunks gives exactly KVChunk.SerializeToString()
    (strided source: 2 layers, a block range in the middle), header changes made after
    encoding included (num_chunks on the last chunk)."""
    kv = torch.randn(2, 2, 5, 2, 1, 4).to(torch.bfloat16)
    chunks = encode_chunks(base_header(), 0, 2, [9, 8, 7, 6, 5], kv, 0, 2 * 2 * 2 * 2 * 8)
    assert len(chunks) > 1
    chunks[-1].header.num_chunks = len(chunks)
    for c in chunks:
        data = c.SerializeToString()
        assert c.header.crc32c == google_crc32c.value(c.payload) != 0
        assert data == kv_pb2.KVChunk(header=c.header, payload=c.payload).SerializeToString()
        wire = parse_chunk(data)
        assert wire.header == c.header and bytes(wire.payload) == c.payload
