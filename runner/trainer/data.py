"""Training data: read sources, hold out validation, tokenize once (cached), mix, and cut rows.

Every source becomes a flat token buffer (documents each followed by EOS) plus
document offsets, cached on disk under a key made of the data file's sha256,
the tokenizer's fingerprint and the split settings. A ``RowStream`` draws rows
from the sources of one phase: which source each row comes from is a pure
function of (seed, row number), and each source keeps a cursor, so the whole
position is a few integers that a checkpoint stores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runner.errors import UserError

if TYPE_CHECKING:
    from runner.spec import DataSpec, SourceSpec

IGNORE = -100  # target id that the loss skips (padding)
_BLOCK = 4096  # rows whose source choices are drawn together
_CACHE_VERSION = "tok-v1"
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


@dataclass(frozen=True)
class SourceTokens:
    """One source, tokenized: flat buffers and document offsets for each split."""

    name: str
    train: np.ndarray
    train_offsets: np.ndarray  # len = documents + 1
    val: np.ndarray
    val_offsets: np.ndarray

    @property
    def train_docs(self) -> int:
        return len(self.train_offsets) - 1


class Corpus:
    """The text of every source a run reads, loaded on first use and split train/validation."""

    def __init__(self, job_dir: Path, cache_dir: Path, seed: int):
        self.job_dir, self.cache_dir, self.seed = job_dir, cache_dir, seed
        self._texts: dict[tuple[str, float], tuple[list[str], list[str]]] = {}
        self._hashes: dict[Path, str] = {}

    def path(self, source: SourceSpec) -> Path:
        path = Path(source.path or "").expanduser()
        return path if path.is_absolute() else self.job_dir / path

    def key(self, source: SourceSpec, validation: float) -> str:
        """The identity of a source's split: its bytes (or hub id), fields and split settings."""
        if source.path:
            origin = self._file_hash(self.path(source))
        else:
            origin = f"hf:{source.hf}:{source.subset}:{source.split}"
        return f"{origin}|{source.format}|{','.join(source.text_fields)}|{validation}|{self.seed}"

    def split(self, source: SourceSpec, validation: float) -> tuple[list[str], list[str]]:
        """(train texts, validation texts); validation is a seeded random share of documents."""
        memo = (source.model_dump_json(), validation)
        if memo not in self._texts:
            texts = self._read(source)
            n_val = round(len(texts) * validation)
            if validation > 0 and len(texts) >= 2:
                n_val = max(1, n_val)
            order = np.random.default_rng([self.seed, 0x5EED]).permutation(len(texts))
            held = set(order[:n_val].tolist())
            train = [t for i, t in enumerate(texts) if i not in held]
            val = [texts[i] for i in sorted(held)]
            if not train:
                raise UserError(f"source {source.label!r} has no training documents left after validation",
                                field="data.validation")
            self._texts[memo] = (train, val)
        return self._texts[memo]

    def _file_hash(self, path: Path) -> str:
        if path not in self._hashes:
            if not path.is_file():
                raise UserError(f"data file not found: {path}", field="data.sources")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._hashes[path] = digest.hexdigest()
        return self._hashes[path]

    def _read(self, source: SourceSpec) -> list[str]:
        import datasets

        datasets.disable_progress_bars()
        cache = str(self.cache_dir / "datasets")
        if source.path:
            path = self.path(source)
            self._file_hash(path)  # a clear error for a missing file
            kind = source.format if source.format != "auto" else _FORMATS.get(path.suffix.lower())
            kind = {"jsonl": "json", "txt": "text"}.get(kind or "", kind)
            if kind is None:
                raise UserError(f"cannot tell the format of {path.name}", field="data.sources",
                                hint="set format: jsonl, parquet or txt")
            extra = {"sample_by": "paragraph"} if kind == "text" else {}
            table = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, **extra)
        else:
            try:
                table = datasets.load_dataset(source.hf, source.subset, split=source.split, cache_dir=cache)
            except Exception as exc:  # the hub raises many types (connection, not found, gated)
                raise UserError(f"cannot load the dataset {source.hf!r}: {exc}".splitlines()[0],
                                field="data.sources.hf",
                                hint="check the id and network, or download it and use path:") from None
        missing = [f for f in source.text_fields if f not in table.column_names]
        if missing:
            raise UserError(f"source {source.label!r} has no field(s) {missing}; it has {table.column_names}",
                            field="data.sources.text_fields")
        columns = [table[f] for f in source.text_fields]
        texts = ["\n".join(str(v) for v in row) for row in zip(*columns)]
        return [t for t in texts if t.strip()]


