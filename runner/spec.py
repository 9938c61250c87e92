"""The job file: one experiment, or several sharing defaults, validated with locations.

``load_jobs(path)`` returns one ``Job`` per experiment. Every error a user can
make is reported as a ``UserError`` that names the file, line, column and the
dotted field path, with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from runner import presets
from runner.errors import UserError, UserErrors
from runner.units import parse_count, parse_hours
from runner.yamldoc import Doc, Path_, dotted, load_file

Count = Annotated[int, BeforeValidator(parse_count)]
Hours = Annotated[float, BeforeValidator(parse_hours)]
PositiveInt = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]

Precision = Literal["auto", "fp32", "fp16", "bf16", "fp8"]
Mixture = Literal["proportional", "sqrt", "50cap", "weights"]


class Strict(BaseModel):
    # Attribute docstrings become field descriptions: docs/job-file.md is generated from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(Strict):
    """Which network: a preset shape, a local Hugging Face directory, or a hub id."""

    preset: str | None = None
    """A named shape: gpt2-124m, gpt2-355m, llama-160m, llama-1b, llama-7b, factorized-197m, tiny, or dN (nanochat depth)."""
    path: str | None = None
    """A local Hugging Face model directory (config.json, optionally weights)."""
    hub: str | None = None
    """A Hugging Face hub model id."""
    pretrained: bool = False
    """Load weights (path/hub) instead of a fresh initialisation."""
    overrides: dict[str, int | bool] = {}
    """Change preset fields: layers, hidden, vocab_size, ..."""
    tokenizer: str | None = None
    """A directory or hub id; default: the model's, else BPE trained on the data."""
    shape: str | None = None
    """A preset whose shape the planner uses when a hub config cannot be read offline."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # `model: gpt2-124m`
            return {"preset": value}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("preset", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of preset, path or hub")
        if self.preset and self.pretrained:
            raise ValueError("presets are built from scratch; use path or hub for pretrained weights")
        unknown = set(self.overrides) - set(presets.SHAPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown override(s) {sorted(unknown)}; allowed: {', '.join(presets.SHAPE_FIELDS)}")
        return self


class SourceSpec(Strict):
    """One data source: a local file or a Hugging Face dataset id."""

    name: Name | None = None
    """A label for reports; default: the file's stem or the dataset id."""
    path: str | None = None
    """A local .jsonl, .parquet or .txt file, relative to the job file."""
    hf: str | None = None
    """A Hugging Face dataset id."""
    subset: str | None = None
    """The dataset configuration, for `hf` sources."""
    split: str = "train"
    """Which split of an `hf` dataset to read."""
    format: Literal["auto", "jsonl", "parquet", "txt"] = "auto"
    """File format; auto: from the extension."""
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)
    """Fields joined to make each document's text (jsonl/parquet)."""
    tokens: Count | None = None
    """Declared size, used by the planner for epochs and coverage."""
    samples: Count | None = None
    """Declared number of samples, used by the planner for epochs and coverage."""
    weight: float | None = Field(default=None, gt=0)
    """Only for mixture: weights."""

    @model_validator(mode="after")
    def _one_place(self) -> SourceSpec:
        if bool(self.path) == bool(self.hf):
            raise ValueError("give exactly one of path or hf")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or self.hf or "").stem or "source"


class DataSpec(Strict):
    """What the model reads, how sources are mixed, and how text becomes sequences."""

    sources: list[SourceSpec] = Field(min_length=1)
    """One or more sources, mixed by `mixture`."""
    mixture: Mixture = "proportional"
    """How sources are weighted: by size, by the square root of size, by size with no source above 50%, or by explicit `weight`s."""
    validation: float = Field(default=0.01, ge=0, lt=0.5)
    """Held-out share of every source."""
    seq_len: PositiveInt | None = None
    """Tokens per training sequence (required unless a curriculum sets it)."""
    packing: bool = True
    """Concatenate documents into full sequences; off: one (padded) sample per sequence."""

    @model_validator(mode="after")
    def _weights(self) -> DataSpec:
        weighted = [s.weight is not None for s in self.sources]
        if self.mixture == "weights" and not all(weighted):
            raise ValueError("mixture: weights needs a weight on every source")
        if self.mixture != "weights" and any(weighted):
            raise ValueError(f"source weights are only used with mixture: weights (mixture is {self.mixture})")
        names = [s.label for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)} (set name:)")
        return self


