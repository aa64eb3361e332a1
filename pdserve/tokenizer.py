"""Tokenizer (a thin wrapper over a local Hugging Face tokenizer) and incremental detokenizer.

IncrementalDetokenizer: how this works. Decoding token i alone is wrong in general: a
SentencePiece token drops its leading space when decoded at the start of a string, and a
byte-level BPE token may hold half of a UTF-8 character. So each step decodes two short
windows of the token list,

    tokens:  ... | prefix_offset ........ read_offset ........ | new token
                   [------- prefix_text -------]
                   [----------------- full_text -------------------------]

and emits full_text[len(prefix_text):]. If full_text ends in U+FFFD the last character is
an incomplete multi-byte sequence: emit only the text before it and keep the offsets, so
the next token re-decodes that character whole. Otherwise slide the window:
prefix_offset <- read_offset, read_offset <- len(tokens). The window stays a few tokens
wide, so each step costs O(1) decode work, not a re-decode of the whole output.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Prompt tokens kept as left context for the first output token (enough for any
# tokenizer's leading-space / merge behaviour to settle).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A Hugging Face tokenizer loaded from a local model directory (never downloads)."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory does not exist: {path}")
        try:
            self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
        self.model_dir = path
        # Fast tokenizers: decode straight through the Rust tokenizer. With no clean-up
        # of spaces that is exactly what transformers' decode returns, minus ~15 us of
        # argument handling per call, and the incremental detokenizer calls it twice per
        # generated token (several ms a step at 128 sequences).
        self._backend = getattr(self.hf, "backend_tokenizer", None) if self.hf.is_fast else None
        self.eos_token_ids: tuple[int, ...] = _collect_eos_ids(self.hf, path)
        if not self.eos_token_ids:
            logger.warning("tokenizer in %s defines no eos token; only stop rules end sequences",
                           path)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included.

        May be smaller than the model's logits width (heads are often padded)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of tokenization spaces, here and in the incremental detokenizer, so a
        # streamed response concatenates to exactly the non-streamed one.
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)
        assert isinstance(text, str), type(text)  # a flat id list decodes to one string
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the model's chat template and tokenize the result."""
        _validate_messages(messages)
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(f"the model in {self.model_dir} has no chat template; "
                             "send a plain prompt instead of chat messages")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 errors (raise_exception in templates, bad fields)
            raise ValueError(f"chat template failed on these messages: {e}") from e
        assert isinstance(text, str), type(text)
        # The template already writes any BOS it wants; adding special tokens would double it.
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas that are never broken UTF-8."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Only the prompt's tail is needed as context; the list then grows with the output.
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._tokens: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        # len(decode(tokens[prefix_offset:read_offset])): context text, never emitted.
        self._prefix_len = len(self._decode(context))
        # Characters of decode(tokens[prefix_offset:]) already emitted or context;
        # >= _prefix_len, and > it while a complete text precedes an incomplete character.
        self._window_emitted = self._prefix_len
        self._text_parts: list[str] = []

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self._num_context:]

    @property
    def text(self) -> str:
        """All output text emitted so far (held-back incomplete characters excluded)."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def add(self, token_id: int) -> str:
        """Append one token, return the newly completed text (possibly empty)."""
        self._tokens.append(int(token_id))
        full_text = self._decode(self._tokens[self._prefix_offset:])
        # A trailing run of U+FFFD is (part of) an incomplete character: everything before
        # it is final, so emit that much now. Holding the whole token back instead (the
        # textbook rule) can hold text forever when every token ends mid-character, as
        # byte-level BPE merges across CJK characters do.
        end = len(full_text)
        while end > self._window_emitted and full_text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        delta = full_text[self._window_emitted:end]
        self._window_emitted = max(self._window_emitted, end)
        if len(full_text) > self._prefix_len and not full_text.endswith(_REPLACEMENT_CHAR):
            # The window ends on a character boundary: slide it so it stays a few tokens.
            # (A token with no text, e.g. a skipped special token, keeps the window so the
            # next token still decodes with real left context.)
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self._prefix_len = len(self._decode(self._tokens[self._prefix_offset:]))
            self._window_emitted = self._prefix_len
        if delta:
            self._text_parts.append(delta)
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, "
                             f"got {role!r}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


def _collect_eos_ids(hf: PreTrainedTokenizerBase, path: Path) -> tuple[int, ...]:
    """Union of the tokenizer's eos and eos_token_id in config.json / generation_config.json.

    Chat models often end turns with a token (e.g. <|eot_id|>) that only the generation
    config lists, so the tokenizer's eos alone would run past the end of a reply."""
    ids: set[int] = set()
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("ignoring unreadable %s: %s", f, e)
            continue
        eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(t) for t in eos if isinstance(t, int))
    return tuple(sorted(ids))


def write_byte_level_bpe(path: str | Path, text: str, vocab_size: int = 300,
                         eos_token: str = "<|eos|>") -> None:
    """Train a small byte-level BPE on `text` and save it into `path` as Hugging Face
    tokenizer files: a tokenizer for random-weight models (the GPU tests and benchmarks,
    which have no model files and no network). Every byte stays encodable."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 8, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token).save_pretrained(str(path))
