"""`runner validate` and `runner plan` as a user runs them: output, exit codes, speed, no torch."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runner.hosts as hosts_module
from runner.cli import main
from runner.hosts import Detected

ROOT = Path(__file__).resolve().parents[1]
HOSTS = str(ROOT / "hosts.yaml")
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def laptop_cpu(monkeypatch):
    monkeypatch.setattr(hosts_module, "detect_local", lambda: Detected("cpu", "test CPU", 16 * 2**30, 1, "test"))


def run(capsys, *argv):
    code = main(["--hosts-file", HOSTS, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def bad_job(tmp_path, replace=None, append=""):
    text = (ROOT / "jobs" / "quickstart.yaml").read_text().replace("../data/", str(ROOT / "data") + "/")
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "job.yaml"
    path.write_text(text + append)
    return path


def test_validate_accepts_every_example_job(capsys):
    code, out, err = run(capsys, "validate", *map(str, EXAMPLES))
    assert code == 0 and err == ""
    assert out.count("ok ") == len(EXAMPLES)


@pytest.mark.parametrize("change, location", [
    (("seq_len: 128", "seq_len: [128"), ":"),                                 # YAML syntax
    (("  packing: true", "  packin: true"), ":15:3: data.packin: unknown field 'packin'"),
    (("batch_size: 16", "batch_size: big"), ":17:15: train.batch_size:"),    # wrong type
    (("seq_len: 128", "seq_len: 0"), ":14:12: data.seq_len:"),              # impossible value
    (("tokens: 400k", "tokens: 100MM"), ":22:11: budget.tokens: '100MM' is not a count"),
    (("news.jsonl", "nothing.jsonl"), ": data.sources[0].path: data file not found"),
    (("model: tiny", "model: tinyy"), ":7:8: model.preset: unknown preset 'tinyy'"),
    (("hosts: [local]", "hosts: [rtx4091]"), ":31:9: hosts[0]: unknown host 'rtx4091'"),
])
def test_validate_prints_file_line_col_field_and_exits_2_without_traceback(tmp_path, capsys, change, location):
    path = bad_job(tmp_path, change)
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert err.startswith(str(path) + ":") and location in err
    assert "Traceback" not in err + out


def test_validate_reports_lora_rank_zero_and_a_stage_beyond_the_context(tmp_path, capsys):
    path = bad_job(tmp_path, ("budget:", "lora: {rank: 0}\nbudget:"))
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and ": lora.rank: Input should be greater than or equal to 1" in err
    path = bad_job(tmp_path, ("  seq_len: 128\n", ""), "curriculum:\n  - {seq_len: 1024, batch_size: 1, share: 1}\n")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and ": curriculum[0].seq_len: stage seq_len 1024 exceeds the model's context of 512" in err


def test_validate_refuses_a_billion_laughs_file_quickly(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        p, c = chr(96 + i), chr(97 + i)
        lines.append(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "alias bomb" in err and time.perf_counter() - start < 2


def test_validate_checks_set_overrides_too(capsys):
    code, _, err = run(capsys, "validate", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "data.seq_len=0")
    assert code == 2 and err.startswith("--set data.seq_len=0: data.seq_len:")


def test_plan_prints_a_table_and_exits_0_when_a_host_passes(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "lora-llama7b.yaml"))
    assert code == 0
    for word in ("a100-80", "h100", "rtx4090", "peak / capacity", "batch x accum", "tokens/s", "cheapest", "fastest"):
        assert word in out


def test_plan_exits_3_when_no_host_passes_and_shows_the_nearest_fixes(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "fin-cpt-4090.yaml"), "--set", "budget.max_cost_usd=0.01")
    assert code == 3
    assert "over max_cost_usd" in out and "fix: a budget of" in out and "--set budget.tokens=" in out


def test_plan_exits_2_on_an_invalid_file(tmp_path, capsys):
    code, out, err = run(capsys, "plan", str(bad_job(tmp_path, ("seq_len: 128", "seq_len: 0"))))
    assert code == 2 and ": data.seq_len:" in err and "Traceback" not in err


def test_plan_on_one_host_shows_the_memory_breakdown(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "fin-cpt-4090.yaml"), "--host", "rtx4090")
    assert code == 0
    for term in ("weights", "gradients", "optimizer states", "activations", "logits and loss",
                 "allocator headroom", "CUDA context", "capacity", "verdict"):
        assert term in out
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "fin-cpt-4090.yaml"), "--host", "rtx4090",
                       "--set", "train.gradient_checkpointing=true")
    assert code == 0 and "a full card needs" in out and "of part-used allocator pages" in out


def test_plan_short_flags_are_set_overrides_and_shown(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "quickstart.yaml"), "--max-steps", "10",
                       "--batch-size", "4", "--seq-len", "64", "--no-packing")
    assert code == 0
    assert "overrides: budget.max_steps=10, train.batch_size=4, data.seq_len=64, data.packing=false" in out


def test_short_flags_work_wherever_set_does_and_are_validated_like_it(capsys):
    from runner.cli import build_parser

    job = str(ROOT / "jobs" / "quickstart.yaml")
    for command in ("validate", "run", "tui"):
        args = build_parser().parse_args([command, job, "--set", "eval.every_steps=5", "--max-steps", "5", "--no-packing"])
        assert args.sets == ["eval.every_steps=5", "budget.max_steps=5", "data.packing=false"]
    assert build_parser().parse_args(["run", job]).sets == []  # nothing left over from the last parse
    code, _, err = run(capsys, "validate", job, "--max-steps", "0")
    assert code == 2 and "budget.max_steps: Input should be greater than or equal to 1" in err


def test_plan_on_one_host_explains_the_steps_per_stage_and_the_coverage_of_each_source(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "curriculum-197m.yaml"), "--host", "h100")
    assert code == 0 and "budget: 30,515 steps, 999,915,520 tokens (100.0% of the budget)" in out
    assert [line.split()[:5] for line in out.splitlines() if line.strip().startswith("0 ")] == \
        [["0", "8", "4096x1", "32,768", "1,525"]]
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "lora-llama7b.yaml"), "--host", "rtx4090")
    (qa,) = [line.split() for line in out.splitlines() if line.startswith("qa ")]
    assert qa[:5] == ["qa", "100%", "2.42M", "803k", "3.01"]  # 3 epochs of 1,602 samples x 512, rounded up to a step


def test_plan_json_is_machine_readable(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "jobs" / "quickstart.yaml"), "--all-hosts", "--json")
    [entry] = json.loads(out)
    hosts = [p["host"] for p in entry["plans"]]
    assert code == 0 and hosts == ["local", "m1max", "rtx4090", "a100-80", "h100"]
    local = entry["plans"][0]
    assert local["steps"] == 195 and local["memory"]["peak_bytes"] > 0 and local["stages"][0]["micro_batch"] == 16


def test_plan_unknown_host_is_an_input_error(capsys):
    code, _, err = run(capsys, "plan", str(ROOT / "jobs" / "quickstart.yaml"), "--host", "rtx4091")
    assert code == 2 and "unknown host 'rtx4091'" in err and "did you mean 'rtx4090'?" in err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_job_plans_in_well_under_a_second(capsys, path):
    start = time.perf_counter()
    code, out, _ = run(capsys, "plan", str(path))
    assert code in (0, 3) and out
    assert time.perf_counter() - start < 0.5


def test_hosts_list_and_catalog(capsys):
    code, out, _ = run(capsys, "hosts", "list")
    assert code == 0 and "rtx-4090" in out and "test CPU" in out
    code, out, _ = run(capsys, "hosts", "catalog")
    assert code == 0 and "h100-80gb" in out and "989.4" in out


def test_usage_errors_exit_2(capsys):
    assert main(["plan"]) == 2
    assert main(["no-such-command"]) == 2


def test_the_console_script_runs_validate_and_plan_without_importing_torch(tmp_path):
    script = (
        "import sys\n"
        "from runner.cli import main\n"
        f"assert main(['--hosts-file', {HOSTS!r}, 'validate', {str(EXAMPLES[0])!r}]) == 0\n"
        f"assert main(['--hosts-file', {HOSTS!r}, 'plan', {str(ROOT / 'jobs' / 'lora-llama7b.yaml')!r}]) in (0, 3)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    exe = Path(sys.executable).parent / "runner"
    if exe.exists():
        done = subprocess.run([str(exe), "--hosts-file", HOSTS, "validate", str(EXAMPLES[0])],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
