"""Frontend: what the public gRPC and HTTP servers share.

Both servers are thin: they parse their wire format, then hand the same three things to
this class — the prompt (text, token ids or chat messages), the sampling fields, and an
optional deadline — and get back a `GenerateInput` for `Router.generate`, or a
`BadRequest` saying which field is wrong. Every check on client input lives here, so
the two APIs cannot drift apart:

    prompt  -> token ids      (chat template, tokenizer; ids checked against the vocab)
    length  -> prompt fits, and prompt + max_tokens fits max_model_len
    fields  -> SamplingParams (its validate() owns the ranges) + the wire limits below
               (int64 seed, int32 top_k, uint32 token ids) that would otherwise only
               fail deep in the router when the request is turned into a proto.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Sequence

from pdserve.protocol import sampling_params_from_proto
from pdserve.sampling.params import SamplingParams
from pdserve.tokenizer import Tokenizer
from pdserve.v1 import generation_pb2 as pb
from router.core import GenerateInput, Router

logger = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1
_MAX_LABEL = 64
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


class BadRequest(ValueError):
    """A caller mistake. HTTP: `status` (400, 404 unknown model, 413 body too large);
    gRPC: INVALID_ARGUMENT (NOT_FOUND for 404). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


class SlowReader(Exception):
    """A streaming client took no data for Frontend.write_timeout_s."""


