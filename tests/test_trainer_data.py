"""Training data: packing, padding, mixtures and their determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runner.spec import DataSpec, Experiment
from runner.trainer.data import IGNORE, Corpus, RowStream, SourceTokens, eval_batches, mixture_weights, tokenize_sources
from runner.trainer.tokenizer import fingerprint, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
_SETUP: dict = {}  # what the news fixture tokenized with


@pytest.fixture(scope="module")
def news(tmp_path_factory) -> tuple[SourceTokens, int]:
    """news.jsonl tokenized with a BPE trained on it: (tokens, eos id)."""
    cache = tmp_path_factory.mktemp("cache")
    data = DataSpec(sources=[{"path": "data/sample/news.jsonl"}], validation=0.05, seq_len=64)
    exp = Experiment(name="d", model="tiny", data=data, budget={"tokens": 1000})
    corpus = Corpus(ROOT, cache, seed=1)
    key = corpus.key(data.sources[0], data.validation)
    tokenizer = load_tokenizer(exp, ROOT, cache / "run", cache, 1024, key,
                               lambda: corpus.split(data.sources[0], data.validation)[0])
    (source,) = tokenize_sources(corpus, data, tokenizer, fingerprint(tokenizer))
    _SETUP.update(data=data, tokenizer=tokenizer, cache=cache)
    return source, tokenizer.eos_token_id


def synthetic(name: str, docs: int, doc_len: int, start: int) -> SourceTokens:
    tokens = np.arange(start, start + docs * doc_len, dtype=np.uint32) % 60000
    offsets = np.arange(0, docs * doc_len + 1, doc_len, dtype=np.int64)
    return SourceTokens(name, tokens, offsets, tokens[:doc_len], offsets[:2])


def test_packing_leaves_no_padding_and_loses_no_tokens_but_the_final_remainder(news):
    source, eos = news
    seq_len = 64
    stream = RowStream([source], [1.0], seed=5, packing=True, pad_id=eos)
    epoch = stream.epoch_stream(0)
    assert len(epoch) == len(source.train)  # every document, each ending in EOS
    assert np.sum(epoch == eos) == source.train_docs
    rows = (len(epoch) - 1) // seq_len
    inputs, targets = stream.next_batch(rows, seq_len)
    assert (targets != IGNORE).all()  # no padding anywhere
    assert np.array_equal(inputs.reshape(-1), epoch[: rows * seq_len])  # each token is an input exactly once
    assert np.array_equal(targets.reshape(-1), epoch[1: rows * seq_len + 1])  # ... and a target once
    assert len(epoch) - rows * seq_len <= seq_len  # only the last partial row is left over
    stream.next_batch(1, seq_len)
    assert stream.epochs == [1]  # the next row starts a new, reshuffled epoch
    assert not np.array_equal(stream.epoch_stream(0), epoch)


def test_padded_mode_holds_one_document_per_row_and_masks_the_padding(news):
    source, eos = news
    stream = RowStream([source], [1.0], seed=5, packing=False, pad_id=eos)
    inputs, targets = stream.next_batch(16, 256)
    order = stream._doc_order(0)
    for row in range(16):
        doc = int(order[row])
        tokens = np.asarray(source.train[source.train_offsets[doc]:source.train_offsets[doc + 1]])
        n = len(tokens)
        assert np.array_equal(inputs[row, : n - 1], tokens[:-1])
        assert np.array_equal(targets[row, : n - 1], tokens[1:])
        assert (targets[row, n - 1:] == IGNORE).all()
        assert (inputs[row, n:] == eos).all()


@pytest.mark.parametrize("strategy, expected", [
    ("proportional", [0.8, 0.15, 0.05]),
    ("sqrt", [s ** 0.5 / sum(x ** 0.5 for x in (80, 15, 5)) for s in (80, 15, 5)]),
    ("50cap", [0.5, 0.375, 0.125]),
    ("weights", [0.2, 0.3, 0.5]),
])
def test_mixture_proportions_hold_within_a_tolerance_for_each_strategy(strategy, expected):
    sizes = [80 * 640, 15 * 640, 5 * 640]
    probs = mixture_weights(strategy, sizes, [2, 3, 5])
    assert probs == pytest.approx(expected)
    sources = [synthetic("a", 80, 640, 0), synthetic("b", 15, 640, 100_000), synthetic("c", 5, 640, 200_000)]
    stream = RowStream(sources, probs, seed=11, packing=True, pad_id=0)
    rows = 20_000
    drawn = Counter(stream.source_of(r) for r in range(rows))
    for i, p in enumerate(expected):
        assert drawn[i] / rows == pytest.approx(p, abs=0.015)


def test_the_trainers_mixture_weights_agree_with_the_planners():
    budget = pytest.importorskip("runner.plan.budget")
    sizes = [5_000_000, 300_000, 40_000, 9_000]
    for strategy in ("proportional", "sqrt", "50cap", "weights"):
        weights = [1.0, 2.0, 3.0, 4.0]
        assert mixture_weights(strategy, sizes, weights) == pytest.approx(
            budget.mixture_weights(sizes, strategy, weights if strategy == "weights" else None))


def test_sampling_is_deterministic_for_a_seed_and_resumes_from_its_saved_position():
    sources = [synthetic("a", 50, 100, 0), synthetic("b", 50, 100, 30_000)]
    first = RowStream(sources, [0.5, 0.5], seed=2, packing=True, pad_id=0)
    batches = [first.next_batch(4, 32)[0] for _ in range(20)]
    again = RowStream(sources, [0.5, 0.5], seed=2, packing=True, pad_id=0)
    again.next_batch(4, 32)
    resumed = RowStream(sources, [0.5, 0.5], seed=2, packing=True, pad_id=0)
    resumed.load_state(again.state())
    assert all(np.array_equal(resumed.next_batch(4, 32)[0], b) for b in batches[1:])
    other = RowStream(sources, [0.5, 0.5], seed=3, packing=True, pad_id=0)
    assert not np.array_equal(other.next_batch(4, 32)[0], batches[0])


def test_tokenization_is_cached_by_data_tokenizer_and_settings(news, monkeypatch):
    source, _ = news
    data, tokenizer, cache = _SETUP["data"], _SETUP["tokenizer"], _SETUP["cache"]
    assert source.train.dtype == np.uint16  # a 1,024-token vocabulary fits two bytes per token
    assert len(source.val_offsets) - 1 == round(3000 * 0.05)  # the held-out share of documents

    def no_reading(self, source):
        raise AssertionError("the text was read again instead of coming from the cache")

    monkeypatch.setattr(Corpus, "_read", no_reading)
    (cached,) = tokenize_sources(Corpus(ROOT, cache, seed=1), data, tokenizer, fingerprint(tokenizer))
    assert np.array_equal(cached.train, source.train)
    with pytest.raises(AssertionError, match="read again"):  # another validation share is another key
        tokenize_sources(Corpus(ROOT, cache, seed=1), data.model_copy(update={"validation": 0.1}),
                         tokenizer, fingerprint(tokenizer))


def test_a_validation_split_smaller_than_a_micro_batch_is_evaluated_as_one_smaller_batch():
    def source(val_tokens: int) -> SourceTokens:
        val = np.arange(val_tokens, dtype=np.int64)
        return SourceTokens("s", np.zeros(0, np.int64), np.zeros(1, np.int64), val, np.array([0, val_tokens]))

    # 5 rows of seq_len 8 (each needs 9 tokens, the last one's target) against a micro-batch of 32: one batch of 5.
    (inputs, targets), = eval_batches([source(5 * 8 + 1)], seq_len=8, micro_batch=32, max_batches=4,
                                      packing=True, pad_id=0)
    assert inputs.shape == targets.shape == (5, 8) and (targets[:, :-1] == inputs[:, 1:]).all()
    # Enough rows for whole micro-batches: only whole ones, as before.
    assert [x.shape for x, _ in eval_batches([source(70 * 8 + 1)], 8, 32, 4, True, 0)] == [(32, 8), (32, 8)]
    # Less than one row: nothing to evaluate (the trainer says so in its log).
    assert eval_batches([source(8)], 8, 32, 4, True, 0) == []