def tokenize_sources(corpus: Corpus, data: DataSpec, tokenizer, tokenizer_id: str) -> list[SourceTokens]:
    """Every source of ``data`` tokenized, from the cache when the same split was tokenized before."""
    out = []
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    for source in data.sources:
        key = hashlib.sha256(f"{_CACHE_VERSION}|{corpus.key(source, data.validation)}|{tokenizer_id}|"
                             f"{np.dtype(dtype).name}".encode()).hexdigest()[:24]
        folder = corpus.cache_dir / "tokens" / key
        if not (folder / "done").is_file():
            train, val = corpus.split(source, data.validation)
            tmp = folder.with_name(f".{key}.{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, texts in (("train", train), ("val", val)):
                tokens, offsets = _encode(texts, tokenizer, dtype)
                np.save(tmp / f"{name}.npy", tokens)
                np.save(tmp / f"{name}_offsets.npy", offsets)
            (tmp / "done").write_text(json.dumps({"source": source.label, "tokenizer": tokenizer_id}))
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
        out.append(SourceTokens(source.label, load("train"), load("train_offsets"), load("val"), load("val_offsets")))
    return out


def _encode(texts: list[str], tokenizer, dtype) -> tuple[np.ndarray, np.ndarray]:
    eos = tokenizer.eos_token_id
    lengths, pieces = [], []
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
            lengths.append(len(ids) + 1)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, offsets


def mixture_weights(strategy: str, sizes: list[int], weights: list[float | None]) -> list[float]:
    """Sampling probabilities of the sources: proportional, sqrt, 50cap or explicit weights.

    ``sizes`` are the sources' training tokens. ``50cap`` is proportional with
    no source above half of the mix (the excess goes to the others by size).
    """
    if strategy == "weights":
        raw = [float(w) for w in weights]  # type: ignore[arg-type]
    elif strategy == "sqrt":
        raw = [math.sqrt(s) for s in sizes]
    else:
        raw = [float(s) for s in sizes]
    total = sum(raw)
    probs = [r / total for r in raw]
    if strategy == "50cap" and len(probs) > 1:
        capped: set[int] = set()
        while True:
            over = [i for i, p in enumerate(probs) if p > 0.5 + 1e-12 and i not in capped]
            if not over:
                break
            capped.update(over)
            free = sum(p for i, p in enumerate(probs) if i not in capped)
            spare = 1 - 0.5 * len(capped)
            probs = [0.5 if i in capped else p / free * spare for i, p in enumerate(probs)]
    return probs


class RowStream:
    """Rows of one phase's training data, drawn deterministically for a seed.

    A packed row is ``seq_len + 1`` consecutive tokens of a source's stream
    (documents in a seeded order per epoch, each ending in EOS); the cursor then
    moves by ``seq_len``, so consecutive rows share one boundary token: every
    token is an input once and a target once, with no padding. Only the tail of
    an epoch that is shorter than a row is skipped. A padded row is one document,
    cut to ``seq_len + 1`` and padded; the padding is masked out of the targets.
    """

    def __init__(self, sources: list[SourceTokens], probs: list[float], seed: int, packing: bool, pad_id: int):
        self.sources, self.probs, self.seed, self.packing, self.pad_id = sources, probs, seed, packing, pad_id
        self.rows = 0
        self.cursors = [0] * len(sources)
        self.epochs = [0] * len(sources)
        self._block: tuple[int, np.ndarray] | None = None
        self._order: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, doc order)
        self._stream: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, packed tokens)

    def state(self) -> dict:
        return {"rows": self.rows, "cursors": list(self.cursors), "epochs": list(self.epochs)}

    def load_state(self, state: dict) -> None:
        self.rows, self.cursors, self.epochs = state["rows"], list(state["cursors"]), list(state["epochs"])

    def rows_per_epoch(self, seq_len: int) -> int:
        """Rows that one pass over every source's training split yields."""
        if self.packing:
            return sum(max(0, (len(s.train) - 1) // seq_len) for s in self.sources)
        return sum(s.train_docs for s in self.sources)

    def source_of(self, row: int) -> int:
        block, index = divmod(row, _BLOCK)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, 0xB10C, block])
            self._block = (block, rng.choice(len(self.sources), size=_BLOCK, p=self.probs))
        return int(self._block[1][index])

    def next_batch(self, rows: int, seq_len: int, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each ``rows x seq_len`` int64; targets are inputs shifted by one.

        With ``world`` processes, the stream advances by ``rows x world`` rows and
        this rank keeps rows ``rank, rank + world, ...`` of them: together the ranks
        read what one process reading ``rows x world`` rows would, and the position
        (a global row count) does not depend on the number of processes.
        """
        window = np.empty((rows, seq_len + 1), dtype=np.int64)
        for i in range(rows * world):
            source = self.source_of(self.rows)
            self.rows += 1
            row = self._packed(source, seq_len) if self.packing else self._padded(source, seq_len)
            if i % world == rank:
                window[i // world] = row
        inputs = window[:, :-1]
        targets = window[:, 1:].copy()
        if not self.packing:
            targets[targets == _PAD_SENTINEL] = IGNORE
            inputs = np.where(inputs == _PAD_SENTINEL, self.pad_id, inputs)
        return np.ascontiguousarray(inputs), targets

    def _doc_order(self, source: int) -> np.ndarray:
        epoch = self.epochs[source]
        cached = self._order.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 0x0D0C, source, epoch])
            cached = (epoch, rng.permutation(self.sources[source].train_docs))
            self._order[source] = cached
            self._stream.pop(source, None)
        return cached[1]

    def _packed(self, source: int, seq_len: int) -> np.ndarray:
        data = self.sources[source]
        if len(data.train) < seq_len + 1:
            raise UserError(f"source {data.name!r} has {len(data.train)} training tokens, fewer than one "
                            f"row of seq_len + 1 = {seq_len + 1}", field="data.seq_len")
        stream = self._epoch_stream(source)
        if self.cursors[source] + seq_len + 1 > len(stream):
            self.epochs[source] += 1
            self.cursors[source] = 0
            stream = self._epoch_stream(source)
        start = self.cursors[source]
        self.cursors[source] += seq_len
        return stream[start:start + seq_len + 1]

    def epoch_stream(self, source: int) -> np.ndarray:
        """The packed token stream of a source in its current epoch (exposed for tests)."""
        return self._epoch_stream(source)

    def _epoch_stream(self, source: int) -> np.ndarray:
        order = self._doc_order(source)
        cached = self._stream.get(source)
        if cached is None or cached[0] != self.epochs[source]:
            data = self.sources[source]
            offsets = np.asarray(data.train_offsets)
            pieces = [data.train[offsets[i]:offsets[i + 1]] for i in order]
            cached = (self.epochs[source], np.concatenate(pieces))
            self._stream[source] = cached
        return cached[1]

    def _padded(self, source: int, seq_len: int) -> np.ndarray:
        data = self.sources[source]
        order = self._doc_order(source)
        if self.cursors[source] >= len(order):
            self.epochs[source] += 1
            self.cursors[source] = 0
            order = self._doc_order(source)
        doc = int(order[self.cursors[source]])
        self.cursors[source] += 1
        tokens = data.train[data.train_offsets[doc]:data.train_offsets[doc + 1]][: seq_len + 1]
        row = np.full(seq_len + 1, _PAD_SENTINEL, dtype=np.int64)
        row[: len(tokens)] = tokens
        return row


_PAD_SENTINEL = -1  # marks padding inside a row until targets are masked


def eval_batches(sources: list[SourceTokens], seq_len: int, micro_batch: int, max_batches: int,
                 packing: bool, pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of validation batches, rows taken from the sources in turn.

    Batches hold ``micro_batch`` rows; a validation split with fewer rows than that is
    evaluated as one smaller batch rather than not at all.
    """
    per_source: list[list[np.ndarray]] = []
    want = micro_batch * max_batches
    for s in sources:
        rows = []
        if packing:
            for start in range(0, len(s.val) - seq_len, seq_len):
                rows.append(np.asarray(s.val[start:start + seq_len + 1], dtype=np.int64))
                if len(rows) >= want:
                    break
        else:
            for d in range(min(len(s.val_offsets) - 1, want)):
                tokens = s.val[s.val_offsets[d]:s.val_offsets[d + 1]][: seq_len + 1]
                row = np.full(seq_len + 1, _PAD_SENTINEL, dtype=np.int64)
                row[: len(tokens)] = tokens
                rows.append(row)
        per_source.append(rows)
    mixed = [r for group in _round_robin(per_source) for r in group][:want]
    micro_batch = min(micro_batch, len(mixed)) or 1
    batches = []
    for start in range(0, len(mixed) - micro_batch + 1, micro_batch):
        window = np.stack(mixed[start:start + micro_batch])
        inputs, targets = window[:, :-1], window[:, 1:].copy()
        targets[targets == _PAD_SENTINEL] = IGNORE
        inputs = np.where(inputs == _PAD_SENTINEL, pad_id, inputs)
        batches.append((np.ascontiguousarray(inputs), targets))
    return batches


def _round_robin(groups: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    longest = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]
