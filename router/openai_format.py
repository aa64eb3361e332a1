"""The OpenAI wire format: request bodies (size limit, UTF-8, JSON, strict pydantic
models) and response objects (completions, chat completions, their SSE chunks, usage,
logprobs).

Kept apart from http_server.py so the server stays a thin layer of routes and error
mapping; nothing here touches the router.
"""
from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from router.frontend import BadRequest

if TYPE_CHECKING:
    from pdserve.engine.llm_engine import TokenLogprob
    from pdserve.llm import Usage
    from router.core import Delta
    from router.frontend import Frontend

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
                  "min_tokens", "skip_special_tokens")
_LOGPROB_FLOOR = -9999.0   # -inf is not JSON; clients treat this as "impossible"


class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not a bool (a wrong type is a 400, never a
    # silent coercion). Unknown fields are ignored: OpenAI clients send extras.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """SamplingParams keyword arguments; None = unset (the engine default)."""
        kw = {k: getattr(self, k) for k in _SAMPLING_KEYS}
        kw.update(max_tokens=max_tokens, logprobs=logprobs)
        return kw


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != 1:
            raise BadRequest("best_of must be 1", "best_of")

    def single_prompt(self) -> tuple[str | None, list[int] | None]:
        """(text, None) or (None, token ids). A one-element batch is taken as its
        element; a real batch is refused (one request, one stream, one outcome)."""
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise BadRequest("batch prompts are not supported; send one prompt per "
                                 "request", "prompt")
            p = p[0]
        return (p, None) if isinstance(p, str) else (None, list(p))  # type: ignore[arg-type]


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.tools:
            raise BadRequest("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise BadRequest("only response_format {\"type\": \"text\"} is supported",
                             "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages -> the {role, content} dicts the chat template takes."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"messages[{i}].content[{j}]: only text parts are "
                                     "supported", f"messages[{i}].content")
                texts.append(part.text)
            content = "\n".join(texts)
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


def usage_dict(u: Usage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class Renderer:
    """Builds the response objects of one request (chat or completion)."""

    def __init__(self, fe: Frontend, chat: bool, logprobs: int | None,
                 include_usage: bool) -> None:
        self.tok = fe.tokenizer
        self.model = fe.model_name
        self.chat = chat
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self.id = ""
        self._text_offset = 0      # completions logprobs: offset of the next token

    def set_id(self, request_id: str) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id

    def _obj(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def start_chunks(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        obj = self._obj(True, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])
        if self.include_usage:
            obj["usage"] = None
        return [obj]

    def chunk(self, d: Delta) -> dict[str, Any] | None:
        if not (d.text or d.finish_reason or (self.logprobs is not None and d.token_ids)):
            return None          # e.g. half a UTF-8 character: nothing to show yet
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": d.text} if d.text else {}
        else:
            choice["text"] = d.text
        choice["logprobs"] = self._logprobs(d.logprobs or [])
        choice["finish_reason"] = d.finish_reason
        if d.finish_reason:
            choice["stop_reason"] = d.stop_reason
        obj = self._obj(True, [choice])
        if self.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        obj = self._obj(True, [])
        obj["usage"] = usage_dict(usage)
        return obj

    def full(self, text: str, lps: list[TokenLogprob], last: Delta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=self._logprobs(lps), finish_reason=last.finish_reason,
                      stop_reason=last.stop_reason)
        obj = self._obj(False, [choice])
        obj["usage"] = usage_dict(last.usage)
        return obj

    # -- logprobs -------------------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in lps]}
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            s = self._token(lp.token_id)
            tokens.append(s)
            token_lps.append(_finite(lp.logprob))
            tops.append({self._token(t): _finite(v) for t, v in lp.top[:self.logprobs]})
            offsets.append(self._text_offset)
            self._text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        s = self._token(lp.token_id)
        top = []
        for t, v in lp.top[:self.logprobs]:
            ts = self._token(t)
            top.append({"token": ts, "logprob": _finite(v), "bytes": list(ts.encode())})
        return {"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode()),
                "top_logprobs": top}


def _finite(v: float) -> float:
    return max(float(v), _LOGPROB_FLOOR) if not math.isnan(v) else _LOGPROB_FLOOR


# -- request parsing ----------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    too_large = BadRequest(f"request body is larger than {limit} bytes", None, 413,
                           "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_large
    try:
        text = bytes(buf).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (bad byte at offset {e.start})",
                         code="invalid_utf8") from None
    if not text.strip():
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                         code="invalid_json") from None
    except (ValueError, RecursionError) as e:   # huge integers, absurd nesting
        raise BadRequest(f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        raise BadRequest(describe_error(err), error_param(err["loc"])) from None


def error_param(loc: tuple) -> str | None:
    # Drop pydantic's union-member tags ("str", "list[int]") from the location.
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p.isidentifier() and p not in ("str", "int", "float", "bool", "list", "dict"):
            parts.append(("." if parts else "") + p)
    return "".join(parts) or None


def describe_error(err: dict[str, Any]) -> str:
    where = error_param(err["loc"])
    if err["type"] == "missing":
        return f"`{where}` is required"
    return f"invalid `{where}`: {err['msg']}" if where else err["msg"]
