"""A job that ran, or ran out of memory, on a host decides the plan's memory verdict there, not the estimate."""

from dataclasses import replace
from pathlib import Path

import pytest

from runner.calibration import Calibration, Observation
from runner.cli import main
from runner.hosts import Host, Inventory, hardware
from runner.plan import plan_job, resolve
from runner.plan.measured import MemoryOutcome
from runner.presets import lookup_preset
from runner.spec import load_jobs
from runner.store import Store, default_store_path

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = Inventory({
    "rtx4090": Host(name="rtx4090", profile="rtx-4090", price_usd_per_hour=0.35),
    "rtx4090-b": Host(name="rtx4090-b", profile="rtx-4090", price_usd_per_hour=0.35),
}, None)
GPT2 = lookup_preset("gpt2-124m")


def fin_news(micro_batch: int, *sets: str):
    return load_jobs(ROOT / "jobs" / "fin-cpt-4090.yaml", [f"train.batch_size={micro_batch}", "budget.max_cost_usd=null",
                                                          "train.gradient_checkpointing=true", *sets])[0]


def outcome(micro_batch: int, ran: bool, *, host="rtx4090", at=1.0, accumulates=False, **way) -> MemoryOutcome:
    """fin-news as the job file trains it (bf16, checkpointed, AdamW, compiled on CUDA), measured on ``host``."""
    trained = dict(gradient_checkpointing=True, lora=False, optimizer="adamw", quantization="none", compile=True)
    return MemoryOutcome(host=host, profile="rtx-4090", shape=GPT2, seq_len=1024, precision="bf16",
                         micro_batch=micro_batch, accumulates=accumulates, processes=1, parallelism="single", ran=ran,
                         source=f"run r-{micro_batch}", at=at, **{**trained, **way})


def plan(micro_batch: int, *outcomes: MemoryOutcome, sets=(), host="rtx4090"):
    return plan_job(fin_news(micro_batch, *sets), host, inventory=INVENTORY, throughput=Calibration((), outcomes))


@pytest.fixture(scope="module")
def edge() -> int:
    """The largest micro-batch the estimate fits on the 24 GB card."""
    low, high = 1, 512
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if plan(mid).fits else (low, mid - 1)
    return low


def test_a_micro_batch_that_ran_out_of_memory_on_the_host_is_refused_with_the_run_named(edge):
    refused = plan(edge, outcome(edge, ran=False))
    assert plan(edge).passes and not refused.passes and not refused.fits
    assert refused.reasons[0].startswith(f"micro-batch {edge} ran out of memory on rtx4090 (run r-{edge}); "
                                         "the estimate needs ")
    # The nearest fix keeps the tokens per step below the micro-batch that ran out of memory.
    fix = refused.fixes[0]
    micro = int(next(s for s in fix.sets if s.startswith("train.batch_size=")).split("=")[1])
    accum = int(next(s for s in fix.sets if s.startswith("train.grad_accum=")).split("=")[1])
    assert micro < edge and micro * accum == edge


def test_out_of_memory_at_a_smaller_micro_batch_refuses_a_larger_one_and_not_a_smaller_one(edge):
    assert not plan(edge, outcome(edge - 10, ran=False)).fits
    assert plan(edge - 11, outcome(edge - 10, ran=False)).passes


def test_a_micro_batch_that_ran_on_the_host_passes_where_the_estimate_refuses(edge):
    assert not plan(edge + 1).fits
    passed = plan(edge + 1, outcome(edge + 2, ran=True))
    assert passed.passes and passed.fits and not passed.reasons
    assert any(w.startswith("the estimate needs ") and w.endswith(f"micro-batch {edge + 2} ran on rtx4090 (run r-{edge + 2})")
               for w in passed.warnings)
    assert not plan(edge + 3, outcome(edge + 2, ran=True)).fits  # a larger micro-batch is the estimate's to judge


def test_running_out_of_memory_wins_over_a_run_that_ran(edge):
    # At a full card the same job can land on either side (the allocator's layout): the plan stays safe.
    assert not plan(edge, outcome(edge, ran=True, at=2.0), outcome(edge - 1, ran=False, at=1.0)).fits


def test_another_host_of_the_same_profile_speaks_only_when_this_one_has_nothing(edge):
    elsewhere = outcome(edge, ran=False, host="rtx4090-b")
    assert not plan(edge, elsewhere).fits
    assert "on rtx4090-b (run " in plan(edge, elsewhere).reasons[0]
    assert plan(edge, elsewhere, outcome(edge, ran=True)).passes  # this host's own run decides


def test_a_job_trained_another_way_says_nothing(edge):
    for other in (outcome(edge, ran=False, gradient_checkpointing=False), outcome(edge, ran=False, optimizer="adamw8bit"),
                  outcome(edge, ran=False, compile=False), replace(outcome(edge, ran=False), precision="fp16"),
                  replace(outcome(edge, ran=False), seq_len=512), replace(outcome(edge, ran=False), shape=lookup_preset("d12"))):
        assert plan(edge, other).passes, other