class TrainSpec(Strict):
    """How each optimizer step is computed."""

    batch_size: PositiveInt | Literal["auto"] = 8
    """Sequences per micro-batch per GPU."""
    grad_accum: PositiveInt = 1
    """Micro-batches accumulated per optimizer step."""
    tokens_per_step: Count | None = None
    """With batch_size auto: accumulation makes up this many tokens per step."""
    precision: Precision = "auto"
    """auto: bf16 on Ampere and newer, fp16 on older CUDA GPUs, fp32 on Apple (MPS) and CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory, about a third more compute."""
    compile: bool | Literal["auto"] = "auto"
    """Use torch.compile; auto: on CUDA only."""
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    """adamw, adamw8bit (8-bit states, bitsandbytes, CUDA only) or sgd (momentum 0.9)."""
    lr: float = Field(default=3e-4, gt=0, lt=10)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a share of the peak (cosine decay)."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the gradient norm to this (0: off)."""
    seed: int = 1337
    """Seeds data order and initialisation."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower)."""
    gpus: PositiveInt = 1
    """GPUs per host to train on, one process each (started by torchrun)."""
    nodes: PositiveInt = 1
    """Hosts to spread the job over: the first `nodes` of `hosts`, each with `gpus` GPUs (the rendezvous on the first)."""
    parallelism: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several GPUs: ddp (a full copy per GPU), fsdp (weights, gradients and optimizer states sharded), or auto: DDP when it fits one card with 10% to spare, else FSDP."""
    distributed_on_cpu: bool = False
    """Allow gpus > 1 on a CPU host: that many gloo processes, to test the distributed path (no speed-up)."""
    log_every_steps: PositiveInt = 10
    """How often to log training metrics."""

    @model_validator(mode="after")
    def _step_size(self) -> TrainSpec:
        if self.tokens_per_step is not None and self.batch_size != "auto":
            raise ValueError("tokens_per_step is for batch_size: auto; with a fixed batch_size set grad_accum")
        if self.tokens_per_step == 0:
            raise ValueError("tokens_per_step must be positive")
        return self


class LoraSpec(Strict):
    """Low-rank adapters trained on a frozen base model."""

    rank: PositiveInt = 16
    """Rank of the adapters."""
    alpha: float = Field(default=32, gt=0)
    """Scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapters' input."""
    target_modules: list[str] | Literal["auto"] = "auto"
    """Linear layers to adapt, e.g. [q_proj, v_proj]; auto: the attention projections (q/k/v/o, or GPT-2's c_attn and c_proj)."""


class Stage(Strict):
    """A curriculum stage: its sequence shape holds for its share of the token budget."""

    seq_len: PositiveInt
    """Tokens per sequence in this stage."""
    batch_size: PositiveInt
    """Sequences per micro-batch per GPU in this stage."""
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step in this stage."""
    share: Share
    """Share of the token budget this stage trains on; shares add up to 1."""


class Phase(Strict):
    """A phase of one run (pretrain, then SFT) with its share of the budget and its own data."""

    name: Name
    """Names the phase in logs and reports."""
    share: Share
    """Share of the token budget; shares add up to 1."""
    data: DataSpec | None = None
    """Data for this phase; default: the experiment's."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate for this phase; default: train.lr."""


