"""The run store: ids, paths, checked state transitions with their history, attempts and cost."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runner.errors import UserError
from runner.store import ALLOWED, STATES, TERMINAL, IllegalTransition, Store, data_dir, default_store_path, new_run_id


def make_run(store: Store, **extra):
    fields = dict(job_file="/jobs/q.yaml", experiment="quickstart", resolved_json="{}", host="local",
                  profile="cpu", backend="docker")
    fields.update(extra)
    return store.create(**fields)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "runs.db")
    yield s
    s.close()


def test_data_dir_follows_runner_home_then_xdg_then_home(tmp_path: Path):
    assert data_dir({"RUNNER_HOME": "/srv/r"}) == Path("/srv/r")
    assert data_dir({"XDG_DATA_HOME": "/x"}) == Path("/x/runner")
    assert data_dir({}) == Path.home() / ".local" / "share" / "runner"
    assert default_store_path({"RUNNER_HOME": "/srv/r"}) == Path("/srv/r/runs.db")


def test_run_ids_are_short_unique_and_sort_by_creation_time():
    ids = [new_run_id(1_800_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(new_run_id(1_800_000_000) for _ in range(50))) > 40
    assert all(len(i) == 18 for i in ids)


def test_a_new_run_is_queued_with_its_directory_beside_the_database(store: Store):
    run = make_run(store)
    assert run.state == "queued" and run.attempt == 1
    assert Path(run.run_dir) == store.path.parent / "runs" / run.id
    [first] = store.transitions(run.id)
    assert (first.from_state, first.to_state) == (None, "queued")


def test_the_database_runs_in_wal_mode(store: Store):
    make_run(store)
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_every_transition_is_recorded_with_its_reason(store: Store):
    run = make_run(store)
    store.transition(run.id, "starting", "launching")
    store.transition(run.id, "running", "container abc started")
    done = store.transition(run.id, "succeeded", "budget_reached", steps=9, best_eval_loss=6.1)
    assert done.state == "succeeded" and done.reason == "budget_reached" and done.steps == 9
    assert [(t.from_state, t.to_state, t.reason) for t in store.transitions(run.id)] == [
        (None, "queued", "submitted"), ("queued", "starting", "launching"),
        ("starting", "running", "container abc started"), ("running", "succeeded", "budget_reached")]


def test_forbidden_transitions_raise_and_leave_the_run_as_it_was(store: Store):
    run = make_run(store)
    with pytest.raises(IllegalTransition):
        store.transition(run.id, "succeeded", "too early")
    assert store.get(run.id).state == "queued"
    assert len(store.transitions(run.id)) == 1


def test_expect_guards_against_a_state_read_earlier(store: Store):
    run = make_run(store)
    store.transition(run.id, "starting", "go")
    with pytest.raises(IllegalTransition):
        store.transition(run.id, "cancelled", "cancel", expect={"queued"})


def test_succeeded_is_final_and_other_endings_can_be_queued_again():
    assert ALLOWED["succeeded"] == frozenset()
    for state in TERMINAL - {"succeeded"}:
        assert ALLOWED[state] == frozenset({"queued"})
    for state in STATES:
        assert ALLOWED[state] <= set(STATES)


def test_resume_starts_a_new_attempt_and_wall_time_and_cost_add_up(store: Store):
    run = make_run(store, price_usd_per_hour=3.6)
    store.transition(run.id, "starting", "go")
    store.transition(run.id, "running", "started", started_at=1000.0)
    first = store.transition(run.id, "cancelled", "user", ended_at=1010.0, exit_code=0)
    assert first.wall_s == pytest.approx(10) and first.cost_usd == pytest.approx(0.01)
    again = store.transition(run.id, "queued", "resume")
    assert again.attempt == 2 and again.handle is None and again.exit_code is None
    store.transition(run.id, "starting", "go")
    store.transition(run.id, "running", "started", started_at=2000.0)
    done = store.transition(run.id, "succeeded", "done", ended_at=2020.0)
    assert done.wall_s == pytest.approx(30) and done.cost_usd == pytest.approx(0.03)
    assert [t.attempt for t in store.transitions(run.id)][-3:] == [2, 2, 2]


def test_runs_are_found_by_a_unique_prefix(store: Store):
    a = make_run(store)
    assert store.get(a.id[:-2]).id == a.id
    with pytest.raises(UserError, match="no run"):
        store.get("999999")
    b = make_run(store)
    if a.id[:13] == b.id[:13]:
        with pytest.raises(UserError, match="several"):
            store.get(a.id[:13])


def test_updates_cannot_change_the_state(store: Store):
    run = make_run(store)
    with pytest.raises(IllegalTransition):
        store.update(run.id, state="running")
    assert store.update(run.id, handle="abc").handle == "abc"


def test_runs_lists_newest_first_and_filters_by_state(store: Store):
    first, second = make_run(store), make_run(store)
    store.transition(first.id, "cancelled", "never mind")
    assert [r.id for r in store.runs()][0] == max(first.id, second.id)
    assert [r.id for r in store.runs(states={"queued"})] == [second.id]