def test_accumulation_keeps_gradients_allocated_so_it_counts_one_way_only(edge):
    with_accumulation = ("train.grad_accum=2",)
    # Out of memory while accumulating says nothing of the same micro-batch without accumulation...
    assert plan(edge, outcome(edge, ran=False, accumulates=True)).passes
    # ...and out of memory without it refuses it with accumulation too.
    assert not plan(edge - 20, outcome(edge - 20, ran=False), sets=with_accumulation).fits
    # A run without accumulation does not vouch for one with it.
    assert not plan(edge + 1, outcome(edge + 1, ran=True), sets=with_accumulation).fits


def test_batch_size_auto_stays_below_a_micro_batch_that_ran_out_of_memory(edge):
    auto = plan(8, sets=("train.batch_size=auto",))
    chosen = auto.micro_batch
    lower = plan(8, outcome(chosen, ran=False), sets=("train.batch_size=auto",))
    assert lower.passes and lower.micro_batch < chosen


def record(store: Store, micro_batch: int, state: str, reason: str, *, host="rtx4090") -> str:
    job = fin_news(micro_batch)
    resolved = resolve(job, host, inventory=INVENTORY)
    hw = hardware(INVENTORY.get(host))
    run = store.create(job_file=str(job.file), experiment=job.name, resolved_json=resolved.model_dump_json(), host=host,
                       profile=hw.profile.id, backend="docker")
    store.transition(run.id, "starting", "launching")
    store.transition(run.id, "running", "started")
    store.transition(run.id, state, reason)
    return run.id


def test_the_run_store_gives_runs_that_ran_and_those_that_ran_out_of_memory(tmp_path):
    store = Store.open(tmp_path / "runs.db")
    oom = record(store, 16, "failed", "the trainer exited with code 1: out of memory in step 2 (micro-batch 16 at "
                                      "seq 1024): CUDA out of memory. Tried to allocate 1.50 GiB.")
    ok = record(store, 8, "succeeded", "budget_reached: 12207 steps, 100M tokens")
    record(store, 12, "failed", "the trainer exited with code 1: FileNotFoundError: news.jsonl")
    # A run an older version wrote, which this one cannot read, is left out rather than failing every plan.
    unreadable = store.create(job_file="old.yaml", experiment="old", resolved_json='{"stages": "?"}', host="rtx4090",
                              profile="rtx-4090", backend="docker")
    store.transition(unreadable.id, "failed", "out of memory: the kernel killed the trainer (OOMKilled)")
    finished = store.create(job_file="old.yaml", experiment="old", resolved_json="{}", host="rtx4090",
                            profile="rtx-4090", backend="docker")
    for state in ("starting", "running"):
        store.transition(finished.id, state, state)
    store.transition(finished.id, "succeeded", "budget_reached", tokens_per_s=1000.0, tokens=10**6)
    got = {(o.micro_batch, o.ran, o.source) for o in Calibration.from_store(store).memory_outcomes()}
    store.close()
    assert got == {(16, False, f"run {oom}"), (8, True, f"run {ok}")}
    assert all(o.compile and o.gradient_checkpointing and o.optimizer == "adamw"
               for o in Calibration.from_store(Store.open(tmp_path / "runs.db")).memory_outcomes())


def test_runner_plan_refuses_a_micro_batch_that_ran_out_of_memory_on_the_host_and_offers_the_nearest_fix(
        tmp_home, capsys):
    store = Store.open(default_store_path())
    run_id = record(store, 16, "failed", "the trainer exited with code 1: out of memory in step 1 (micro-batch 16 "
                                         "at seq 1024): CUDA out of memory. Tried to allocate 2.00 GiB.")
    store.close()
    argv = ["--hosts-file", str(ROOT / "hosts.yaml"), "plan", str(ROOT / "jobs" / "fin-cpt-4090.yaml"),
            "--host", "rtx4090", "--set", "train.gradient_checkpointing=true", "--set", "budget.max_cost_usd=null"]
    assert main([*argv, "--set", "train.batch_size=16"]) == 3
    out = capsys.readouterr().out
    assert f"micro-batch 16 ran out of memory on rtx4090 (run {run_id})" in out
    assert "--set train.batch_size=8 --set train.grad_accum=2" in out
    assert main([*argv, "--set", "train.batch_size=8"]) == 0  # a smaller micro-batch is the estimate's to judge


def test_the_breakdowns_verdict_says_what_decided_it(edge):
    assert plan(edge).memory.verdict() == "fits: spare"
    closer = "by the estimate, closer to a full card than it can decide"
    assert plan(edge + 1).memory.verdict() == f"at the limit: spare {closer}"
    assert plan(edge + 2).memory.verdict() == f"at the limit: short {closer}"
    assert plan(edge + 3).memory.verdict() == "does not fit: short"
    assert plan(edge, outcome(edge, ran=False)).memory.verdict() == (
        f"does not fit: micro-batch {edge} ran out of memory on rtx4090 (run r-{edge}); by the estimate: spare")
    assert plan(edge + 2, outcome(edge + 2, ran=True)).memory.verdict() == (
        f"fits: micro-batch {edge + 2} ran on rtx4090 (run r-{edge + 2}); by the estimate: short")


