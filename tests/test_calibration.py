"""Calibration: measured throughput replaces the catalog's assumption, nearest shape scaled by FLOPs per token."""

from pathlib import Path

import pytest

from runner.calibration import Calibration, Observation
from runner.hosts import Host, Inventory
from runner.plan import plan_job
from runner.presets import lookup_preset
from runner.spec import load_jobs

ROOT = Path(__file__).resolve().parents[1]
D12, D16, TINY = lookup_preset("d12"), lookup_preset("d16"), lookup_preset("tiny")


def obs(host="a100-1", shape=D12, seq=1024, rate=100_000.0, *, profile="a100-80gb", precision="bf16", kind="run",
        at=1.0, peak=None, overhead=0.0):
    return Observation(host=host, profile=profile, shape=shape, seq_len=seq, precision=precision, tokens_per_s=rate,
                       peak_bytes=peak, overhead_s=overhead, kind=kind, at=at)


def test_exact_shape_averages_the_runs_and_says_so():
    cal = Calibration((obs(rate=90_000, peak=10), obs(rate=110_000, peak=12), obs(rate=100_000, kind="probe")))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.tokens_per_s == pytest.approx(100_000)
    assert m.source == "calibrated from 1 probe and 2 runs on a100-1"
    assert m.peak_bytes == 12


def test_nothing_measured_leaves_the_catalog_default():
    cal = Calibration((obs(),))
    assert cal.measured("h100", "h100-80gb", D12, 1024, "bf16") is None
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "fp32") is None  # another precision is another speed
    assert Calibration(()).measured("a100-1", "a100-80gb", D12, 1024, "bf16") is None


def test_nearest_shape_is_scaled_by_flops_per_token():
    cal = Calibration((obs(shape=D12, seq=1024, rate=120_000), obs(shape=TINY, seq=128, rate=1e6)))
    m = cal.measured("a100-1", "a100-80gb", D16, 2048, "bf16")
    expected = 120_000 * D12.flops_per_token(1024) / D16.flops_per_token(2048)
    assert m.tokens_per_s == pytest.approx(expected)
    assert m.source.startswith("calibrated from 1 run on a100-1; nearest shape ")
    assert m.source.endswith("scaled by FLOPs per token")
    assert m.peak_bytes is None  # memory is only taken from the same shape


def test_another_host_with_the_same_profile_is_used_when_this_one_has_nothing():
    m = Calibration((obs(host="a100-2"), obs(host="a100-3"))).measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.source == "calibrated from 2 runs on a100-2, a100-3 (same profile a100-80gb)"


def test_only_the_newest_observations_count():
    old = [obs(rate=10_000, at=i) for i in range(5)]
    new = [obs(rate=100_000, at=10 + i) for i in range(5)]
    assert Calibration(tuple(old + new)).measured("a100-1", "a100-80gb", D12, 1024, "bf16").tokens_per_s == 100_000


def test_plan_uses_the_calibrated_rate_and_the_hosts_fixed_overhead():
    job = load_jobs(ROOT / "jobs" / "quickstart.yaml")[0]
    inventory = Inventory({"local": Host(name="local", kind="local", profile="cpu")}, None)
    default = plan_job(job, "local", inventory=inventory)
    assert default.throughput_source.startswith("catalog default")
    cal = Calibration((obs("local", TINY, 128, 10_000, profile="cpu", precision="fp32", kind="probe", overhead=6.0),))
    plan = plan_job(job, "local", inventory=inventory, throughput=cal)
    assert plan.throughput_source == "calibrated from 1 probe on local"
    assert plan.seconds == pytest.approx(plan.tokens / 10_000 + 6.0)