class BudgetSpec(Strict):
    """How much to train, and the caps the runner enforces while it does."""

    tokens: Count | None = None
    """Train on this many tokens: steps = floor(tokens / tokens per step)."""
    epochs: float | None = Field(default=None, gt=0)
    """Train for this many passes over the data (needs sizes to plan)."""
    max_steps: PositiveInt | None = None
    """Stop after this many steps; alone it is the budget, beside tokens or epochs it caps them."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """Refuse to plan, and stop the run, beyond this cost."""
    max_hours: Hours | None = None
    """Refuse to plan, and checkpoint and stop the run, beyond this wall-clock time."""

    @field_validator("tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("token budget must be positive")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSpec:
        if self.tokens is not None and self.epochs is not None:
            raise ValueError("give tokens or epochs, not both")
        if self.tokens is None and self.epochs is None and self.max_steps is None:
            raise ValueError("give one of tokens, epochs or max_steps")
        return self


class CheckpointSpec(Strict):
    every_steps: PositiveInt = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: PositiveInt = 3
    """Keep this many most recent checkpoints."""


class EvalSpec(Strict):
    on_start: bool = True
    """Evaluate before the first step (a baseline)."""
    every_steps: PositiveInt = 200
    """Evaluate every this many steps."""
    max_batches: PositiveInt = 20
    """Validation batches per evaluation and process (several processes split the work)."""


class EarlyStopSpec(Strict):
    patience_steps: PositiveInt
    """Stop after this many steps without improvement of the validation loss."""
    min_delta: float = Field(default=0.0, ge=0)
    """The smallest decrease of the validation loss that counts as improvement."""


class Experiment(Strict):
    """One experiment: everything needed to plan it and run it as one run."""

    name: Name
    """Names the run; letters, digits, `.`, `_`, `-`."""
    description: str | None = None
    """Free text shown in listings."""
    model: ModelSpec
    """Which network to train (a preset name is shorthand for `{preset: NAME}`)."""
    data: DataSpec
    """What the model reads."""
    train: TrainSpec = TrainSpec()
    """How each optimizer step is computed."""
    lora: LoraSpec | None = None
    """Train low-rank adapters on a frozen base instead of every weight."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Store the frozen base in 8 or 4 bits (needs `lora`)."""
    budget: BudgetSpec
    """How much to train, and the money and time caps."""
    curriculum: list[Stage] = []
    """Stages with their own sequence length and batch, each a share of the token budget, run in order."""
    phases: list[Phase] = []
    """Consecutive parts of the run (e.g. pretrain then SFT), each a share of the budget with its own data and lr."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """How often to save, and how many checkpoints to keep."""
    eval: EvalSpec = EvalSpec()
    """When to evaluate on the validation split."""
    early_stopping: EarlyStopSpec | None = None
    """Stop when the validation loss has not improved for a while."""
    hosts: list[str] = []
    """Candidate hosts from the inventory; empty means every host."""
    backend: Literal["auto", "docker", "native"] = "auto"
    """How to run on the host: in a container (docker), natively (Apple), or auto."""

    @model_validator(mode="after")
    def _coherent(self) -> Experiment:
        if self.data.seq_len is None and not self.curriculum:
            raise ValueError("data.seq_len is required unless a curriculum gives each stage's seq_len")
        for what, parts in (("curriculum", self.curriculum), ("phases", self.phases)):
            total = sum(p.share for p in parts)
            if parts and abs(total - 1) > 1e-6:
                raise ValueError(f"{what}: shares must add up to 1, they add up to {total:g}")
        if self.quantization != "none" and self.lora is None:
            raise ValueError("quantization: quantized base weights cannot be trained; add a lora: section")
        if self.curriculum and self.budget.tokens is None:
            raise ValueError("budget.tokens: a curriculum splits a token budget; set it")
        if self.phases and self.budget.tokens is None:
            raise ValueError("budget.tokens: phases split a token budget; set it")
        if self.train.nodes > 1 and len(self.hosts) < self.train.nodes:
            raise ValueError(f"train.nodes: {self.train.nodes} runs on the first {self.train.nodes} hosts of hosts:, "
                             f"which lists {len(self.hosts)}; name them (the first one hosts the rendezvous)")
        return self

    @property
    def seq_len(self) -> int:
        """The longest sequence the run will see."""
        return max([s.seq_len for s in self.curriculum] + [self.data.seq_len or 0])


FILE_KEYS = {"defaults", "experiments"}


@dataclass
class Job:
    """One experiment as loaded from a file, able to point back at its source lines."""

    spec: Experiment
    file: str
    doc: Doc = field(repr=False)
    prefixes: tuple[Path_, ...] = ((),)
    """Where this experiment's keys live in the doc, most specific first."""
    overrides: dict[Path_, str] = field(default_factory=dict)
    """Path -> the --set text that set it."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_dir(self) -> Path:
        """Relative data and model paths resolve against the job file's directory."""
        return Path(self.file).resolve().parent

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def error(self, loc: Path_, message: str, *, key: bool = False, hint: str | None = None) -> UserError:
        """A UserError located at ``loc`` (a path inside the experiment)."""
        return _locate(self.doc, self.prefixes, self.overrides, loc, message, key=key, hint=hint)