def test_a_measured_peak_over_the_usable_memory_only_warns_where_that_micro_batch_ran(edge):
    # The peak a run reports counts the allocator's cache, which a full card gives back: the run itself decides.
    capacity = plan(edge).memory.capacity_bytes
    peak = Observation(host="rtx4090", profile="rtx-4090", shape=GPT2, seq_len=1024, precision="bf16",
                       tokens_per_s=50_000.0, peak_bytes=capacity + 2**30, overhead_s=0.0, kind="run", at=1.0,
                       gradient_checkpointing=True, compile=True, micro_batch=edge)
    job = fin_news(edge)
    refused = plan_job(job, "rtx4090", inventory=INVENTORY, throughput=Calibration((peak,), ()))
    assert not refused.passes and refused.reasons[0].startswith("measured peak ")
    ran = plan_job(job, "rtx4090", inventory=INVENTORY, throughput=Calibration((peak,), (outcome(edge, ran=True),)))
    assert ran.passes and any(w.startswith("measured peak ") and w.endswith(f"though micro-batch {edge} ran on rtx4090 "
                                                                             f"(run r-{edge})") for w in ran.warnings)


def test_a_job_at_the_limit_of_the_card_is_refused_with_the_probe_that_settles_it(edge):
    # gpt2-124m compiled and checkpointed on the 24 GB card: edge + 1 has 0.06 GiB to spare by the estimate and edge + 2
    # is 0.07 short, where measured jobs went either way; edge + 3 is 0.2 short, where none ran.
    for micro_batch in (edge + 1, edge + 2):
        at_limit = plan(micro_batch)
        assert at_limit.at_limit and not at_limit.fits and not at_limit.passes and at_limit.said_ok() == "no: at limit"
        (reason,) = at_limit.reasons
        assert reason.startswith("at the limit: needs ") and reason.endswith(
            f"a probe there settles it: runner probe rtx4090 --job {ROOT / 'jobs' / 'fin-cpt-4090.yaml'} --experiment "
            f"fin-news --set train.batch_size={micro_batch} --set budget.max_cost_usd=null "
            "--set train.gradient_checkpointing=true")
        assert "train.batch_size=" in at_limit.fixes[0].command_hint()  # the nearest micro-batch the estimate fits
        # What the probe (or any run) finds decides, either way.
        assert plan(micro_batch, outcome(micro_batch, ran=True)).passes
        refused = plan(micro_batch, outcome(micro_batch, ran=False))
        assert not refused.passes and not refused.at_limit and "ran out of memory" in refused.reasons[0]
    assert not plan(edge + 3).at_limit and plan(edge + 3).said_ok() == "no: memory"


def test_a_probe_runs_a_job_refused_only_for_being_at_the_limit_and_nothing_else(edge):
    from runner import dispatch
    from runner.errors import EXIT_REFUSED, UserError

    job_file = ROOT / "jobs" / "fin-cpt-4090.yaml"
    sets = [f"train.batch_size={edge + 1}", "budget.max_cost_usd=null", "train.gradient_checkpointing=true"]
    with pytest.raises(UserError) as refused:
        dispatch.prepare(job_file, experiment="fin-news", host="rtx4090", sets=sets, inventory=INVENTORY)
    assert refused.value.exit_code == EXIT_REFUSED and "at the limit" in refused.value.message
    (probed,) = dispatch.prepare(job_file, experiment="fin-news", host="rtx4090", sets=sets, inventory=INVENTORY,
                                 settle=True)
    assert probed.plan.passes and probed.resolved.stages[0].micro_batch == edge + 1
    # Over a money cap too, it is refused all the same: the probe settles memory, not the rest.
    with pytest.raises(UserError, match="over max_cost_usd"):
        dispatch.prepare(job_file, experiment="fin-news", host="rtx4090", inventory=INVENTORY, settle=True,
                         sets=[*sets[:1], "budget.max_cost_usd=0.01", *sets[2:]])


def test_runner_run_with_a_store_is_judged_by_that_stores_runs(tmp_home, capsys):
    # The run goes into --store, and what that store measured decides it: not the default store's (empty here).
    elsewhere = tmp_home / "other-runs.db"
    store = Store.open(elsewhere)
    run_id = record(store, 16, "failed", "the trainer exited with code 1: out of memory in step 1 (micro-batch 16 "
                                         "at seq 1024): CUDA out of memory. Tried to allocate 2.00 GiB.")
    store.close()
    argv = ["--hosts-file", str(ROOT / "hosts.yaml"), "run", str(ROOT / "jobs" / "fin-cpt-4090.yaml"),
            "--experiment", "fin-news", "--host", "rtx4090", "--store", str(elsewhere), "--detach",
            "--set", "train.gradient_checkpointing=true", "--set", "budget.max_cost_usd=null",
            "--set", "train.batch_size=16"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"micro-batch 16 ran out of memory on rtx4090 (run {run_id})" in err and "Traceback" not in err
    assert not default_store_path().exists()  # nothing was recorded anywhere else either
