"""Calibration: measured throughput replaces the catalog's assumption, nearest shape scaled by FLOPs per token."""

from dataclasses import replace
from pathlib import Path

import pytest

from runner.calibration import Calibration, Observation
from runner.hosts import Host, Inventory
from runner.plan import plan_job
from runner.presets import lookup_preset
from runner.spec import load_jobs

ROOT = Path(__file__).resolve().parents[1]
D12, D16, TINY = lookup_preset("d12"), lookup_preset("d16"), lookup_preset("tiny")
GiB = 2**30


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


def test_runs_trained_another_way_do_not_calibrate_a_plan():
    cal = Calibration((replace(obs(rate=300_000), lora=True), replace(obs(rate=50_000), gradient_checkpointing=True),
                       replace(obs(rate=400_000), gpus=4), replace(obs(rate=200_000), compile=True)))
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16") is None
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", lora=True).tokens_per_s == 300_000
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", gpus=4).tokens_per_s == 400_000
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", compile=True).tokens_per_s == 200_000


def test_one_slow_outlier_does_not_drag_the_calibrated_rate():
    cal = Calibration((obs(rate=100_000, at=1), obs(rate=104_000, at=2), obs(rate=9_000, kind="probe", at=3)))
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16").tokens_per_s == 100_000


def test_a_measured_peak_counts_only_for_the_same_micro_batch():
    cal = Calibration((replace(obs(peak=30 * GiB), micro_batch=16),))
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", micro_batch=16).peak_bytes == 30 * GiB
    assert cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", micro_batch=8).peak_bytes is None


def quickstart_on_cpu(*sets):
    job = load_jobs(ROOT / "jobs" / "quickstart.yaml", list(sets))[0]
    return job, Inventory({"local": Host(name="local", kind="local", profile="cpu", memory="8GiB")}, None)


def cpu_obs(seq, rate, *, peak=None, micro_batch=16, overhead=0.0):
    return replace(obs("local", TINY, seq, rate, profile="cpu", precision="fp32", kind="probe", peak=peak,
                       overhead=overhead), micro_batch=micro_batch)


def test_each_curriculum_stage_takes_the_rate_measured_at_its_sequence_length():
    job, inventory = quickstart_on_cpu(
        "curriculum=[{seq_len: 64, batch_size: 16, share: 0.5}, {seq_len: 128, batch_size: 16, share: 0.5}]",
        "data.seq_len=null")
    cal = Calibration((cpu_obs(64, 20_000, overhead=5.0), cpu_obs(128, 10_000, overhead=7.0)))
    plan = plan_job(job, "local", inventory=inventory, throughput=cal)
    short, long_ = plan.stages
    expected = short.steps * short.tokens_per_step() / 20_000 + long_.steps * long_.tokens_per_step() / 10_000 + 7.0
    assert plan.seconds == pytest.approx(expected)  # start-up is paid once, not per stage
    assert plan.throughput_source == "calibrated from 1 probe on local"


def test_a_measured_peak_over_capacity_refuses_the_plan_and_one_above_the_estimate_warns():
    job, inventory = quickstart_on_cpu()
    estimate = plan_job(job, "local", inventory=inventory).memory
    over = Calibration((cpu_obs(128, 10_000, peak=estimate.capacity_bytes + GiB),))
    plan = plan_job(job, "local", inventory=inventory, throughput=over)
    assert not plan.passes and plan.fits  # the model said it fits; the measurement says it does not
    assert plan.reasons[0].startswith("measured peak ") and "calibrated from 1 probe on local" in plan.reasons[0]
    above = Calibration((cpu_obs(128, 10_000, peak=int(estimate.peak_bytes * 1.3)),))
    plan = plan_job(job, "local", inventory=inventory, throughput=above)
    assert plan.passes and any("30% above the estimate" in w for w in plan.warnings)
    other_batch = Calibration((cpu_obs(128, 10_000, peak=estimate.capacity_bytes + GiB, micro_batch=64),))
    assert plan_job(job, "local", inventory=inventory, throughput=other_batch).passes


def affine_rate(micro_batch, seq, *, fixed_s, tokens_per_s):
    """tokens/s of a host whose micro-batch costs ``fixed_s`` plus its tokens at ``tokens_per_s``."""
    tokens = micro_batch * seq
    return tokens / (fixed_s + tokens / tokens_per_s)


def at_batch(micro_batch, rate, **kw):
    return replace(obs(rate=rate, **kw), micro_batch=micro_batch)


def test_two_micro_batches_give_a_fixed_cost_per_micro_batch_that_predicts_a_third():
    # Like llama-7b LoRA on an H100: ~124 ms per micro-batch whatever its size, then ~8.8k tokens/s.
    truth = dict(fixed_s=0.124, tokens_per_s=8_800)
    noisy = [at_batch(mb, affine_rate(mb, 1024, **truth) * wobble, at=i)
             for i, (mb, wobble) in enumerate([(8, 1.03), (8, 0.98), (8, 1.0), (32, 0.97), (32, 1.01)])]
    m = Calibration(tuple(noisy)).measured("a100-1", "a100-80gb", D12, 1024, "bf16", micro_batch=2)
    step_s = 0.124 + 2 * 1024 / 8_800
    assert m.seconds(2 * 1024, 1) == pytest.approx(step_s, rel=0.05)
    assert m.micro_batch_s == pytest.approx(0.124, rel=0.15)
    proportional = 2 * 1024 / affine_rate(32, 1024, **truth)
    assert proportional < 0.7 * step_s  # what the rate measured at micro-batch 32 alone would have said
    assert m.source == "calibrated from 5 runs on a100-1 at 2 micro-batches (111 ms fixed per micro-batch)"


