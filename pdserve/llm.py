"""The offline Python API: ``LLM(model).generate(prompts, params)`` and ``LLM.chat``."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence as Seq

from tqdm.auto import tqdm

from pdserve import env
from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine, TokenLogprob
from pdserve.sampling.params import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    usage: Usage
    logprobs: list[TokenLogprob] | None = field(default=None)


def resolve_model_dir(model: str | Path | None) -> str:
    """--model, else $PDSERVE_MODEL, else the embedded default (prepared on first use)."""
    if model:
        return str(model)
    if env.default_model_env():
        return env.default_model_env()
    from pdserve.default_model import prepare_default_model
    return str(prepare_default_model())


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto",
                 device: str = "auto", block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory_gb: float = 1.0, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, seed: int = 0,
                 overlap_detokenize: bool | None = None, look_ahead: bool = False,
                 kv_layout: str = "auto") -> None:
        config = EngineConfig(
            model=resolve_model_dir(model), dtype=dtype, device=device, seed=seed,
            overlap_detokenize=overlap_detokenize, look_ahead=look_ahead,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              memory_gb=kv_cache_memory_gb,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_layout=kv_layout),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len))
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationOutput]:
        """Prompts are texts (tokenized with special tokens) or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                       for p in prompts]
        return self._run(token_lists, params, use_tqdm)

    def chat(self, messages: Seq[dict] | Seq[Seq[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[GenerationOutput]:
        """One conversation (a list of {role, content}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.tokenizer.apply_chat_template(list(c)) for c in convs]
        return self._run(token_lists, params, use_tqdm)

    def _run(self, token_lists: list[list[int]],
             params: SamplingParams | Seq[SamplingParams] | None,
             use_tqdm: bool) -> list[GenerationOutput]:
        if params is None:
            params = SamplingParams()
        plist = list(params) if not isinstance(params, SamplingParams) else [params] * len(token_lists)
        if len(plist) != len(token_lists):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(token_lists)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        for rid, toks, p in zip(ids, token_lists, plist):
            self.engine.add_request(rid, toks, p)
        acc: dict[str, dict] = {rid: {"ids": [], "text": [], "lps": []} for rid in ids}
        done: dict[str, GenerationOutput] = {}
        bar = tqdm(total=len(ids), disable=not use_tqdm or env.no_progress(), unit="req")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    a = acc[out.request_id]
                    a["ids"].extend(out.new_token_ids)
                    a["text"].append(out.new_text)
                    if out.new_logprobs:
                        a["lps"].extend(out.new_logprobs)
                    if out.finished:
                        done[out.request_id] = GenerationOutput(
                            request_id=out.request_id,
                            prompt_token_ids=token_lists[ids.index(out.request_id)],
                            text="".join(a["text"]), token_ids=a["ids"],
                            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                            usage=Usage(out.num_prompt_tokens, out.num_output_tokens,
                                        out.num_cached_tokens),
                            logprobs=a["lps"] or None)
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]
