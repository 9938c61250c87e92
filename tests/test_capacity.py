"""The capacity table: tokens a host reaches in the time given per probed configuration, and what to train there."""

import json

import pytest

from runner.capacity import ProbeResult, capacity, capacity_table, steady_tokens_per_s
from runner.presets import lookup_preset

GiB = 2**30


def probed(model, seq, rate, *, outcome="ok", peak=10 * GiB, capacity_bytes=20 * GiB):
    return ProbeResult(host="box", profile="rtx-4090", model=model, shape=lookup_preset(model), seq_len=seq,
                       micro_batch=8, grad_accum=1, precision="bf16", steps=30, tokens=30 * 8 * seq,
                       tokens_per_s=rate if outcome == "ok" else None, step_s=None, wall_s=60.0, peak_bytes=peak,
                       capacity_bytes=capacity_bytes, outcome=outcome, detail="", versions={"runner": "0.1.0"},
                       probed_at=1.0)


def test_primary_is_the_largest_model_that_reaches_20_tokens_per_param_and_fallback_the_next_smaller():
    # In 24h: d12 (~186M params) at 100k tokens/s trains 8.6B tokens (46 per param); d16 (~337M) at 60k
    # trains 5.2B (15 per param, short of 20); d14 (~254M) at 75k trains 6.5B (25 per param).
    found = [probed("d12", 1024, 100_000), probed("d14", 1024, 75_000), probed("d16", 1024, 60_000)]
    cap = capacity(found, hours=24)
    assert cap.primary.result.model == "d14" and cap.fallback.result.model == "d12"
    assert cap.primary.tokens == 75_000 * 24 * 3600
    assert cap.recommendation().startswith("recommended on box for 24h: d14 at seq 1024")
    # Given twice the time, d16 reaches the rule too.
    assert capacity(found, hours=48).primary.result.model == "d16"


def test_configurations_that_ran_out_of_memory_diverged_or_went_over_capacity_are_never_recommended():
    found = [probed("d12", 1024, 100_000), probed("d14", 1024, 0, outcome="oom"),
             probed("d16", 1024, 90_000, peak=25 * GiB), probed("d18", 1024, 0, outcome="diverged")]
    cap = capacity(found, hours=24)
    assert cap.primary.result.model == "d12" and cap.fallback is None
    table = capacity_table(cap)
    stable = [cell for cell in table.columns[8]._cells]
    assert stable == ["yes", "oom", "over capacity", "diverged"]


def test_when_nothing_reaches_the_rule_the_closest_is_primary_and_nothing_clean_means_no_recommendation():
    found = [probed("d16", 1024, 10_000), probed("d20", 1024, 5_000)]
    assert capacity(found, hours=24).primary.result.model == "d16"
    none = capacity([probed("d12", 1024, 0, outcome="error")], hours=24)
    assert none.primary is None and "no recommendation" in none.recommendation()


def test_a_probe_that_cannot_run_is_refused_before_anything_starts(tmp_path):
    from runner.capacity import probe
    from runner.errors import UserError
    from runner.store import Store

    store = Store.open(tmp_path / "runs.db")
    try:
        with pytest.raises(UserError, match="context of 512 tokens; seq 1024"):
            probe(store, "local", ["tiny"], [512, 1024], steps=5)
        with pytest.raises(UserError, match="at least one step"):
            probe(store, "local", ["tiny"], [128], steps=0)
        assert store.runs() == [] and not (tmp_path / "probes").exists()
    finally:
        store.close()


def test_a_probes_rate_leaves_out_its_first_logged_steps_where_compilation_and_start_up_are_paid(tmp_path):
    # Windows of 8 steps of 16,384 tokens: the first took 40 s (torch.compile), the next 1.0 s and 1.2 s.
    window = 8 * 16_384
    seconds = [40.0, 1.0, 1.2]
    events = [{"event": "eval", "step": 0, "eval_loss": 9.1}]
    events += [{"event": "train", "step": 8 * (i + 1), "tokens": window * (i + 1), "tokens_per_s": window / s}
               for i, s in enumerate(seconds)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert steady_tokens_per_s(tmp_path) == pytest.approx(2 * window / 2.2)

    # One window alone is all start-up and steps mixed: no steady rate (the probe keeps the run's own).
    (tmp_path / "metrics.jsonl").write_text(json.dumps(events[1]) + "\n")
    assert steady_tokens_per_s(tmp_path) is None
    assert steady_tokens_per_s(tmp_path / "missing") is None
