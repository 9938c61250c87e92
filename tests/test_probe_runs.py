"""End to end on this machine: the quickstart on two hosts then `runner compare`; a probe, then a plan that holds.

Both go through the real dispatch path (`runner.dispatch`, as `runner run` does).
The inventory accepts a single host of kind local, named local; until runs on
SSH hosts can be dispatched, the second host is a second local entry at another
price, built without the inventory's validation.
"""

import json
import math
from pathlib import Path

import pytest

from conftest import OFFLINE_IMAGE_ENV

from runner import capacity, dispatch
from runner.calibration import Calibration
from runner.cli import main
from runner.hosts import Host, Inventory
from runner.plan import plan_job
from runner.spec import load_jobs
from runner.store import Store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def local_host(name: str, price: float) -> Host:
    if name == "local":
        return Host(name=name, kind="local", profile="cpu", price_usd_per_hour=price)
    return Host.model_construct(name=name, kind="local", profile="cpu", price_usd_per_hour=price, address=None,
                                user=None, port=22, key=None, gpus=None, memory_bytes=None)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    opened = Store.open(tmp_path / "runs.db")
    yield opened
    opened.close()


@pytest.fixture
def container_backend(trainer_image, monkeypatch) -> str:
    """docker, on the offline trainer image the session built."""
    for key, value in OFFLINE_IMAGE_ENV.items():
        monkeypatch.setenv(key, value)
    return "docker"


def run_job(store, host, inventory, backend, sets):
    prepared = dispatch.prepare(QUICKSTART, host=host, inventory=inventory, backend=backend, sets=sets)[0]
    run = dispatch.wait(store, dispatch.launch(store, prepared, say=lambda _: None).id)
    assert run.state == "succeeded", run.reason
    return run


@pytest.mark.docker
def test_quickstart_on_two_hosts_compares_with_consistent_figures_and_plots_one_line_per_host(store, tmp_path,
                                                                                             capsys, container_backend):
    from PIL import Image

    inventory = Inventory({"local": local_host("local", 0.0), "rented": local_host("rented", 1.8)}, None)
    sets = ["budget.tokens=80k", "eval.every_steps=10", "checkpoint.every_steps=100"]
    first = run_job(store, "local", inventory, container_backend, sets)
    second = run_job(store, "rented", inventory, "native", sets)

    plot = tmp_path / "loss.png"
    assert main(["compare", "--job", "quickstart", "--format", "json", "--plot", str(plot),
                 "--store", str(store.path)]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["host"]: r for r in report["rows"]}
    assert set(rows) == {"local", "rented"}
    for run in (first, second):
        row = rows[run.host]
        summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
        assert row["tokens_per_s"] == summary["tokens_per_s"]
        assert row["tokens"] == summary["tokens"]
        assert row["wall_s"] == pytest.approx(run.wall_s)
        assert row["best_eval_loss"] == pytest.approx(summary["best_eval_loss"])
    assert rows["local"]["cost_usd"] is None  # free: shown as local
    assert rows["rented"]["cost_usd"] == pytest.approx(1.8 * second.wall_s / 3600)
    assert rows["rented"]["usd_per_100m_tokens"] == pytest.approx(rows["rented"]["cost_usd"] / second.tokens * 1e8)
    (verdict,) = report["verdicts"]
    assert verdict["cheapest"] == "local"

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(plot).size == (1500, 450)
    from runner.compare import records
    from runner.plots import curves

    assert sorted(c.label for c in curves(records(store, job="quickstart"))) == ["local", "rented"]

    assert main(["compare", first.id, second.id, "--store", str(store.path)]) == 0
    table = capsys.readouterr().out
    assert first.id in table and second.id in table and "local" in table


def test_after_one_probe_the_plan_for_a_two_minute_job_is_within_15_percent(store):
    inventory = Inventory({"local": local_host("local", 0.0)}, None)
    (probed,) = capacity.probe(store, "local", ["tiny"], [128], steps=40, batch_size=16, backend="native",
                               inventory=inventory, say=lambda _: None)
    assert probed.stable and probed.fits and probed.tokens_per_s > 0
    assert probed.versions["backend"] == "native" and probed.versions["torch"]
    assert capacity.results(store, "local")[0].run_id == probed.run_id

    # Size the quickstart to about two minutes at the measured rate, and ask the planner.
    tokens = int(probed.tokens_per_s * 120 / 2048) * 2048
    sets = [f"budget.tokens={tokens}"]
    job = load_jobs(QUICKSTART, sets)[0]
    plan = plan_job(job, "local", inventory=inventory, throughput=Calibration.from_store(store))
    assert plan.throughput_source == "calibrated from 1 probe on local"
    assert 90 < plan.seconds < 150

    run = run_job(store, "local", inventory, "native", sets)
    error = (run.wall_s - plan.seconds) / plan.seconds
    print(f"probe {probed.tokens_per_s:.0f} tokens/s, run {run.tokens_per_s:.0f} tokens/s; "
          f"predicted {plan.seconds:.1f}s, measured {run.wall_s:.1f}s: {error:+.1%}")
    assert math.isfinite(error) and abs(error) < 0.15
