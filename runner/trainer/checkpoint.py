"""Checkpoints: written whole or not at all, verified by a manifest, the newest intact one resumed.

Layout of ``RUN_DIR/checkpoints/step-NNNNNNN/`` (N = optimizer steps done):
``model.safetensors`` (adapter weights only for LoRA), ``config.json``,
``optimizer.pt``, ``state.json`` (step, tokens, data position, RNG states, best
eval, loss scaler) and ``manifest.json`` (relative path, size and sha256 of every
other file). Files are written into a hidden temporary directory, fsynced, and
the directory is renamed into place, so a crash leaves either the whole
checkpoint or none; the manifest catches anything the filesystem still lost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
# Test hook: seconds to sleep inside a checkpoint write, before the rename (lets a test kill -9 there).
SLEEP_ENV = "RUNNER_TEST_CHECKPOINT_SLEEP_S"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def write(run_dir: Path, step: int, writers: dict[str, Callable[[Path], None]], keep_last: int) -> Path:
    """Write one checkpoint atomically; each writer writes the file at the path it is given."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, writer in writers.items():
        writer(tmp / name)
    if os.environ.get(SLEEP_ENV):
        time.sleep(float(os.environ[SLEEP_ENV]))
    entries = []
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        entries.append({"path": path.relative_to(tmp).as_posix(), "size": path.stat().st_size, "sha256": _sha256(path)})
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": entries}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # reached again after resuming from an older one; this write replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    _prune(root, keep_last)
    return final


def verify(path: Path) -> bool:
    """True when every file the manifest lists is present with its size and sha256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for entry in manifest["files"]:
            file = path / entry["path"]
            if not file.is_file() or file.stat().st_size != entry["size"] or _sha256(file) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def latest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (corrupt or partial ones are skipped)."""
    for path in reversed(_step_dirs(checkpoint_dir(run_dir))):
        if verify(path):
            return path
    return None


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep_last: int) -> None:
    for old in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Python, numpy, torch and accelerator RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if torch.backends.mps.is_available():
        state["mps"] = _b64(torch.mps.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(_unb64(state["mps"]))


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """A torch optimizer state dict (parameters by position) keyed by parameter name, as FSDP saves it.

    ``names[i]`` is the name of the optimizer's i-th parameter, counted over its groups in order.
    """
    return {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_index(state: dict, names: list[str]) -> dict:
    """The inverse of ``optimizer_by_name``: what ``Optimizer.load_state_dict`` reads."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
