"""Conversions between the wire protos (pdserve.v1) and the engine's Python types.

The proto SamplingParams marks with proto3 `optional` the fields whose "unset" differs
from zero (temperature 0 is greedy; an unset temperature is 1.0). These helpers are the
one place that knows the defaults of unset fields; the ranges live in
pdserve.sampling.params.SamplingParams.validate().
"""
from __future__ import annotations

from pdserve.sampling.params import SamplingParams
from pdserve.v1 import generation_pb2 as pb

# Engine finish reasons (pdserve.engine.sequence.FINISH_*) <-> the proto enum.
_FINISH_TO_PROTO = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def sampling_params_from_proto(msg: pb.SamplingParams | None,
                               max_tokens_default: int) -> SamplingParams:
    """Builds the engine's SamplingParams from a request's proto.

    Unset optional fields take the engine defaults; an unset max_tokens takes
    `max_tokens_default` (the router's choice, e.g. what still fits the context).
    Raises ValueError with a message fit for the client (the caller maps it to
    INVALID_ARGUMENT / HTTP 400). A missing message (None) means all defaults.
    """
    if msg is None:
        msg = pb.SamplingParams()
    try:
        return SamplingParams(
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else int(max_tokens_default),
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=msg.top_k,
            min_p=msg.min_p,
            seed=msg.seed if msg.HasField("seed") else None,
            repetition_penalty=(msg.repetition_penalty if msg.HasField("repetition_penalty")
                                else 1.0),
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            min_tokens=msg.min_tokens,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
            skip_special_tokens=(msg.skip_special_tokens if msg.HasField("skip_special_tokens")
                                 else True),
        )
    except ValueError as e:
        raise ValueError(f"invalid sampling parameters: {e}") from e


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The inverse: every field explicit, so that
    sampling_params_from_proto(sampling_params_to_proto(p), d) == p for any default d."""
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        skip_special_tokens=params.skip_special_tokens,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def finish_reason_to_proto(reason: str | None) -> int:
    """Engine finish reason ("stop", "length", "abort", "error", None) -> pb.FinishReason."""
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    try:
        return _FINISH_TO_PROTO[reason]
    except KeyError:
        raise ValueError(f"unknown finish reason {reason!r}") from None


def finish_reason_from_proto(value: int) -> str | None:
    """pb.FinishReason -> engine finish reason; UNSPECIFIED -> None (not finished)."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return _FINISH_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown FinishReason value {value}") from None


def stop_reason_to_proto(stop_reason: int | str | None) -> tuple[str, int | None]:
    """Engine stop_reason (a matched stop string, a stop token id, or None) -> the
    proto's (stop_reason, stop_token_id) pair; the caller sets stop_token_id only when
    it is not None (it is a proto3 optional)."""
    if stop_reason is None:
        return "", None
    if isinstance(stop_reason, int) and not isinstance(stop_reason, bool):
        return "", stop_reason
    return str(stop_reason), None
