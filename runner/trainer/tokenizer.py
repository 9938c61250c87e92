"""The run's tokenizer: the model's own, or a byte-level BPE trained on the job's training split."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from runner.errors import UserError
from runner.spec import Experiment

EOS = "<|endoftext|>"
PAD = "<|pad|>"
_NO_LIMIT = 10**30  # documents are packed by us, never truncated by the tokenizer


def fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's full definition (vocab, merges, normalisation)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokenizer(experiment: Experiment, job_dir: Path, run_dir: Path, cache_dir: Path,
                   vocab_size: int, data_key: str, train_texts: Callable[[], Iterable[str]]):
    """The tokenizer for this run, saved under ``RUN_DIR/tokenizer`` either way.

    ``data_key`` names the training split (file hashes and split settings) so a
    trained tokenizer is reused from the cache for the same data; ``train_texts``
    is only called when one has to be trained.
    """
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():  # a resumed run keeps the tokenizer it started with
        return _finish(_load(str(saved)), saved)
    model = experiment.model
    source = model.tokenizer or model.path or model.hub
    if source:
        local = _local(source, job_dir)
        if local is not None and _has_tokenizer(local):
            return _finish(_load(str(local)), saved)
        if local is None and (model.tokenizer or model.hub):
            return _finish(_load(source, hub=True), saved)
        if model.tokenizer:
            raise UserError(f"no tokenizer files in {local}", field="model.tokenizer",
                            hint="point it at a directory with tokenizer.json, or a hub id")
    return _finish(_train_bpe(vocab_size, cache_dir, data_key, train_texts), saved)


def _local(source: str, job_dir: Path) -> Path | None:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else job_dir / path
    return path if path.is_dir() else None


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _load(source: str, hub: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, use_fast=True)
    except OSError as exc:
        where = "the Hugging Face hub" if hub else source
        raise UserError(f"cannot load the tokenizer {source!r} from {where}: {exc}".splitlines()[0],
                        field="model", hint="download it once and point model.tokenizer at the directory") from None


def _train_bpe(vocab_size: int, cache_dir: Path, data_key: str, train_texts: Callable[[], Iterable[str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise UserError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs 258 or more)",
                        field="model.overrides.vocab_size")
    key = hashlib.sha256(f"bpe-v1|{vocab_size}|{data_key}".encode()).hexdigest()[:20]
    cached = cache_dir / "tokenizers" / key
    if not (cached / "tokenizer.json").is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(train_texts(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
        tmp = cached.with_name(f".{key}.{os.getpid()}")
        fast.save_pretrained(str(tmp))
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)
        os.rename(tmp, cached)
    return _load(str(cached))


def _finish(tokenizer, saved: Path):
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-sequence token, which packing needs", field="model.tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss either way
    tokenizer.model_max_length = _NO_LIMIT
    if not (saved / "tokenizer.json").is_file():
        tmp = saved.with_name(f".tokenizer.{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(saved, ignore_errors=True)
        os.rename(tmp, saved)
    return tokenizer
