"""The job-file reference (docs/job-file.md), generated from the schema in runner/spec.py.

Regenerate after changing the schema: ``python -m runner.reference > docs/job-file.md``.
A test fails while the committed file is out of date.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from runner import spec

INTRO = """\
# Job file reference

A job file is YAML. It describes one experiment, or several that share
`defaults:` and are listed under `experiments:` (each gets its own run). Any
field can be overridden on the command line with `--set FIELD.PATH=VALUE`,
validated like the file. Counts accept `100M`, `0.1B`, `2.5k` or integers;
durations accept `24h`, `90m`, `2d` or hours.

```yaml
name: quickstart
model: tiny                       # a preset, or {path: DIR}, or {hub: ID, pretrained: true}
data:
  sources: [{path: ../data/sample/news.jsonl}]
  seq_len: 128
train: {batch_size: 16}
budget: {tokens: 400k, max_hours: 0.5}
hosts: [local]
```

Check a file with `runner validate JOB`, plan it with `runner plan JOB`.
This page is generated from `runner/spec.py` by `python -m runner.reference`.
"""

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("Top level (one experiment)", spec.Experiment),
    ("model", spec.ModelSpec),
    ("data", spec.DataSpec),
    ("data.sources[]", spec.SourceSpec),
    ("train", spec.TrainSpec),
    ("lora", spec.LoraSpec),
    ("budget", spec.BudgetSpec),
    ("curriculum[]", spec.Stage),
    ("phases[]", spec.Phase),
    ("checkpoint", spec.CheckpointSpec),
    ("eval", spec.EvalSpec),
    ("early_stopping", spec.EarlyStopSpec),
]

SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def type_name(tp: Any) -> str:
    """A reader's name for an annotation: ``integer or "auto"``, ``list of string``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        base, *meta = args
        if any(getattr(m, "func", None) in (spec.parse_count,) for m in meta):
            return "count (100M, 0.1B, 5000)"
        if any(getattr(m, "func", None) in (spec.parse_hours,) for m in meta):
            return "duration (24h, 90m, hours)"
        return type_name(base)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return " \\| ".join(f'`{a}`' for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return ""
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(defaults below)"
    if value is None:
        return "—"
    if value == [] or value == {}:
        return "empty"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def render() -> str:
    """The whole reference page as Markdown."""
    parts = [INTRO]
    for title, model in SECTIONS:
        parts.append(f"\n## {title}\n")
        doc = (model.__doc__ or "").strip().splitlines()
        if doc:
            parts.append(doc[0] + "\n")
        parts.append("\n| field | type | default | description |\n|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("\n", " ").replace("|", "\\|")
            parts.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | {description} |\n")
    parts.append("\n## A file with several experiments\n\n"
                 "`defaults:` holds the fields the experiments share; each entry of `experiments:` is merged over it "
                 "(mappings merge key by key, lists replace). Every experiment needs its own `name`.\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
