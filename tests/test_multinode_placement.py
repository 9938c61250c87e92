"""Where a job over several hosts goes: its hosts in order (or --hosts), SSH hosts only, each with a free slot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import dispatch
from runner.errors import UserError, UserErrors
from runner.hosts import inventory_from_doc
from runner.store import Store
from runner.yamldoc import load_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inventory(tmp_home):
    text = "hosts:\n" + "".join(f"  {n}: {{address: 192.0.2.{i}, profile: cpu, backend: native, python: python3}}\n"
                                for i, n in enumerate(("a", "b", "c"), start=1))
    yield inventory_from_doc(load_text(text, "hosts.yaml"))
    dispatch._BACKENDS.pop("ssh", None)


@pytest.fixture
def store(tmp_home):
    opened = Store.open()
    yield opened
    opened.close()


def job_file(tmp_path: Path, hosts: list[str]) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps({
        "name": "two", "model": "tiny", "data": {"sources": [{"path": str(ROOT / "data/sample/news.jsonl")}],
                                                 "seq_len": 32},
        "train": {"gpus": 1, "nodes": 2, "distributed_on_cpu": True}, "budget": {"tokens": "20k"}, "hosts": hosts}))
    return path


def recorded(store: Store, prep: dispatch.Prepared):
    """A run of ``prep`` in the store, as launch records it before anything starts."""
    return store.create(job_file=prep.job.file, experiment=prep.job.name, resolved_json=prep.resolved.model_dump_json(),
                        host=prep.host.name, profile="cpu", backend="ssh", image=None, price_usd_per_hour=0,
                        max_cost_usd=None, max_hours=None, predicted_tokens_per_s=None, predicted_seconds=None,
                        predicted_cost_usd=None, reason="submitted")


def test_a_two_node_job_runs_on_the_first_two_of_its_hosts_planned_on_the_first(inventory, tmp_path):
    (prep,) = dispatch.prepare(job_file(tmp_path, ["b", "a", "c"]), inventory=inventory)
    assert prep.host.name == "b" and prep.resolved.experiment.hosts == ["b", "a"] and prep.resolved.nodes == 2
    assert prep.backend == "ssh" and prep.image is None  # native hosts need no image


def test_hosts_on_the_command_line_replace_the_job_s_hosts_in_their_order(inventory, store, tmp_path):
    (prep,) = dispatch.spread(store, [job_file(tmp_path, ["a", "b"])], ["c", "a"], inventory=inventory)
    assert prep.host.name == "c" and prep.resolved.experiment.hosts == ["c", "a"]


def test_a_job_over_this_machine_and_a_host_is_refused_at_its_hosts_line(inventory, tmp_path):
    with pytest.raises(UserErrors) as caught:
        dispatch.prepare(job_file(tmp_path, ["local", "a"]), inventory=inventory)
    assert "one torchrun per SSH host; local is this machine" in caught.value.errors[0].render()


def test_a_two_node_job_waits_for_a_host_that_a_run_holds(inventory, store, tmp_path):
    (first,) = dispatch.prepare(job_file(tmp_path, ["a", "b"]), inventory=inventory)
    run = recorded(store, first)
    store.transition(run.id, "starting", "test")
    assert dispatch.free_slots(store, inventory.get("b")) == 0  # the second node's host is held too
    with pytest.raises(UserError, match=r"b \(0 free\) cannot take it now"):
        dispatch.spread(store, [job_file(tmp_path, ["a", "b"])], ["c", "b"], inventory=inventory)


def test_a_two_node_run_does_not_resume_on_another_host(inventory, store, tmp_path):
    (prep,) = dispatch.prepare(job_file(tmp_path, ["a", "b"]), inventory=inventory)
    run = recorded(store, prep)
    store.transition(run.id, "failed", "test")
    with pytest.raises(UserError, match="runs over a, b; it resumes there, with rank 0 on a"):
        dispatch.resume(store, run.id, host="c")
