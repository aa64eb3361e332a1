"""pdserve.protocol: proto SamplingParams <-> engine SamplingParams, finish/stop reasons."""
from __future__ import annotations

import math

import pytest

from pdserve.protocol import (finish_reason_from_proto, finish_reason_to_proto,
                              sampling_params_from_proto, sampling_params_to_proto,
                              stop_reason_to_proto)
from pdserve.sampling.params import SamplingParams
from pdserve.v1 import generation_pb2 as pb


def test_unset_fields_take_the_engine_defaults():
    got = sampling_params_from_proto(pb.SamplingParams(), max_tokens_default=123)
    assert got == SamplingParams(max_tokens=123)
    assert got.temperature == 1.0 and got.top_p == 1.0 and got.repetition_penalty == 1.0
    assert got.seed is None and got.logprobs is None and got.skip_special_tokens is True
    assert sampling_params_from_proto(None, max_tokens_default=7) == SamplingParams(max_tokens=7)


def test_explicit_zeros_differ_from_unset():
    got = sampling_params_from_proto(
        pb.SamplingParams(temperature=0.0, seed=0, logprobs=0, skip_special_tokens=False),
        max_tokens_default=16)
    assert got.greedy and got.temperature == 0.0
    assert got.seed == 0 and got.logprobs == 0 and got.skip_special_tokens is False


def test_every_field_is_carried():
    msg = pb.SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                            seed=1234, stop=["\n\n", "END"], stop_token_ids=[2, 7],
                            repetition_penalty=1.1, presence_penalty=-0.5,
                            frequency_penalty=1.5, ignore_eos=True, min_tokens=3, logprobs=5,
                            skip_special_tokens=False)
    got = sampling_params_from_proto(msg, max_tokens_default=16)
    assert got == SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40,
                                 min_p=0.05, seed=1234, stop=("\n\n", "END"),
                                 stop_token_ids=(2, 7), repetition_penalty=1.1,
                                 presence_penalty=-0.5, frequency_penalty=1.5, ignore_eos=True,
                                 min_tokens=3, logprobs=5, skip_special_tokens=False)
    assert sampling_params_to_proto(got) == msg


def test_top_k_minus_one_means_off():
    assert sampling_params_from_proto(pb.SamplingParams(top_k=-1), 16).top_k == 0


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_tokens=1, temperature=0.0),
    SamplingParams(max_tokens=512, temperature=0.3, top_p=0.95, top_k=50, min_p=0.1,
                   seed=-7, stop=["</s>"], stop_token_ids=[0], repetition_penalty=0.8,
                   presence_penalty=2.0, frequency_penalty=-2.0, ignore_eos=True,
                   min_tokens=512, logprobs=20, skip_special_tokens=False),
])
@pytest.mark.parametrize("default", [1, 16, 4096])
def test_roundtrip_through_the_wire(params, default):
    wire = pb.SamplingParams.FromString(sampling_params_to_proto(params).SerializeToString())
    assert sampling_params_from_proto(wire, max_tokens_default=default) == params


@pytest.mark.parametrize("fields, word", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(min_tokens=17), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x" * 257]), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
])
def test_invalid_values_raise_a_user_facing_value_error(fields, word):
    with pytest.raises(ValueError, match=word) as info:
        sampling_params_from_proto(pb.SamplingParams(**fields), max_tokens_default=16)
    assert str(info.value).startswith("invalid sampling parameters: ")


def test_min_tokens_is_checked_against_the_default_max_tokens():
    assert sampling_params_from_proto(pb.SamplingParams(min_tokens=16), 16).min_tokens == 16
    with pytest.raises(ValueError, match="min_tokens"):
        sampling_params_from_proto(pb.SamplingParams(min_tokens=17), 16)


def test_finish_reasons():
    for name, value in (("stop", pb.FINISH_REASON_STOP), ("length", pb.FINISH_REASON_LENGTH),
                        ("abort", pb.FINISH_REASON_ABORT), ("error", pb.FINISH_REASON_ERROR)):
        assert finish_reason_to_proto(name) == value
        assert finish_reason_from_proto(value) == name
    assert finish_reason_to_proto(None) == pb.FINISH_REASON_UNSPECIFIED
    assert finish_reason_from_proto(pb.FINISH_REASON_UNSPECIFIED) is None
    with pytest.raises(ValueError):
        finish_reason_to_proto("bogus")
    with pytest.raises(ValueError):
        finish_reason_from_proto(99)


def test_stop_reasons():
    assert stop_reason_to_proto(None) == ("", None)
    assert stop_reason_to_proto("\n\n") == ("\n\n", None)
    assert stop_reason_to_proto(128009) == ("", 128009)
