"""Build a CausalLM from a Hugging Face directory and stream its safetensors weights in.

The model is built on the meta device (no memory, no random init), materialized empty
on the target device in the target dtype, then filled tensor by tensor straight from the
checkpoint files, so peak host memory is about one tensor, not one model. Tensors load
under their Hugging Face names; the q/k/v and gate/up projections are fused afterwards
(`CausalLM.fuse_projections`, see pdserve/model/llama.py).

Accepted layouts:
    model.safetensors                               one file
    model.safetensors.index.json + shards           {"weight_map": {name: shard file}}
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve import env
from pdserve.config import ModelConfig
from pdserve.model.llama import AttentionOps, CausalLM

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Checkpoint tensors that are derived buffers, not weights: skipped quietly.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None, Path]:
    """The safetensors files to read, the index's name -> file map (None for one file),
    and the file to name in errors about the checkpoint as a whole."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if index.is_file():
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (need a 'weight_map'): {e}") from e
        where = {name: model_dir / shard for name, shard in weight_map.items()}
        files = sorted(set(where.values()))
        for shard in files:
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {index} does not exist")
        return files, where, index
    if single.is_file():
        return [single], None, single
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} "
                            "(only safetensors checkpoints are supported)")


def _open(path: Path) -> safe_open:  # a context manager
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path}: cannot read safetensors file: {e}") from e


def _progress_disabled() -> bool:
    return env.no_progress() or not sys.stderr.isatty()


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               ops: AttentionOps) -> CausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    config = ModelConfig.from_dir(model_dir)
    files, where, ckpt = checkpoint_files(model_dir)
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        logger.warning("%s: sliding_window=%d is not implemented (full attention is used); "
                       "outputs differ from the reference beyond %d tokens of context",
                       model_dir, config.sliding_window, config.sliding_window)
    device = torch.device(device)

    with torch.device("meta"):
        model = CausalLM(config, ops)
    # .to(dtype) on meta is free; to_empty then allocates each tensor once, uninitialized.
    model = model.to(dtype=dtype).to_empty(device=device)
    model.model.rotary_emb.reset_cache()
    model.eval().requires_grad_(False)

    params = dict(model.state_dict())  # name -> tensor sharing the parameter's storage
    if config.tie_word_embeddings:
        logger.debug("tie_word_embeddings: lm_head uses model.embed_tokens.weight")
    loaded = _stream_weights(files, params, tied=config.tie_word_embeddings)
    missing = sorted(set(params) - loaded)
    if missing:
        name = missing[0]
        source = where.get(name, ckpt) if where is not None else ckpt
        raise ValueError(f"tensor {name!r} missing from checkpoint {source} "
                         f"(expected shape {tuple(params[name].shape)}; "
                         f"{len(missing)} missing in all: {missing[:5]})")
    # Drop our references to the separate q/k/v and gate/up tensors first, so fusing frees
    # each layer's originals as it goes (peak: one layer's projections, not the model's).
    del params
    model.fuse_projections()
    logger.info("loaded %s (%s, %d layers) from %s as %s on %s", config.architecture,
                config.family, config.num_hidden_layers, model_dir, dtype, device)
    return model


def _stream_weights(files: list[Path], params: dict[str, torch.Tensor], tied: bool) -> set[str]:
    """Copy every known tensor of every file into its parameter (cast and moved by copy_).
    Shapes are checked from the header before a tensor is read. Returns the names loaded."""
    total = 0
    for path in files:
        with _open(path) as f:
            total += len(list(f.keys()))
    loaded: set[str] = set()
    unexpected: list[str] = []
    with tqdm(total=total, desc="loading weights", unit="tensor",
              disable=_progress_disabled()) as bar:
        for path in files:
            with _open(path) as f:
                for name in f.keys():
                    bar.update(1)
                    target = params.get(name)
                    if target is None:
                        if name == "lm_head.weight" and tied:
                            logger.debug("%s: ignoring lm_head.weight (tied to embed_tokens)", path)
                        elif name.endswith(_DERIVED_SUFFIXES):
                            logger.debug("%s: ignoring derived tensor %s", path, name)
                        else:
                            unexpected.append(name)
                        continue
                    got = tuple(f.get_slice(name).get_shape())
                    if got != tuple(target.shape):
                        raise ValueError(f"tensor {name!r} in {path} has shape {got}, "
                                         f"expected {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(f.get_tensor(name))
                    loaded.add(name)
    if unexpected:
        # Usually harmless extras; a feature this model code lacks (e.g. mlp_bias) also
        # shows up here, hence a warning rather than debug.
        logger.warning("ignored %d checkpoint tensors the model does not use: %s",
                       len(unexpected), unexpected[:5])
    return loaded
