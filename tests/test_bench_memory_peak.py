"""bench/memory_peak.py: replaying torch's memory history finds the step's peak and what was alive then."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("memory_peak", ROOT / "bench" / "memory_peak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peak = load()
TORCH = "/env/lib/torch"


def frame(path, line, name="forward"):
    return {"filename": path, "line": line, "name": name}


def alloc(addr, size, *frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size}


def test_the_peak_lists_the_live_blocks_by_the_innermost_line_outside_torch():
    layer = frame("/env/lib/transformers/modeling_llama.py", 323)
    trace = [
        alloc(1, 100, frame(f"{TORCH}/nn/modules/linear.py", 125), layer),
        alloc(2, 100, layer),
        free(1, 100),
        alloc(3, 50),  # made by autograd's engine: no python frame
        alloc(4, 400, frame("/repo/runner/trainer/loss.py", 128, "_chunks")),
        free(4, 400),
        alloc(5, 10, layer),
    ]
    result = peak.replay(trace, baseline=1000, torch_dir=TORCH)
    assert result["peak_bytes"] == 1000 + 100 + 50 + 400
    assert result["peak_reached_by"] == "loss.py:128 _chunks"
    assert result["groups"] == [
        {"line": "loss.py:128 _chunks", "blocks": 1, "bytes": 400},
        {"line": "modeling_llama.py:323 forward", "blocks": 1, "bytes": 100},
        {"line": "(no python frame: autograd's engine)", "blocks": 1, "bytes": 50},
    ]


def test_after_the_peaks_largest_block_is_freed_the_later_peak_is_found_on_its_own():
    loss, layer = frame("/repo/runner/trainer/loss.py", 90, "loss"), frame("/env/lib/modeling_gpt2.py", 40)
    trace = [
        alloc(2, 500, loss),  # the same address, used and freed before the peak
        free(2, 500),
        alloc(1, 100, layer),
        alloc(2, 500, loss),  # the logits: the step's peak and its largest block
        free(2, 500),
        alloc(3, 300, layer),  # a recomputed layer: lower than the loss, the backward's own peak
        alloc(4, 50),
        free(3, 300),
        alloc(5, 20, layer),
    ]
    result = peak.replay(trace, baseline=0, torch_dir=TORCH)
    assert (result["peak_bytes"], result["largest_block_bytes"], result["largest_freed_at"]) == (600, 500, 4)
    later = peak.replay(trace, baseline=0, torch_dir=TORCH, start=result["largest_freed_at"])
    assert later["peak_bytes"] == 100 + 300 + 50
    assert later["groups"][0] == {"line": "modeling_gpt2.py:40 forward", "blocks": 2, "bytes": 400}
