"""TextStream: one sequence's detokenizer plus its stop rules, one sampled token at a time.

How this works. Each step first checks the token itself (stop_token_ids, eos unless
ignore_eos); a stopping token's text is never added. Otherwise the token goes through
the incremental detokenizer and the new text is appended to `_text`, which holds

    _text:  [ emitted (sent to the client) | pending (held back) ]

A stop string can straddle tokens, so the search covers the new text plus the last
len(stop) - 1 characters before it. On a match the text is cut at the match start (the
stop string and anything after it are dropped). Without a match, the longest suffix of
the pending text that is a proper prefix of some stop string stays pending (it may yet
become a stop string); the rest is emitted. Invariant: no emitted character can belong to
a later stop-string match, so a match always starts at or after the emitted boundary.
At finish ('stop' by token, or 'length') the pending text is flushed: it can no longer
become a stop string.

Like vLLM, no stop rule (token or string) applies before min_tokens tokens; only the
length limit does.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pdserve.sampling.params import SamplingParams
from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StepText:
    delta: str                          # new text safe to send (may be empty)
    finish_reason: FinishReason | None  # set on the sequence's last step


class TextStream:
    """Stateful per sequence; owned by whoever turns sampled tokens into responses."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams,
                 prompt_token_ids: Sequence[int],
                 eos_token_ids: Sequence[int] | None = None) -> None:
        self.params = params
        self._eos = frozenset(tokenizer.eos_token_ids if eos_token_ids is None
                              else (int(t) for t in eos_token_ids))
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = params.stop
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                             skip_special_tokens=params.skip_special_tokens)
        self._text = ""
        self._emitted = 0                    # len of the prefix of _text already sent
        self.num_output_tokens = 0
        self.finish_reason: FinishReason | None = None
        # The matched stop string or stop token id; None for eos, length, or not finished.
        self.stop_reason: str | int | None = None
        self._accepted: int | None = None    # accept()ed, not yet detokenize()d

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Output text sent so far; after the last step, the final output text."""
        return self._text[:self._emitted]

    def step(self, token_id: int) -> StepText:
        stopped = self.accept(token_id)
        return stopped if stopped is not None else self.detokenize()

    # step() in two halves, for an engine that detokenizes while the next step runs:
    # accept() applies the rules that need only the token id; detokenize() adds its text
    # and applies the rest. Where no stop string is set (needs_text_to_stop is False),
    # whether the sequence ends is known after accept(): `stopped` or reaches_length.

    @property
    def needs_text_to_stop(self) -> bool:
        """A stop rule reads the text (stop strings): detokenize before the next step."""
        return bool(self._stops)

    @property
    def reaches_length(self) -> bool:
        """The accepted tokens reach max_tokens (detokenize() will finish with 'length',
        unless a stop string matches first)."""
        return self.num_output_tokens >= self.params.max_tokens

    def accept(self, token_id: int) -> StepText | None:
        """Count the token and apply stop_token_ids and eos. Returns the last StepText if
        the token ends the sequence (its text is never added); None if the token now
        waits for detokenize()."""
        if self.finished:
            raise ValueError(f"sequence already finished ({self.finish_reason}); "
                             "no more tokens may be added")
        if self._accepted is not None:
            raise ValueError("the previous token was accepted but not detokenized")
        self.num_output_tokens += 1
        may_stop = self.num_output_tokens > self.params.min_tokens
        if may_stop and token_id in self._stop_ids:
            return self._finish("stop", token_id)
        if may_stop and token_id in self._eos and not self.params.ignore_eos:
            return self._finish("stop", None)
        self._accepted = token_id
        return None

    def detokenize(self) -> StepText:
        """Add the accepted token's text; apply stop strings and max_tokens."""
        token_id, self._accepted = self._accepted, None
        if token_id is None:
            raise ValueError("no accepted token waits for detokenize()")
        new = self._detok.add(token_id)
        if new:
            start = len(self._text)
            self._text += new
            if self.num_output_tokens > self.params.min_tokens and self._stops:
                match = _find_stop(self._text, start, self._stops)
                if match is not None:
                    pos, stop = match
                    assert pos >= self._emitted, (pos, self._emitted)
                    self._text = self._text[:pos]
                    return self._finish("stop", stop)
        if self.reaches_length:
            return self._finish("length", None)
        hold = _held_back(self._text, self._emitted, self._stops)
        return StepText(self._take(len(self._text) - hold), None)

    def finish_now(self, reason: FinishReason) -> StepText:
        """End the sequence for a reason found outside the stream (the engine's context
        length): flush the text held back for a possible stop string."""
        if self.finished:
            return StepText("", self.finish_reason)
        return self._finish(reason, None)

    def _finish(self, reason: FinishReason, stop_reason: str | int | None) -> StepText:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return StepText(self._take(len(self._text)), reason)

    def _take(self, end: int) -> str:
        """Emit _text[_emitted:end]."""
        delta = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta


def _find_stop(text: str, new_start: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop-string match that ends inside text[new_start:], as (start, stop).

    Matches ending before new_start were looked for on earlier steps."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, max(0, new_start - len(stop) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


def _held_back(text: str, emitted: int, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text[emitted:] that is a proper prefix of a stop."""
    hold = 0
    for stop in stops:
        # Candidate suffixes start at an occurrence of stop[0] within the last len(stop)-1
        # characters; the first candidate that is a prefix of stop is the longest.
        lo = max(emitted, len(text) - len(stop) + 1)
        i = text.find(stop[0], lo)
        while i != -1:
            if stop.startswith(text[i:]):
                hold = max(hold, len(text) - i)
                break
            i = text.find(stop[0], i + 1)
    return hold
