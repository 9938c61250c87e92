"""End to end on this machine: the quickstart on two hosts then `runner compare`; a probe, then a plan that holds.

Both go through the real dispatch path (`runner.dispatch`, as `runner run` does):
the first test on this machine in a container and on an SSH test host (a real
sshd in a network namespace, at a rented host's price), the second natively.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import OFFLINE_IMAGE_ENV

from runner import capacity, dispatch, ssh
from runner import compare as cmp
from runner.calibration import Calibration
from runner.cli import main
from runner.hosts import Host, Inventory, load_inventory
from runner.plan import plan_job
from runner.spec import load_jobs
from runner.store import Store
from sshhosts import known_hosts_line

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
RENTED_USD_PER_HOUR = 1.8


@pytest.fixture
def store(tmp_home):
    opened = Store.open()
    yield opened
    opened.close()


@pytest.fixture
def two_hosts(tmp_home, ssh_hosts, trainer_image, monkeypatch) -> Inventory:
    """local (free) and an SSH test host at a rented price, trusted, in a fresh hosts.yaml."""
    host = ssh_hosts[0]
    inventory = tmp_home / "hosts.yaml"
    inventory.write_text(f"hosts:\n  {host.name}:\n    address: {host.address}\n    user: {host.user}\n"
                         f"    key: {host.client_key_path}\n    profile: cpu\n"
                         f"    price_usd_per_hour: {RENTED_USD_PER_HOUR}\n")
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(known_hosts_line(host) + "\n")
    for name, value in {"RUNNER_HOSTS": str(inventory), "RUNNER_SYNC_EVERY_S": "2", **OFFLINE_IMAGE_ENV}.items():
        monkeypatch.setenv(name, value)
    yield load_inventory()
    backend = dispatch._BACKENDS.pop("ssh", None)  # the next test connects afresh
    if backend is not None:
        backend.close()


def run_job(store, host, inventory, backend, sets):
    prepared = dispatch.prepare(QUICKSTART, host=host, inventory=inventory, backend=backend, sets=sets)[0]
    run = dispatch.wait(store, dispatch.launch(store, prepared, say=lambda _: None).id)
    assert run.state == "succeeded", run.reason
    return run


@pytest.mark.docker
@pytest.mark.ssh
def test_quickstart_here_and_on_a_remote_host_compares_with_consistent_figures_and_plots_one_line_per_host(
        store, two_hosts, tmp_path, capsys):
    from PIL import Image

    remote = next(name for name in two_hosts.names if name != "local")
    sets = ["budget.tokens=40k", "eval.every_steps=5", "checkpoint.every_steps=100"]
    first = run_job(store, "local", two_hosts, "docker", sets)
    second = run_job(store, remote, two_hosts, None, sets)

    plot = tmp_path / "loss.png"
    assert main(["compare", "--job", "quickstart", "--format", "json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["host"]: r for r in report["rows"]}
    assert set(rows) == {"local", remote}
    for run in (first, second):
        row = rows[run.host]
        summary = json.loads((Path(run.run_dir) / "summary.json").read_text())  # the remote one, synced home
        assert row["tokens_per_s"] == summary["tokens_per_s"]
        assert row["tokens"] == summary["tokens"]
        assert row["wall_s"] == pytest.approx(run.wall_s)
        assert row["best_eval_loss"] == pytest.approx(summary["best_eval_loss"])
    assert rows["local"]["cost_usd"] is None  # free: shown as local
    assert rows[remote]["cost_usd"] == pytest.approx(RENTED_USD_PER_HOUR * second.wall_s / 3600)
    assert rows[remote]["usd_per_100m_tokens"] == pytest.approx(rows[remote]["cost_usd"] / second.tokens * 1e8)
    (verdict,) = report["verdicts"]
    assert verdict["cheapest"] == "local" and verdict["best_loss_per_dollar"] == "local"
    assert verdict["fastest"] == min(rows.values(), key=lambda r: r["seconds_per_100m_tokens"])["host"]
    # Priced the other way round, the remote host is the cheap one.
    found = cmp.records(store, job="quickstart")
    repriced = [replace(r, price_usd_per_hour=0.01 if r.host == remote else 50.0) for r in found]
    assert cmp.verdicts(repriced)[0].cheapest.host == remote

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(plot).size == (1500, 450)
    from runner.plots import curves

    assert sorted(c.label for c in curves(found)) == sorted(["local", remote])

    assert main(["compare", first.id, second.id]) == 0
    table = capsys.readouterr().out
    assert first.id in table and second.id in table and "local" in table


def test_after_one_probe_the_plan_and_the_run_use_the_probed_rate_and_compare_leaves_the_probe_out(store):
    """How close the calibrated plan comes is measured by bench/calibration_accuracy.py, not timed here."""
    inventory = Inventory({"local": Host(name="local", kind="local", profile="cpu")}, None)
    uncalibrated = plan_job(load_jobs(QUICKSTART)[0], "local", inventory=inventory,
                            throughput=Calibration.from_store(store))
    (probed,) = capacity.probe(store, "local", ["tiny"], [128], steps=10, batch_size=16, backend="native",
                               inventory=inventory, say=lambda _: None)
    assert probed.stable and probed.fits and probed.tokens_per_s > 0
    assert probed.versions["backend"] == "native" and probed.versions["torch"]
    assert capacity.results(store, "local")[0].run_id == probed.run_id

    # A job sized to about fifteen seconds at the probed rate: the plan follows the probe, not the catalog.
    tokens = int(probed.tokens_per_s * 15 / 2048) * 2048
    sets = [f"budget.tokens={tokens}"]
    job = load_jobs(QUICKSTART, sets)[0]
    plan = plan_job(job, "local", inventory=inventory, throughput=Calibration.from_store(store))
    # The probe ran at micro-batch 16, 8 and 4: the plan fits a fixed cost per micro-batch, or says it found none.
    assert plan.throughput_source.startswith("calibrated from 3 probes on local at 3 micro-batches (")
    assert [r.micro_batch for r in capacity.results(store, "local")] == [16, 8, 4]
    assert plan.seconds != uncalibrated.seconds * tokens / uncalibrated.tokens

    run = run_job(store, "local", inventory, "native", sets)
    assert run.predicted_seconds == pytest.approx(plan.seconds, rel=0.02)  # `runner run` plans as `runner plan` does
    assert math.isfinite(run.wall_s) and run.wall_s > 0
    assert [r.run_id for r in cmp.records(store)] == [run.id]  # the probe's own run is no experiment


def test_a_job_probed_as_written_calibrates_that_job_and_not_one_trained_another_way(store, capsys):
    inventory = Inventory({"local": Host(name="local", kind="local", profile="cpu")}, None)
    checkpointed = ["train.gradient_checkpointing=true"]
    assert main(["probe", "local", "--job", str(QUICKSTART), "--set", checkpointed[0], "--steps", "8",
                 "--backend", "native"]) == 0
    said = capsys.readouterr()
    assert [(r.model, r.micro_batch, r.outcome) for r in capacity.results(store, "local")] == [
        ("quickstart", 16, "ok"), ("quickstart", 8, "ok"), ("quickstart", 4, "ok")]
    assert "quickstart on local: " in said.out and "calibrated from 3 probes on local at 3 micro-batches" in said.out

    calibration = Calibration.from_store(store)
    probed = plan_job(load_jobs(QUICKSTART, checkpointed)[0], "local", inventory=inventory, throughput=calibration)
    assert probed.throughput_source.startswith("calibrated from 3 probes on local at 3 micro-batches")
    # Without checkpointing the job is another speed: the probe does not stand for it.
    plain = plan_job(load_jobs(QUICKSTART)[0], "local", inventory=inventory, throughput=calibration)
    assert plain.throughput_source.startswith("catalog default")


def test_a_job_probe_refuses_a_curriculum_preset_flags_and_an_unnamed_experiment_before_anything_runs(store, capsys):
    assert main(["probe", "local", "--job", str(ROOT / "jobs" / "curriculum-197m.yaml")]) == 2
    assert "curriculum" in capsys.readouterr().err
    assert main(["probe", "local", "--job", str(QUICKSTART), "--models", "tiny"]) == 2
    assert "--job probes the job as written" in capsys.readouterr().err
    assert main(["probe", "local", "--job", str(ROOT / "jobs" / "fin-cpt-4090.yaml")]) == 2
    err = capsys.readouterr().err
    assert "has 5 experiments" in err and "pick one with --experiment" in err
    assert capacity.results(store) == []
