from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
TEXTS = ["hello world", "café crème brûlée", "日本語のテキスト 日本",
         "emoji 😀 and 🎉 party", "the quick brown fox jumps"]
SAMPLES = ["café 日本 😀", "🚀 rocket ünïcödé 日本語", "hello world", "a😀b🎉c 🚀🚀 é", "x"]


def save_tiny_tokenizer(path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A real byte-level BPE (small vocab, so rare characters split across tokens)."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(TEXTS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>")
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_encode_decode_roundtrip(tok):
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(tok.hf) == 320
    assert tok.eos_token_ids == (tok.hf.eos_token_id,)


def test_eos_ids_union_of_tokenizer_and_configs(tmp_path):
    path = save_tiny_tokenizer(tmp_path)
    (path / "config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer(path).eos_token_ids == (1, 5, 7)


def test_missing_dir_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tmp_path / "nope")


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "日本?"}]
    ids = tok.apply_chat_template(msgs)
    bos = tok.hf.convert_tokens_to_ids("<|bos|>")
    assert ids[0] == bos and ids.count(bos) == 2   # the template's BOS only, not doubled
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|bos|>system: be brief\n<|bos|>user: 日本?\nassistant:")
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert tok.decode(no_prompt).endswith("日本?\n")


@pytest.mark.parametrize("msgs, match", [
    ([], "non-empty"),
    ("hi", "non-empty"),
    (["hi"], "must be an object"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": ["x"]}], "content"),
])
def test_chat_template_rejects_malformed_messages(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(msgs)


def test_no_chat_template_is_value_error(tmp_path):
    plain = Tokenizer(save_tiny_tokenizer(tmp_path, chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


# -- incremental detokenization ------------------------------------------------------------

def stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in ids]
    assert detok.text == "".join(deltas)
    assert detok.output_token_ids == ids
    return deltas


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("prompt", ["", "日本 prompt 😀", "hello"])
def test_deltas_concatenate_to_full_decode(tok, text, prompt):
    ids = tok.encode(text)
    deltas = stream(tok, tok.encode(prompt), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_split_character_is_held_back_until_complete(tok):
    ids = tok.encode("a🚀")
    assert len(ids) >= 3                      # 'a' plus the rocket's bytes over several tokens
    deltas = stream(tok, [], ids)
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])
    assert deltas[-1] == "🚀"


def test_tokens_straddling_characters_emit_each_completed_character(tok):
    # This BPE merges bytes across character boundaries: every token of "のテキスト" but
    # the last ends mid-character, so "hold the token until the text ends cleanly" would
    # hold everything to the end. Completed characters must come out as they complete.
    ids = tok.encode("のテキスト")
    pieces = [tok.decode([i]) for i in ids]
    assert sum(p.endswith("\ufffd") for p in pieces) >= 3
    deltas = stream(tok, [], ids)
    assert "".join(deltas) == "のテキスト"
    assert sum(1 for d in deltas if d) >= 4


def test_special_tokens_skipped_or_shown(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("hello") + [eos] + tok.encode(" world")
    assert "".join(stream(tok, [], ids)) == "hello world" == tok.decode(ids)
    shown = "".join(stream(tok, [], ids, skip=False))
    assert shown == "hello<|eos|> world" == tok.decode(ids, skip_special_tokens=False)


def test_decode_window_stays_small(tok):
    """Each step decodes a few tokens, not the whole output."""
    seen: list[int] = []
    real_decode = tok.decode

    def spy(ids, skip_special_tokens=True):
        seen.append(len(ids))
        return real_decode(ids, skip_special_tokens)

    ids = tok.encode(" ".join(SAMPLES) * 20)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    tok.decode = spy  # instance attribute shadows the method for this test only
    try:
        text = "".join(detok.add(t) for t in ids)
    finally:
        del tok.decode
    assert text == tok.decode(ids)
    assert len(ids) > 200 and max(seen) <= 10


@pytest.mark.parametrize("which", ["tiny", "default_model"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_fast_decode_equals_transformers_decode(tok, default_model_dir, which, skip_special):
    """Tokenizer.decode goes straight to the Rust tokenizer; it must give what
    transformers' decode (no space clean-up) gives, special tokens and split
    characters included."""
    if which == "default_model":
        tok = Tokenizer(default_model_dir)
    assert tok._backend is not None  # both are fast tokenizers
    g = random.Random(3)
    vocab = tok.vocab_size
    specials = list(tok.hf.all_special_ids)
    for n in (0, 1, 2, 7, 40):
        for _ in range(20):
            ids = [g.randrange(vocab) for _ in range(n)] + g.sample(specials, min(2, len(specials)))
            g.shuffle(ids)
            want = tok.hf.decode(ids, skip_special_tokens=skip_special,
                                 clean_up_tokenization_spaces=False)
            assert tok.decode(ids, skip_special_tokens=skip_special) == want


def test_byte_level_bpe_for_random_models_round_trips(tmp_path) -> None:
    from pdserve.tokenizer import write_byte_level_bpe
    write_byte_level_bpe(tmp_path, "a tiny corpus for a test tokenizer", vocab_size=300)
    tok = Tokenizer(tmp_path)
    text = "any bytes at all: héllo wörld ✓ 123"
    ids = tok.encode(text)
    assert ids and max(ids) < 300
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == (tok.hf.convert_tokens_to_ids("<|eos|>"),)