def _locate(doc: Doc, prefixes: tuple[Path_, ...], overrides: dict[Path_, str], loc: Path_,
            message: str, *, key: bool = False, hint: str | None = None) -> UserError:
    for set_path, text in overrides.items():
        if tuple(loc[: len(set_path)]) == set_path:
            return UserError(message, file=f"--set {text}", field=dotted(loc), hint=hint)
    table = doc.key_pos if key else doc.value_pos
    for prefix in prefixes:
        full = prefix + tuple(loc)
        if full in table or full in doc.value_pos:
            line, col = doc.where(full, key=key)
            return UserError(message, file=doc.file, line=line, col=col, field=dotted(loc) or None, hint=hint)
    # Not written anywhere (a default, or a missing required field): point at the closest parent.
    best: tuple[int, int] | tuple[None, None] = (None, None)
    best_len = -1
    for prefix in prefixes:
        for cut in range(len(loc), -1, -1):
            full = prefix + tuple(loc[:cut])
            if full in doc.value_pos and len(full) > best_len:
                best, best_len = doc.value_pos[full], len(full)
                break
    return UserError(message, file=doc.file, line=best[0], col=best[1], field=dotted(loc) or None, hint=hint)


def pick_experiment(jobs: list[Job], experiment: str | None, file: str | Path) -> Job:
    """The one experiment to act on: the one named, or the file's only one."""
    if experiment:
        jobs = [j for j in jobs if j.name == experiment]
        if not jobs:
            raise UserError(f"no experiment named {experiment!r}", file=str(file), field="experiment")
    if len(jobs) > 1:
        raise UserError(f"{file} has {len(jobs)} experiments", file=str(file),
                        hint="pick one with --experiment: " + ", ".join(j.name for j in jobs))
    return jobs[0]


def load_jobs(path: str | Path, sets: list[str] | None = None) -> list[Job]:
    """Load every experiment in a job file, with ``--set a.b=value`` overrides applied.

    Raises ``UserErrors`` listing every problem found (all experiments are checked).
    """
    doc = load_file(path)
    return jobs_from_doc(doc, sets or [])


def jobs_from_doc(doc: Doc, sets: list[str]) -> list[Job]:
    data = doc.data
    if not isinstance(data, dict):
        raise UserErrors([doc.error((), "a job file must be a mapping of fields")])
    parsed_sets = [_parse_set(text) for text in sets]
    errors: list[UserError] = []
    entries: list[tuple[dict, tuple[Path_, ...]]] = []
    if "experiments" in data:
        extra = set(data) - FILE_KEYS - {"name", "description"}
        for key in sorted(extra):
            errors.append(doc.error((key,), f"unknown key {key!r} beside experiments:",
                                    key=True, hint="put shared fields under defaults:"))
        defaults = data.get("defaults") or {}
        experiments = data["experiments"]
        if not isinstance(defaults, dict):
            errors.append(doc.error(("defaults",), "defaults must be a mapping"))
            defaults = {}
        if not isinstance(experiments, list) or not experiments:
            errors.append(doc.error(("experiments",), "experiments must be a non-empty list"))
            experiments = []
        for i, exp in enumerate(experiments):
            if not isinstance(exp, dict):
                errors.append(doc.error(("experiments", i), "each experiment must be a mapping"))
                continue
            entries.append((_deep_merge(defaults, exp), (("experiments", i), ("defaults",))))
    else:
        if "defaults" in data:
            errors.append(doc.error(("defaults",), "defaults: only makes sense with experiments:", key=True))
        entries.append((dict(data), ((),)))

    jobs: list[Job] = []
    for merged, prefixes in entries:
        overrides: dict[Path_, str] = {}
        for set_path, value, text in parsed_sets:
            _assign(merged, set_path, value)
            overrides[set_path] = text
        try:
            spec = Experiment.model_validate(merged)
        except ValidationError as exc:
            errors.extend(_convert(exc, doc, prefixes, overrides))
            continue
        jobs.append(Job(spec=spec, file=doc.file, doc=doc, prefixes=prefixes, overrides=overrides))
    names = [j.name for j in jobs]
    for job in jobs:
        if names.count(job.name) > 1:
            errors.append(job.error(("name",), f"experiment name {job.name!r} is used more than once"))
    if errors:
        raise UserErrors(_unique(errors))
    return jobs


