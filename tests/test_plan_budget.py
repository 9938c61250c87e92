"""Budgets: steps from tokens, the reference tables, curricula, epochs, caps and data coverage."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.hosts import Host, Inventory
from runner.plan import plan_job
from runner.plan.budget import mixture_weights, steps_for_tokens, tokens_per_step
from runner.spec import load_jobs

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = Inventory({"local": Host(name="local", kind="local", profile="cpu"),
                       "a100": Host(name="a100", profile="a100-80gb", price_usd_per_hour=1.29)}, None)


def job_from(tmp_path, text, sets=None):
    (tmp_path / "a.txt").write_text("a" * 4000)
    (tmp_path / "b.txt").write_text("b" * 400)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_jobs(path, sets)[0]


BASE = """\
name: t
model: gpt2-124m
data:
  sources: [{path: a.txt, tokens: 1M}, {path: b.txt, tokens: 100k}]
  seq_len: 1024
train: {batch_size: 8}
budget: {tokens: 100M}
"""


@pytest.mark.parametrize("micro_batch, seq_len, steps", [
    (8, 1024, 12_207), (6, 1536, 10_850), (4, 2048, 12_207),
    (16, 256, 24_414), (8, 512, 24_414), (4, 1024, 24_414), (6, 768, 21_701),
])
def test_reference_table_for_a_100m_budget(micro_batch, seq_len, steps):
    assert steps_for_tokens(100_000_000, tokens_per_step(micro_batch, seq_len)) == steps


@pytest.mark.parametrize("micro_batch, seq_len, steps", [(8, 1024, 12_207), (6, 1536, 10_850), (6, 768, 21_701)])
def test_the_planner_reproduces_the_reference_table(tmp_path, micro_batch, seq_len, steps):
    job = job_from(tmp_path, BASE.replace("seq_len: 1024", f"seq_len: {seq_len}").replace(
        "batch_size: 8", f"batch_size: {micro_batch}"))
    plan = plan_job(job, "a100", inventory=INVENTORY)
    assert plan.steps == steps and plan.stages[0].steps == steps
    assert plan.tokens == steps * micro_batch * seq_len


def test_tokens_per_step_counts_accumulation_and_gpus():
    assert tokens_per_step(8, 1024, grad_accum=4, gpus=2) == 8 * 1024 * 4 * 2


def test_a_budget_that_is_not_a_multiple_of_the_step_warns(tmp_path):
    job = job_from(tmp_path, BASE.replace("tokens: 100M", "tokens: 100k").replace("batch_size: 8", "batch_size: 64"))
    plan = plan_job(job, "a100", inventory=INVENTORY)
    assert plan.steps == 1 and plan.budget_used_share == pytest.approx(65_536 / 100_000)
    assert any("65.5% of the 100,000-token budget" in w for w in plan.warnings)


def test_a_budget_used_to_the_last_step_does_not_warn(tmp_path):
    plan = plan_job(job_from(tmp_path, BASE), "a100", inventory=INVENTORY)
    assert plan.budget_used_share == pytest.approx(0.99998, abs=1e-4)
    assert not any("budget" in w for w in plan.warnings)


def test_curriculum_stages_split_the_budget_by_share_and_add_up(tmp_path):
    plan = plan_job(load_jobs(ROOT / "jobs" / "curriculum-197m.yaml")[0], "a100", inventory=INVENTORY)
    shares = [0.05, 0.10, 0.20, 0.35, 0.30]
    assert [s.steps for s in plan.stages] == [int(share * 10**9) // 32_768 for share in shares]
    assert plan.steps == sum(s.steps for s in plan.stages)
    assert plan.tokens == plan.steps * 32_768


def test_phases_take_their_share_of_the_tokens():
    job = load_jobs(ROOT / "jobs" / "pretrain-sft-4090-24h.yaml")[0]
    plan = plan_job(job, "a100", inventory=INVENTORY)
    assert [p.name for p in plan.phases] == ["pretrain", "sft"]
    assert sum(p.tokens for p in plan.phases) == pytest.approx(plan.tokens, abs=1)
    assert [c.label for c in plan.phases[1].coverage] == ["qa"]


def test_an_epoch_budget_of_unpacked_samples_counts_one_sequence_per_sample():
    job = load_jobs(ROOT / "jobs" / "lora-llama7b.yaml")[0]
    plan = plan_job(job, "a100", inventory=INVENTORY)
    sequences = int(1602 * 0.98)  # the validation share is held out
    assert plan.steps == -(-3 * sequences // 16)  # 3 epochs at 4 x 4 sequences per step
    assert plan.stages[0].steps is None  # the trainer runs until the epochs are spent


def test_max_steps_caps_the_budget_for_a_quick_test(tmp_path):
    plan = plan_job(job_from(tmp_path, BASE, ["budget.max_steps=100"]), "a100", inventory=INVENTORY)
    assert plan.steps == 100 and plan.tokens == 100 * 8192
    assert any("stops the run at 100 of 12,207 steps" in w for w in plan.warnings)
    assert plan.overrides == ("budget.max_steps=100",)


def test_max_steps_alone_is_a_budget(tmp_path):
    plan = plan_job(job_from(tmp_path, BASE.replace("tokens: 100M", "max_steps: 50")), "a100", inventory=INVENTORY)
    assert plan.steps == 50 and plan.budget_tokens is None


def test_coverage_reports_epochs_per_source_under_the_mixture(tmp_path):
    plan = plan_job(job_from(tmp_path, BASE.replace("tokens: 100M", "tokens: 1.1M").replace("batch_size: 8", "batch_size: 1")),
                    "a100", inventory=INVENTORY)
    a, b = plan.coverage
    assert a.weight == pytest.approx(1 / 1.1) and b.weight == pytest.approx(0.1 / 1.1)
    assert a.size.tokens == 990_000 and a.size.how == "declared tokens"  # 1% validation held out
    assert a.epochs == pytest.approx(a.tokens / 990_000)


def test_undeclared_text_sources_are_estimated_from_file_size(tmp_path):
    plan = plan_job(job_from(tmp_path, BASE.replace(", tokens: 1M", "").replace(", tokens: 100k", "")), "a100",
                    inventory=INVENTORY)
    assert plan.coverage[0].size.tokens == int(4000 / 4 * 0.99) and "file size" in plan.coverage[0].size.how


def test_mixture_proportional_and_sqrt():
    assert mixture_weights([300, 100], "proportional") == [0.75, 0.25]
    assert mixture_weights([400, 100], "sqrt") == pytest.approx([2 / 3, 1 / 3])


def test_mixture_50cap_caps_the_largest_and_shares_the_excess_proportionally():
    assert mixture_weights([90, 6, 4], "50cap") == pytest.approx([0.5, 0.3, 0.2])
    assert mixture_weights([40, 35, 25], "50cap") == pytest.approx([0.4, 0.35, 0.25])
    assert mixture_weights([7], "50cap") == [1.0]


def test_explicit_weights_are_normalised():
    assert mixture_weights([1, 1], "weights", [3, 1]) == [0.75, 0.25]
    with pytest.raises(ValueError):
        mixture_weights([1, 1], "weights", [1])


@given(st.lists(st.floats(min_value=0.001, max_value=1e12), min_size=1, max_size=8),
       st.sampled_from(["proportional", "sqrt", "50cap"]))
def test_mixture_weights_always_sum_to_one(sizes, strategy):
    weights = mixture_weights(sizes, strategy)
    assert sum(weights) == pytest.approx(1)
    if strategy == "50cap" and len(sizes) > 1:
        assert max(weights) <= 0.5 + 1e-9


@given(st.integers(1, 10**12), st.integers(1, 10**7))
def test_steps_never_exceed_the_budget(budget, step_tokens):
    steps = steps_for_tokens(budget, step_tokens)
    assert steps * step_tokens <= budget < (steps + 1) * step_tokens
