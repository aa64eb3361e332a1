from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdserve.sampling.params import SamplingParams
from pdserve.sampling.stop import StepText, TextStream
from pdserve.tokenizer import Tokenizer

TEXTS = ["hello world", "café crème brûlée", "日本語のテキスト 日本",
         "emoji 😀 and 🎉 party", "the quick brown fox jumps"]


def save_tiny_tokenizer(path: Path) -> Path:
    """A real byte-level BPE (small vocab, so rare characters split across tokens)."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(TEXTS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>")
    hf.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("stoptok")))


def char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One or more tokens per character: token boundaries fall between every character."""
    return [i for c in text for i in tok.encode(c, add_special_tokens=False)]


def run(tok: Tokenizer, ids: list[int], prompt: str = "",
        **kw) -> tuple[TextStream, list[StepText]]:
    ts = TextStream(tok, SamplingParams(**kw), tok.encode(prompt))
    steps = []
    for t in ids:
        steps.append(ts.step(t))
        if steps[-1].finish_reason:
            break
    assert "".join(s.delta for s in steps) == ts.text
    return ts, steps


def test_stop_string_across_tokens_is_excluded(tok):
    ids = tok.encode("hello world")
    assert len(ids) > 1
    ts, steps = run(tok, ids, stop=["lo w"], max_tokens=50)
    assert ts.text == "hel"
    assert (ts.finish_reason, ts.stop_reason) == ("stop", "lo w")
    assert steps[-1].finish_reason == "stop"
    assert "lo" not in "".join(s.delta for s in steps)


def test_possible_stop_prefix_held_back_then_released(tok):
    ids = char_ids(tok, "hello world")
    ts, steps = run(tok, ids, stop=["wx"], max_tokens=50)
    deltas = [s.delta for s in steps]
    assert deltas[6] == ""        # 'w' could start "wx"
    assert deltas[7] == "wo"      # 'o' rules it out: both released together
    assert ts.text == "hello world" and ts.finish_reason is None


def test_held_prefix_flushed_at_length(tok):
    ids = char_ids(tok, "abcx")
    ts, steps = run(tok, ids, stop=["xyz"], max_tokens=4)
    assert [s.delta for s in steps] == ["a", "b", "c", "x"]
    assert (ts.finish_reason, ts.stop_reason) == ("length", None)


def test_held_prefix_flushed_on_eos(tok):
    eos = tok.eos_token_ids[0]
    ts, steps = run(tok, char_ids(tok, "abx") + [eos], stop=["xyz"], max_tokens=10,
                    skip_special_tokens=False)
    assert [s.delta for s in steps] == ["a", "b", "", "x"]
    assert ts.text == "abx"                       # eos text not included
    assert (ts.finish_reason, ts.stop_reason) == ("stop", None)


def test_multibyte_stop_string_across_byte_tokens(tok):
    ids = tok.encode("café 😀 日本語")
    ts, _ = run(tok, ids, stop=["😀 日"], max_tokens=50)
    assert ts.text == "café "
    assert ts.stop_reason == "😀 日"


def test_earliest_stop_string_wins(tok):
    ids = char_ids(tok, "the quick brown fox")
    ts, _ = run(tok, ids, stop=["k br", "ick", "quick brown"], max_tokens=50)
    assert ts.text == "the qu" and ts.stop_reason == "ick"


def test_max_tokens_gives_length(tok):
    ids = tok.encode("the quick brown fox jumps")
    ts, steps = run(tok, ids, max_tokens=3)
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    assert ts.text == tok.decode(ids[:3]) and ts.num_output_tokens == 3