def _unique(errors: list[UserError]) -> list[UserError]:
    seen, out = set(), []
    for e in errors:
        if e.render() not in seen:
            seen.add(e.render())
            out.append(e)
    return out


_SET_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)$", re.S)


def _parse_set(text: str) -> tuple[Path_, Any, str]:
    match = _SET_RE.match(text)
    if not match:
        raise UserErrors([UserError("expected FIELD.PATH=VALUE, e.g. data.seq_len=2048", file=f"--set {text}")])
    dotted_path, raw = match.groups()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    path = tuple(int(p) if p.isdigit() else p for p in dotted_path.split("."))
    return path, value, text


def _assign(data: dict, path: Path_, value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            continue
        if not isinstance(node, dict):
            return  # validation reports the type problem at the parent
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, dict):
        node[path[-1]] = value
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _convert(exc: ValidationError, doc: Doc, prefixes: tuple[Path_, ...], overrides: dict) -> list[UserError]:
    # A value that fails every member of a union yields one error per member: merge them.
    grouped: dict[Path_, list[dict]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(tuple(p for p in err["loc"] if not _is_union_tag(p)), []).append(err)
    errors = []
    for loc, group in grouped.items():
        err = dict(group[0])
        if len(group) > 1 and all(e["type"] not in ("extra_forbidden", "missing") for e in group):
            parts = list(dict.fromkeys(_short(e["msg"]) for e in group))
            err["msg"] = " or ".join([parts[0]] + [p.removeprefix("Input should be ") for p in parts[1:]])
            err["type"] = "union"
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            choices = _field_names(Experiment, loc[:-1])
            near = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else (
                f"known fields: {', '.join(sorted(choices))}" if choices else None)
            errors.append(_locate(doc, prefixes, overrides, loc, f"unknown field {key!r}", key=True, hint=hint))
        elif kind == "missing":
            errors.append(_locate(doc, prefixes, overrides, loc, "required field is missing"))
        else:
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            elif kind.startswith(("literal_error", "enum")):
                message = f"{message}, got {err.get('input')!r}"
            named = re.match(r"([a-z_]+): |([a-z_]+(?:\.[a-z_]+)+):? ", message) if not loc else None
            if named:  # a check across fields names the field it is about first: point there
                loc, message = tuple((named.group(1) or named.group(2)).split(".")), message[named.end():]
            errors.append(_locate(doc, prefixes, overrides, loc, message))
    return errors


def _short(message: str) -> str:
    message = message.removeprefix("Value error, ")
    return message.split(", unable to parse")[0]


def _is_union_tag(part: Any) -> bool:
    """Pydantic inserts the tried union member into ``loc`` (``'int'``, ``literal['auto']``)."""
    return isinstance(part, str) and (
        part in {"int", "str", "float", "bool", "list[str]", "dict[str,union[int,bool]]", "function-after[_positive(), int]"}
        or part.startswith(("literal[", "function-", "constrained-", "json-or-python[", "nullable[", "lax-or-strict["))
        or part.endswith("Spec") and part[0].isupper()
    )


def _field_names(model: type[BaseModel], loc: Path_) -> list[str]:
    """Field names of the model found at ``loc`` below ``model`` (for did-you-mean)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            current = _unwrap_list(current)
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    names = list(getattr(current, "model_fields", {}) or {})
    if current is Experiment and loc == ():
        names += sorted(FILE_KEYS)
    return names


def _unwrap_list(tp: Any) -> Any:
    for arg in typing.get_args(tp) or ():
        inner = _model_in(arg)
        if inner is not None:
            return inner
    return tp


def _model_in(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def resolve_shape(job: Job) -> presets.ModelShape:
    """The model's shape from its preset, its local config.json, or a hub id's cached config."""
    model = job.spec.model
    if model.preset:
        shape = presets.lookup_preset(model.preset)
        if shape is None:
            names = list(presets.PRESETS) + [f"d{n}" for n in (12, 16, 20, 24)]
            near = difflib.get_close_matches(model.preset, names, n=1)
            raise job.error(("model", "preset"), f"unknown preset {model.preset!r}",
                            hint=f"did you mean {near[0]!r}?" if near else "presets: " + ", ".join(presets.preset_names()))
    elif model.path:
        directory = job.resolve_path(model.path)
        if not (directory / "config.json").is_file():
            raise job.error(("model", "path"), f"no config.json in {directory}",
                            hint="point model.path at a Hugging Face model directory")
        try:
            shape = presets.shape_from_dir(directory)
        except (KeyError, ValueError) as exc:
            raise job.error(("model", "path"), f"cannot read {directory / 'config.json'}: {exc}") from None
    else:
        shape = _shape_from_hub_cache(model.hub)
        if shape is None and model.shape:
            shape = presets.lookup_preset(model.shape)
            if shape is None:
                raise job.error(("model", "shape"), f"unknown preset {model.shape!r}",
                                hint="presets: " + ", ".join(presets.preset_names()))
        if shape is None:
            raise job.error(("model", "hub"), f"cannot read the config of {model.hub!r} (not cached and hub unreachable)",
                            hint="download it once, point model.path at a local copy, or set model.shape to a preset")
    try:
        return presets.with_overrides(shape, dict(model.overrides))
    except TypeError as exc:
        raise job.error(("model", "overrides"), str(exc)) from None


def _shape_from_hub_cache(repo_id: str | None) -> presets.ModelShape | None:
    """Read config.json of a hub model from the local Hugging Face cache only (no network)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(found, str):
        return presets.shape_from_dir(Path(found).parent)
    return None


def check_job(job: Job, known_hosts: list[str] | None = None) -> list[UserError]:
    """Checks that need the filesystem or the inventory: presets, data files, context, hosts."""
    errors: list[UserError] = []
    spec = job.spec
    try:
        shape = resolve_shape(job)
    except UserError as exc:
        errors.append(exc)
        shape = None
    if shape is not None:
        if spec.data.seq_len and spec.data.seq_len > shape.max_positions:
            errors.append(job.error(("data", "seq_len"),
                                    f"seq_len {spec.data.seq_len} exceeds the model's context of {shape.max_positions}",
                                    hint="lower seq_len or set model.overrides.max_positions"))
        for i, stage in enumerate(spec.curriculum):
            if stage.seq_len > shape.max_positions:
                errors.append(job.error(("curriculum", i, "seq_len"),
                                        f"stage seq_len {stage.seq_len} exceeds the model's context of {shape.max_positions}",
                                        hint="lower the stage's seq_len or set model.overrides.max_positions"))
    datas: list[tuple[Path_, DataSpec]] = [(("data",), spec.data)]
    datas += [(("phases", i, "data"), p.data) for i, p in enumerate(spec.phases) if p.data]
    for base, data in datas:
        for i, source in enumerate(data.sources):
            if source.path and not job.resolve_path(source.path).exists():
                errors.append(job.error(base + ("sources", i, "path"),
                                        f"data file not found: {job.resolve_path(source.path)}"))
    if known_hosts is not None:
        for i, host in enumerate(spec.hosts):
            if host not in known_hosts:
                near = difflib.get_close_matches(host, known_hosts, n=1)
                errors.append(job.error(("hosts", i), f"unknown host {host!r}",
                                        hint=f"did you mean {near[0]!r}?" if near else
                                        f"hosts in the inventory: {', '.join(known_hosts)}"))
    return errors
