"""The job file: every example loads, and every kind of mistake is located and explained."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.errors import UserError, UserErrors
from runner.spec import check_job, jobs_from_doc, load_jobs
from runner.yamldoc import load_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))

GOOD = """\
name: t
model: tiny
data:
  sources: [{path: data.txt}]
  seq_len: 128
train:
  batch_size: 8
budget:
  tokens: 1M
"""


def write_job(tmp_path, text: str) -> Path:
    (tmp_path / "data.txt").write_text("hello world\n" * 100)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def errors_of(tmp_path, text: str, sets=None, hosts=None) -> list[str]:
    path = write_job(tmp_path, text)
    try:
        jobs = load_jobs(path, sets)
    except UserErrors as exc:
        return [e.render() for e in exc.errors]
    return [e.render() for job in jobs for e in check_job(job, hosts)]


def test_every_example_job_is_valid():
    assert len(EXAMPLES) >= 6
    for path in EXAMPLES:
        jobs = load_jobs(path)
        assert jobs
        for job in jobs:
            assert check_job(job, ["local", "m1max", "rtx4090", "a100-80", "h100"]) == [], path


def test_one_file_holds_several_experiments_sharing_defaults():
    jobs = load_jobs(ROOT / "jobs" / "fin-cpt-4090.yaml")
    assert [j.name for j in jobs] == ["fin-news", "fin-filings", "fin-reports", "fin-qa", "fin-mixed"]
    assert {j.spec.budget.tokens for j in jobs} == {100_000_000}
    assert jobs[-1].spec.data.mixture == "50cap"


def test_a_good_file_has_no_errors(tmp_path):
    assert errors_of(tmp_path, GOOD) == []


def test_unknown_key_names_the_line_and_suggests_the_right_one(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("  seq_len: 128", "  seq_lenn: 128"))
    assert error.startswith(f"{tmp_path / 'job.yaml'}:5:3: data.seq_lenn: unknown field 'seq_lenn'")
    assert "did you mean 'seq_len'?" in error


def test_wrong_type_is_located(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("batch_size: 8", "batch_size: eight"))
    assert ":7:15: train.batch_size:" in error


@pytest.mark.parametrize("change, field, words", [
    (("seq_len: 128", "seq_len: 0"), "data.seq_len", "greater than or equal to 1"),
    (("tokens: 1M", "tokens: 100MM"), "budget.tokens", "not a count"),
    (("budget:\n", "lora: {rank: 0}\nbudget:\n"), "lora.rank", "greater than or equal to 1"),
    (("tokens: 1M", "tokens: 0"), "budget.tokens", "must be positive"),
])
def test_impossible_values_are_refused_with_their_location(tmp_path, change, field, words):
    [error] = errors_of(tmp_path, GOOD.replace(*change))
    assert f": {field}: " in error and words in error
    assert error.split(":")[1].isdigit()  # FILE:LINE


def test_a_stage_longer_than_the_models_context_is_refused(tmp_path):
    text = GOOD.replace("  seq_len: 128\n", "") + "curriculum:\n  - {seq_len: 64, batch_size: 8, share: 0.5}\n" \
        "  - {seq_len: 4096, batch_size: 1, share: 0.5}\n"
    [error] = errors_of(tmp_path, text)
    assert ": curriculum[1].seq_len: stage seq_len 4096 exceeds the model's context of 512" in error


def test_missing_data_file_is_located(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("data.txt", "nope.txt"))
    assert ":4:20: data.sources[0].path: data file not found" in error


def test_unknown_preset_suggests_the_nearest(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("model: tiny", "model: gpt2-124"))
    assert ": model.preset: unknown preset 'gpt2-124'" in error and "did you mean 'gpt2-124m'?" in error


def test_unknown_host_suggests_the_nearest(tmp_path):
    [error] = errors_of(tmp_path, GOOD + "hosts: [rtx4909]\n", hosts=["local", "rtx4090"])
    assert ":10:9: hosts[0]: unknown host 'rtx4909'" in error and "did you mean 'rtx4090'?" in error


def test_every_error_in_a_file_is_reported_not_just_the_first(tmp_path):
    errors = errors_of(tmp_path, GOOD.replace("seq_len: 128", "seq_len: 0").replace("batch_size: 8", "batchsize: 8"))
    assert len(errors) == 2


def test_set_overrides_are_validated_like_the_file_and_blamed_on_the_flag(tmp_path):
    [job] = load_jobs(write_job(tmp_path, GOOD), ["data.seq_len=256", "budget.max_steps=10"])
    assert job.spec.data.seq_len == 256 and job.spec.budget.max_steps == 10
    assert job.spec.budget.tokens == 1_000_000  # max_steps caps the budget, it does not replace it
    with pytest.raises(UserErrors) as exc:
        load_jobs(tmp_path / "job.yaml", ["data.seq_len=0"])
    assert exc.value.errors[0].render().startswith("--set data.seq_len=0: data.seq_len:")


def test_a_malformed_set_is_a_user_error(tmp_path):
    with pytest.raises(UserErrors, match="FIELD.PATH=VALUE"):
        load_jobs(write_job(tmp_path, GOOD), ["seq_len"])


def test_tokens_and_epochs_together_are_refused(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("tokens: 1M", "tokens: 1M\n  epochs: 2"))
    assert "tokens or epochs, not both" in error


@pytest.mark.parametrize(("change", "located"), [
    (("  seq_len: 128\n", ""), "/job.yaml:4:3: data.seq_len: is required unless a curriculum"),
    (("budget:", "quantization: 4bit\nbudget:"), "/job.yaml:8:15: quantization: quantized base weights cannot be"),
    (("budget:", "curriculum: [{seq_len: 64, batch_size: 2, share: 0.5}]\nbudget:"),
     "/job.yaml:8:13: curriculum: shares must add up to 1, they add up to 0.5"),
    (("  tokens: 1M", "  max_steps: 5\ncurriculum: [{seq_len: 64, batch_size: 2, share: 1}]"),
     "/job.yaml:9:3: budget.tokens: a curriculum splits a token budget"),
])
def test_checks_across_fields_are_located_at_the_field_they_name(tmp_path, change, located):
    [error] = errors_of(tmp_path, GOOD.replace(*change))
    assert located in error


def test_duplicate_experiment_names_are_refused(tmp_path):
    text = "defaults:\n" + "".join("  " + line + "\n" for line in GOOD.replace("name: t\n", "").splitlines()) \
        + "experiments:\n  - {name: a}\n  - {name: a}\n"
    errors = errors_of(tmp_path, text)
    assert any("used more than once" in e for e in errors)


keys = st.sampled_from(["name", "model", "data", "train", "budget", "lora", "seq_len", "sources", "tokens",
                        "batch_size", "curriculum", "hosts", "x"])
values = st.recursive(st.one_of(st.integers(-5, 5000), st.text(max_size=6), st.booleans(), st.none()),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=15)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(st.dictionaries(keys, values, max_size=6))
def test_any_mapping_either_loads_or_fails_with_located_user_errors(data):
    import yaml
    doc = load_text(yaml.safe_dump(data), "fuzz.yaml")
    try:
        jobs_from_doc(doc, [])
    except UserErrors as exc:
        for error in exc.errors:
            assert isinstance(error, UserError) and error.render().startswith("fuzz.yaml")


def test_the_committed_job_file_reference_is_up_to_date():
    from runner.reference import render
    committed = (ROOT / "docs" / "job-file.md").read_text()
    assert committed == render(), "regenerate it: python -m runner.reference > docs/job-file.md"


def test_tokens_per_step_only_goes_with_batch_size_auto(tmp_path):
    [error] = errors_of(tmp_path, GOOD.replace("batch_size: 8", "batch_size: 8\n  tokens_per_step: 64k"))
    assert ": train: tokens_per_step is for batch_size: auto" in error
