"""The capacity table: tokens a host reaches in the time given per probed configuration, and what to train there."""

from runner.capacity import ProbeResult, capacity, capacity_table
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
    import pytest

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