def test_eos_stops_unless_ignored(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("hello") + [eos] + tok.encode(" world")
    ts, _ = run(tok, ids, max_tokens=50, skip_special_tokens=False)
    assert (ts.text, ts.finish_reason, ts.stop_reason) == ("hello", "stop", None)
    ts, _ = run(tok, ids, max_tokens=50, ignore_eos=True, skip_special_tokens=False)
    assert ts.text == "hello<|eos|> world" and ts.finish_reason is None
    ts, _ = run(tok, ids, max_tokens=len(ids), ignore_eos=True)
    assert (ts.text, ts.finish_reason) == ("hello world", "length")


def test_stop_token_id_text_not_included(tok):
    ids = char_ids(tok, "ab!cd")
    bang = tok.encode("!")[0]
    ts, _ = run(tok, ids, stop_token_ids=[bang], max_tokens=50)
    assert (ts.text, ts.finish_reason, ts.stop_reason) == ("ab", "stop", bang)


def test_no_stop_before_min_tokens(tok):
    eos = tok.eos_token_ids[0]
    ids = [eos] + char_ids(tok, "ab") + [eos]
    ts, steps = run(tok, ids, min_tokens=2, max_tokens=10, stop=["a"])
    assert len(steps) == 4 and ts.finish_reason == "stop"
    assert ts.text == "ab"         # "a" completed before min_tokens is not a stop match


def test_eos_at_max_tokens_is_stop(tok):
    eos = tok.eos_token_ids[0]
    ts, _ = run(tok, char_ids(tok, "ab") + [eos], max_tokens=3)
    assert ts.finish_reason == "stop"


def test_step_after_finish_raises(tok):
    ts, _ = run(tok, char_ids(tok, "ab"), max_tokens=2)
    with pytest.raises(ValueError, match="finished"):
        ts.step(5)


def reference(tok: Tokenizer, ids: list[int], stops: list[str],
              max_tokens: int) -> tuple[str, str]:
    """Non-streaming answer: decode growing prefixes until a stop string appears."""
    for k in range(1, min(len(ids), max_tokens) + 1):
        text = tok.decode(ids[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], "stop"
    # An incomplete character at the very end is never emitted.
    return tok.decode(ids[:max_tokens]).rstrip("\ufffd"), "length"


def test_streaming_matches_reference_on_random_cases(tok):
    rnd = random.Random(0)
    corpus = " ".join(TEXTS) + " 🚀 ünï 日本 ok"
    for _ in range(300):
        start = rnd.randrange(len(corpus) - 20)
        text = corpus[start:start + rnd.randrange(5, 40)]
        ids = tok.encode(text) if rnd.random() < 0.5 else char_ids(tok, text)
        stops = []
        for _ in range(rnd.randrange(0, 3)):
            a = rnd.randrange(len(corpus) - 4)
            stops.append(corpus[a:a + rnd.randrange(1, 4)])
        max_tokens = rnd.randrange(1, len(ids) + 1)   # every case finishes
        ts, steps = run(tok, ids, prompt="日本", stop=stops, max_tokens=max_tokens)
        exp_text, exp_reason = reference(tok, ids, stops, max_tokens)
        assert (ts.text, ts.finish_reason) == (exp_text, exp_reason), (text, stops, max_tokens)
        sent = ""
        for s in steps:
            sent += s.delta
            assert exp_text.startswith(sent)       # nothing ever leaked past the stop
            assert "\ufffd" not in s.delta


def test_accept_then_detokenize_is_step(tok):
    """The two halves the engine uses to detokenize during the next step: the finish is
    known after accept() when no stop string is set."""
    eos = tok.eos_token_ids[0]
    ids = tok.encode("café crème") + [eos]
    for kw in (dict(max_tokens=4), dict(max_tokens=50), dict(max_tokens=50, ignore_eos=True)):
        want, _ = run(tok, ids, **kw)
        ts = TextStream(tok, SamplingParams(**kw), [])
        assert not ts.needs_text_to_stop
        for t in ids:
            stopped = ts.accept(t)
            if stopped is None:
                ends = ts.reaches_length
                step = ts.detokenize()
                assert (step.finish_reason == "length") == ends
            if ts.finished:
                break
        assert (ts.text, ts.finish_reason, ts.num_output_tokens) == \
            (want.text, want.finish_reason, want.num_output_tokens)
    assert TextStream(tok, SamplingParams(stop=["x"]), []).needs_text_to_stop


def test_accept_and_detokenize_refuse_misuse(tok):
    ts = TextStream(tok, SamplingParams(max_tokens=5), [])
    with pytest.raises(ValueError, match="no accepted token"):
        ts.detokenize()
    ts.accept(tok.encode("a")[0])
    with pytest.raises(ValueError, match="not detokenized"):
        ts.accept(tok.encode("b")[0])