async def write_bounded(aw: Awaitable[Any], timeout_s: float) -> Any:
    """One write to a streaming client, given up (SlowReader) after timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):      # no extra task per write
            return await aw
    except TimeoutError:
        raise SlowReader(f"the client took no data for {timeout_s:g} s") from None


@dataclass
class Frontend:
    router: Router
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None      # None: max_model_len - 1 (room for 1 token)
    metrics_registry: Any = None              # prometheus_client.CollectorRegistry | None
    # Unset max_tokens fills the context, but never past this: a client that forgets
    # max_tokens should not hold a sequence slot for minutes.
    max_default_tokens: int = 4096
    vocab_size: int | None = None             # None: the tokenizer's (added tokens included)
    # A streaming client that accepts no bytes for this long (its socket buffers and the
    # server's are full) is dropped and its request cancelled: a stalled reader must not
    # hold a sequence slot, KV blocks and an admission slot for as long as it stays
    # connected.
    write_timeout_s: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_body_bytes < 1 or self.max_default_tokens < 1:
            raise ValueError("max_body_bytes and max_default_tokens must be >= 1")
        if self.write_timeout_s <= 0:
            raise ValueError(f"write_timeout_s must be > 0, got {self.write_timeout_s}")
        if self.api_key == "":
            self.api_key = None

    # -- small shared checks --------------------------------------------------------------
    @property
    def prompt_limit(self) -> int:
        cap = self.max_model_len - 1
        return min(cap, self.max_prompt_tokens) if self.max_prompt_tokens else cap

    @property
    def vocab(self) -> int:
        return self.vocab_size or self.tokenizer.vocab_size

    def healthy(self) -> bool:
        """Serving needs at least one decode worker the router still sends work to."""
        return any(w.view.healthy for w in self.router.decode.values())

    def check_model(self, model: str | None) -> None:
        # Empty means "the deployment's model" (gRPC proto contract; lenient for HTTP).
        if model and model != self.model_name:
            raise BadRequest(f"the model `{model}` does not exist; this server serves "
                             f"`{self.model_name}`", "model", 404, "model_not_found")

    def check_api_key(self, authorization: str | None) -> bool:
        """`Authorization: Bearer <key>` against the configured key (constant time)."""
        if self.api_key is None:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # surrogatepass keeps the encoding one-to-one, so no two tokens compare equal.
        return hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"),
                                   self.api_key.encode("utf-8", "surrogatepass"))

    def deadline_after(self, seconds: float | None, param: str = "timeout") -> float | None:
        """Relative timeout (seconds) -> absolute unix deadline for GenerateInput."""
        if seconds is None:
            return None
        if not math.isfinite(seconds) or seconds <= 0:
            raise BadRequest(f"{param} must be a positive number of seconds, got {seconds}",
                             param)
        return time.time() + seconds

    # -- tokenization ---------------------------------------------------------------------
    def tokenize(self, *, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                 add_special_tokens: bool | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        if (text is None) == (messages is None):
            raise BadRequest("exactly one of text or messages is required", "input")
        if text is not None:
            _utf8(text, "text")
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens
                                         if add_special_tokens is not None else True)
        ids = self._chat_ids(messages, add_generation_prompt)
        if add_special_tokens:
            # The template already wrote the special tokens it wants; "also add them"
            # means what encode() would add to the rendered text, i.e. a leading BOS.
            bos = self.tokenizer.hf.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [int(bos), *ids]
        return ids

    def _chat_ids(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        if isinstance(messages, list):
            for i, m in enumerate(messages):
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    _utf8(m["content"], f"messages[{i}].content")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise BadRequest(str(e), "messages") from e

    def _prompt_ids(self, prompt: str | None, token_ids: Sequence[int] | None,
                    messages: list[dict[str, Any]] | None) -> tuple[list[int], str]:
        given = [n for n, v in (("prompt", prompt), ("token_ids", token_ids),
                                ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise BadRequest("exactly one of prompt, token_ids or messages is required",
                             given[0] if given else "prompt")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string", "prompt")
            _utf8(prompt, "prompt")
            ids = self.tokenizer.encode(prompt) if prompt else []
            if not ids:
                raise BadRequest("prompt must not be empty", "prompt")
            return ids, "prompt"
        if token_ids is not None:
            ids = list(token_ids)
            if not ids:
                raise BadRequest("token_ids must not be empty", "token_ids")
            vocab = self.vocab
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise BadRequest(f"token id {t!r} at position {i} is outside the "
                                     f"vocabulary [0, {vocab})", "token_ids")
            return ids, "token_ids"
        return self._chat_ids(messages), "messages"

    # -- the request ----------------------------------------------------------------------
    def prepare(self, *, prompt: str | None = None, token_ids: Sequence[int] | None = None,
                messages: list[dict[str, Any]] | None = None,
                sampling: dict[str, Any] | pb.SamplingParams | None = None,
                default_max_tokens: int | None = None, client_label: str = "",
                deadline: float | None = None) -> GenerateInput:
        """One of prompt / token_ids / messages plus the sampling fields -> GenerateInput.

        `sampling` is either SamplingParams keyword arguments (None values = unset) or
        the proto message. An unset max_tokens becomes min(what still fits the context,
        default_max_tokens or max_default_tokens); an explicit one that does not fit is
        an error, never silently clipped."""
        ids, param = self._prompt_ids(prompt, token_ids, messages)
        n = len(ids)
        if n > self.prompt_limit:
            raise BadRequest(f"the prompt is {n} tokens long; this model accepts at most "
                             f"{self.prompt_limit} prompt tokens (context length "
                             f"{self.max_model_len})", param, code="context_length_exceeded")
        room = self.max_model_len - n
        default = min(room, default_max_tokens or self.max_default_tokens)
        params, explicit = self._params(sampling, default)
        if explicit and n + params.max_tokens > self.max_model_len:
            raise BadRequest(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"the request asks for {n + params.max_tokens} ({n} prompt tokens + "
                f"max_tokens {params.max_tokens}); reduce the prompt or max_tokens "
                f"(at most {room} here)", "max_tokens", code="context_length_exceeded")
        self._check_wire_limits(params)
        return GenerateInput(ids, params, client_label[:_MAX_LABEL], deadline)

    def _params(self, sampling: dict[str, Any] | pb.SamplingParams | None,
                default: int) -> tuple[SamplingParams, bool]:
        try:
            if sampling is None:
                return SamplingParams(max_tokens=default), False
            if isinstance(sampling, pb.SamplingParams):
                return (sampling_params_from_proto(sampling, default),
                        sampling.HasField("max_tokens"))
            kw = {k: v for k, v in sampling.items() if v is not None}
            unknown = set(kw) - _SAMPLING_FIELDS
            if unknown:
                raise BadRequest(f"unknown sampling field(s): {sorted(unknown)}",
                                 sorted(unknown)[0])
            stop = kw.get("stop", ())
            for s in [stop] if isinstance(stop, str) else stop:
                if isinstance(s, str):
                    _utf8(s, "stop")
            explicit = "max_tokens" in kw
            kw.setdefault("max_tokens", default)
            return SamplingParams(**kw), explicit
        except (ValueError, TypeError) as e:
            if isinstance(e, BadRequest):
                raise
            msg = str(e).removeprefix("invalid sampling parameters: ")
            raise BadRequest(f"invalid sampling parameters: {msg}", _field_of(msg)) from e

    def _check_wire_limits(self, p: SamplingParams) -> None:
        if p.seed is not None and not _INT64_MIN <= p.seed <= _INT64_MAX:
            raise BadRequest("seed must fit in a signed 64-bit integer", "seed")
        if p.top_k > _INT32_MAX:
            raise BadRequest(f"top_k must be at most {_INT32_MAX}", "top_k")
        vocab = self.vocab
        for t in p.stop_token_ids:
            if t >= vocab:
                raise BadRequest(f"stop token id {t} is outside the vocabulary [0, {vocab})",
                                 "stop_token_ids")


def _utf8(text: str, param: str) -> None:
    # JSON and proto strings can carry lone surrogates ("\ud800"); the tokenizer (Rust)
    # would fail on them with an opaque error, so reject them here with the field name.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{param} is not valid UTF-8 (lone surrogate)", param) from None


def _field_of(message: str) -> str | None:
    """SamplingParams messages start with the field name ("top_p must be ...")."""
    word = message.split(" ", 1)[0].strip(",:")
    if word in _SAMPLING_FIELDS:
        return word
    if message.startswith(("at most", "each stop")):
        return "stop"
    return None