def test_one_micro_batch_keeps_the_rate_proportional_to_the_tokens():
    cal = Calibration((at_batch(16, 90_000), at_batch(16, 100_000, at=2), at_batch(16, 120_000, at=3)))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16", micro_batch=4)
    assert m.tokens_per_s == 100_000 and m.micro_batch_s == 0
    assert m.seconds(10**6, 1000) == pytest.approx(10**6 / 100_000)
    assert m.source == "calibrated from 3 runs on a100-1"


def test_micro_batches_that_fit_a_negative_fixed_cost_fall_back_to_proportional():
    # The small micro-batch ran faster per token than the large one: noise, or a slow large run.
    cal = Calibration((at_batch(4, 120_000, at=1), at_batch(16, 100_000, at=2)))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.micro_batch_s == 0 and m.tokens_per_s == pytest.approx(110_000)
    assert m.source == "calibrated from 2 runs on a100-1 at 2 micro-batches (proportional: they fit no positive fixed cost)"


def test_a_step_that_does_not_shrink_with_the_micro_batch_is_host_bound_up_to_the_largest_measured():
    # Like llama-1b in eager mode on an H200: 120 ms at micro-batch 2, 110 ms at 8, and 112 ms at 4.
    cal = Calibration((at_batch(2, 2 * 1024 / 0.1197, at=1), at_batch(8, 8 * 1024 / 0.1102, at=2)))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.seconds(4 * 1024, 1) == pytest.approx(0.1102)  # a proportional rate would say 55 ms
    assert m.seconds(8 * 1024 * 10, 10) == pytest.approx(10 * 0.1102)
    assert m.seconds(32 * 1024, 1) == pytest.approx(4 * 0.1102)  # beyond the largest measured, the GPU sets the pace
    assert m.source == ("calibrated from 2 runs on a100-1 at 2 micro-batches "
                        "(bound by the host: 110 ms per micro-batch up to micro-batch 8)")


def test_three_micro_batches_show_a_knee_below_which_the_host_sets_the_pace():
    # llama-1b with checkpointing at seq 1024 on an H200: 204, 206 and 363 ms at micro-batches 3, 7 and 14.
    times = {3: 0.2039, 7: 0.2055, 14: 0.3628}
    cal = Calibration(tuple(at_batch(mb, mb * 1024 / s, at=i) for i, (mb, s) in enumerate(times.items())))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    for mb, seconds in times.items():  # through all three: the line through all would miss 7 by 27%
        assert m.seconds(mb * 1024, 1) == pytest.approx(seconds, rel=1e-6)
    assert m.seconds(5 * 1024, 1) == pytest.approx(0.2039)  # on the floor
    assert m.seconds(10 * 1024, 1) == pytest.approx(0.2055 + 3 / 7 * (0.3628 - 0.2055))  # on the line
    assert m.seconds(28 * 1024, 1) == pytest.approx(0.2055 + 3 * (0.3628 - 0.2055))  # and beyond it
    assert m.seconds(3 * 1024 * 10, 10) == pytest.approx(10 * 0.2039)
    assert m.source == ("calibrated from 3 runs on a100-1 at 3 micro-batches (bound by the host below a knee: "
                        "at least 204 ms per micro-batch, then 48 ms fixed per micro-batch)")


def test_three_micro_batches_on_a_line_within_noise_are_fitted_as_a_line():
    truth = dict(fixed_s=0.05, tokens_per_s=100_000)
    wobbles = {4: 1.03, 8: 0.98, 16: 1.01}  # the smallest 3% slow: noise, not a floor
    cal = Calibration(tuple(at_batch(mb, affine_rate(mb, 1024, **truth) / w, at=mb) for mb, w in wobbles.items()))
    m = cal.measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.floor_s == 0 and m.micro_batch_s == pytest.approx(0.05, rel=0.2)
    assert m.source.startswith("calibrated from 3 runs on a100-1 at 3 micro-batches (")
    assert "ms fixed per micro-batch)" in m.source and "knee" not in m.source


def test_the_newest_at_each_micro_batch_are_fitted_so_an_old_small_batch_still_counts():
    truth = dict(fixed_s=0.05, tokens_per_s=100_000)
    small = [at_batch(2, affine_rate(2, 1024, **truth), at=0)]
    large = [at_batch(16, affine_rate(16, 1024, **truth), at=10 + i) for i in range(8)]
    m = Calibration(tuple(small + large)).measured("a100-1", "a100-80gb", D12, 1024, "bf16")
    assert m.micro_batch_s == pytest.approx(0.05) and m.tokens_per_s == pytest.approx(100_000)
    assert m.source.startswith("calibrated from 6 runs on a100-1 at 2 micro-batches")


def test_the_plan_pays_the_fixed_cost_per_micro_batch_and_says_it_was_fitted():
    job, inventory = quickstart_on_cpu("train.grad_accum=2")
    truth = dict(fixed_s=0.05, tokens_per_s=20_000)
    cal = Calibration((cpu_obs(128, affine_rate(16, 128, **truth), micro_batch=16, overhead=3.0),
                       cpu_obs(128, affine_rate(4, 128, **truth), micro_batch=4, overhead=3.0)))
    plan = plan_job(job, "local", inventory=inventory, throughput=cal)
    assert plan.throughput_source == "calibrated from 2 probes on local at 2 micro-batches (50 ms fixed per micro-batch)"
    micro_batches = plan.steps * plan.grad_accum
    assert plan.seconds == pytest.approx(micro_batches * 0.05 + plan.tokens / 20_000 + 3.0)
