"""The speed benchmark runs end to end on the CPU with a tiny model (the real numbers come from a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_speed_benchmark_runs_ours_and_the_hf_trainer_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench/trainer_speed.py", "--device", "cpu", "--tiny", "--steps", "3",
                           "--warmup", "1", "--batch", "2", "--only", "hf,ours", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["results"]] == ["hf", "ours"]
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in report["results"])
    assert "ours/hf" in report["ratios"] and "runner.trainer" in done.stdout
