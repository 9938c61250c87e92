"""Safe YAML loading that remembers where every value came from.

Job files and host inventories are read through here so that any later error can
name ``FILE:LINE:COL``. Alias expansion is bounded: a billion-laughs document
fails after a fixed number of nodes instead of eating memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.errors import UserError

Path_ = tuple[str | int, ...]

MAX_NODES = 200_000  # generous for any real job file; a billion-laughs bomb exceeds it at once
MAX_BYTES = 4 * 2**20
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


@dataclass
class Doc:
    """A loaded YAML document: plain data plus the position of each key and value."""

    data: Any
    file: str
    value_pos: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    key_pos: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> tuple[int | None, int | None]:
        """Line and column of ``path``, falling back to the nearest enclosing node."""
        table = self.key_pos if key else self.value_pos
        probe = tuple(path)
        while True:
            if probe in table:
                return table[probe]
            if probe in self.value_pos:
                return self.value_pos[probe]
            if not probe:
                return (None, None)
            probe = probe[:-1]

    def error(self, path: Path_, message: str, *, key: bool = False, hint: str | None = None) -> UserError:
        line, col = self.where(path, key=key)
        return UserError(message, file=self.file, line=line, col=col, field=dotted(path) or None, hint=hint)


def dotted(path: Path_) -> str:
    """``('experiments', 2, 'data', 'seq_len')`` -> ``experiments[2].data.seq_len``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def load_file(path: str | Path) -> Doc:
    """Load one YAML file; any problem is a UserError naming the file."""
    path = Path(path)
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("file not found", file=name) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", file=name) from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"file is {len(raw)} bytes; job and host files are limited to {MAX_BYTES}", file=name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {exc.start})", file=name) from None
    return load_text(text, name)


def load_text(text: str, name: str = "<string>") -> Doc:
    """Load YAML text; ``name`` is what error messages call it."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character PyYAML will not read
        raise UserError(f"YAML error: {exc.reason}", file=name) from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = exc.problem or exc.context or "invalid YAML"
        raise UserError(f"YAML syntax error: {problem}", file=name, line=line, col=col) from None
    except yaml.reader.ReaderError as exc:
        raise UserError(f"YAML error: {exc.reason}", file=name) from None
    except yaml.YAMLError as exc:
        raise UserError(f"YAML error: {exc}", file=name) from None
    finally:
        loader.dispose()
    doc = Doc(data=None, file=name)
    if node is None:
        doc.data = {}
        return doc
    builder = _Builder(loader, doc)
    doc.data = builder.build(node, ())
    return doc


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, doc: Doc):
        self.loader = loader
        self.doc = doc
        self.count = 0

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise UserError(
                f"document expands to more than {MAX_NODES} nodes (alias bomb?)",
                file=self.doc.file, line=node.start_mark.line + 1, col=node.start_mark.column + 1,
            )
        self.doc.value_pos.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
            raise UserError(f"unsupported tag {node.tag}", file=self.doc.file,
                            line=node.start_mark.line + 1, col=node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise UserError(f"cannot read value: {exc.problem}", file=self.doc.file,
                            line=node.start_mark.line + 1, col=node.start_mark.column + 1) from None

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        out: dict = {}
        merged: list[yaml.MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                merged.extend(s for s in sources if isinstance(s, yaml.MappingNode))
                continue
            key = self.loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise UserError(f"keys must be strings, got {key!r}", file=self.doc.file,
                                line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1,
                                field=dotted(path) or None)
            key = str(key)
            if key in out:
                raise UserError(f"duplicate key {key!r}", file=self.doc.file,
                                line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1,
                                field=dotted(path + (key,)))
            self.doc.key_pos[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, path + (key,))
        for source in merged:
            extra = self._mapping(source, path)
            for key, value in extra.items():
                out.setdefault(key, value)
        return out
