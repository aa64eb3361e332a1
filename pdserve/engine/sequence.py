"""Sequence: one request's state inside an engine (tokens, progress, KV, sampling)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pdserve.sampling.params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"          # queued (new, or preempted for recompute)
    RESERVED = "reserved"        # decode role: blocks reserved, KV not yet complete
    RUNNING = "running"          # in the running batch
    FINISHED = "finished"


# Finish reasons, as the OpenAI API spells them, plus the two pdserve adds.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass
class Sequence:
    """Owned by the engine; the scheduler moves it between queues, the runner reads it.

    Invariant: tokens[:num_computed_tokens] have their K/V in this engine's paged cache.
    A decoding sequence has num_computed_tokens == num_tokens - 1 (its last sampled
    token is fed in the next step)."""
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)        # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0         # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prefill_only: bool = False         # prefill role: finish after the first token
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
