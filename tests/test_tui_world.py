"""A fixed world for the TUI tests: an inventory, probe cache, job files and a run store, all in a temp dir.

Nothing here reads the developer's own hosts, keys or runs: HOME, the XDG dirs,
RUNNER_HOME and RUNNER_HOSTS all point into the test's temp directory.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOW = 1_795_512_000.0  # 2026-11-24 09:20 UTC: the clock the snapshots are taken at

# Port 1 on the loopback refuses at once, so "reachable: no" is immediate and stable.
INVENTORY = """\
hosts:
  local:
    profile: cpu
    memory: 64GiB
  rtx4090:
    address: 127.0.0.1
    port: 1
    profile: rtx-4090
  a100:
    address: 127.0.0.1
    port: 1
    profile: a100-80gb
  h100:
    address: 127.0.0.1
    port: 1
    profile: h100-80gb
  spare:
    address: 127.0.0.1
    port: 1
"""

# A copy of jobs/quickstart.yaml frozen here, so that edits to the example do not move the snapshots.
QUICKSTART_JOB = """\
# A tiny model on the sample data: trains on a laptop CPU in about a minute.
name: quickstart
model: tiny
data:
  sources:
    - path: ../data/sample/news.jsonl
    - path: ../data/sample/filings.txt
  mixture: proportional
  validation: 0.05
  seq_len: 128
  packing: true
train:
  batch_size: 16
  lr: 3.0e-3
  warmup_steps: 20
  precision: auto
budget:
  tokens: 400k
  max_hours: 0.5
checkpoint:
  every_steps: 50
  keep_last: 2
eval:
  on_start: true
  every_steps: 50
  max_batches: 8
"""

BROKEN_JOB = """\
name: broken
model: tiny
data:
  sources:
    - path: ../data/sample/news.jsonl
  seq_len: -4
train:
  batch_sise: 16
budget:
  tokens: 100k
"""


@dataclass
class World:
    root: Path
    jobs_dir: Path
    hosts_file: Path
    store_path: Path

    def settings(self, **changes):
        from tui.app import Settings

        return Settings(jobs_dir=self.jobs_dir, hosts_file=self.hosts_file, store_path=self.store_path,
                        **{"clock": lambda: NOW, **changes})


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    """Hosts, a probe cache, two job files (one valid, one broken) and an empty run store."""
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "runner-home"))
    hosts_file = tmp_path / "hosts.yaml"
    hosts_file.write_text(INVENTORY)
    monkeypatch.setenv("RUNNER_HOSTS", str(hosts_file))
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    (jobs_dir / "quickstart.yaml").write_text(QUICKSTART_JOB)
    (jobs_dir / "broken.yaml").write_text(BROKEN_JOB)
    (tmp_path / "data").symlink_to(REPO / "data")  # the jobs' ../data/sample paths resolve

    from runner.probe import GPU, HostProbe, save
    save(HostProbe(host="rtx4090", probed_at="2026-11-20T09:30:00+00:00", os_name="Ubuntu 24.04.1 LTS",
                   kernel="Linux 6.8.0", arch="x86_64",
                   gpus=(GPU("NVIDIA GeForce RTX 4090", 24564 * 2**20, 1210 * 2**20, "560.35.03"),),
                   cuda_version="12.6", docker_version="27.3.1", nvidia_runtime=True,
                   disk_free_bytes=800 * 2**30, python_version="3.12.3", cpus=32, memory_bytes=128 * 2**30))
    return World(tmp_path, jobs_dir, hosts_file, tmp_path / "runner-home" / "runs.db")


@pytest.fixture
def fixed_store(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """The world plus a run store with three finished runs of quickstart and one running."""
    fill_store(world, monkeypatch)
    return world


class FixedClock:
    """Stands in for the ``time`` module in runner.store: every call is one second later."""

    def __init__(self, start: float):
        self.now = start

    def time(self) -> float:
        self.now += 1.0
        return self.now


def fill_store(world: World, monkeypatch: pytest.MonkeyPatch, extra_runs: int = 0) -> list[str]:
    """Write the fixed runs (and ``extra_runs`` more finished ones) with stable ids and times."""
    import runner.store as store_module
    from runner.hosts import load_inventory
    from runner.plan import plan_job, resolve
    from runner.spec import load_jobs
    from runner.store import Store

    clock = FixedClock(NOW - 7200)
    counter = iter(range(1, 100_000))
    monkeypatch.setattr(store_module, "time", clock)
    monkeypatch.setattr(store_module, "new_run_id", lambda now=None: f"261124-{next(counter):06d}")
    inventory = load_inventory(world.hosts_file)
    job = load_jobs(world.jobs_dir / "quickstart.yaml")[0]
    store = Store.open(world.store_path)
    ids = []
    finished = [("local", 412.0, 970.0, 2.91), ("rtx4090", 21.0, 19_050.0, 2.88), ("h100", 9.0, 44_400.0, 2.87)]
    for i in range(extra_runs):
        finished.insert(0, ("a100", 15.0 + i % 7, 26_000.0 + i, 2.9 + (i % 5) / 100))
    for host, wall_s, speed, loss in finished:
        plan = plan_job(job, host, inventory=inventory)
        run = _create(store, job, plan, resolve(job, host, plan, inventory=inventory), inventory)
        _write_run_dir(Path(run.run_dir), speed, wall_s, loss, steps=196, done=True)
        store.transition(run.id, "starting", "launching")
        store.transition(run.id, "running", "trainer started", handle="c0ffee")
        clock.now += wall_s
        store.transition(run.id, "succeeded", "budget_reached: 196 steps, 401408 tokens", exit_code=0,
                         exit_reason="budget_reached", tokens=401_408, steps=196, tokens_per_s=speed,
                         best_eval_loss=loss, final_eval_loss=loss + 0.01, peak_bytes=612 * 2**20)
        ids.append(run.id)
    plan = plan_job(job, "local", inventory=inventory)
    run = _create(store, job, plan, resolve(job, "local", plan, inventory=inventory), inventory)
    _write_run_dir(Path(run.run_dir), 990.0, 180.0, 3.4, steps=80, done=False)
    store.transition(run.id, "starting", "launching")
    clock.now = NOW - 180
    store.transition(run.id, "running", "trainer started", handle="c0ffee")
    ids.append(run.id)
    store.close()
    return ids


def _create(store, job, plan, resolved, inventory):
    from runner.hosts import hardware

    hw = hardware(inventory.get(plan.host))
    return store.create(job_file="jobs/quickstart.yaml", experiment=job.name, resolved_json=resolved.model_dump_json(),
                        host=plan.host, profile=hw.profile.id, backend="native",
                        price_usd_per_hour=hw.price_usd_per_hour, max_cost_usd=None, max_hours=0.5,
                        predicted_tokens_per_s=plan.tokens_per_s, predicted_seconds=plan.seconds,
                        predicted_cost_usd=plan.cost_usd)


def _write_run_dir(run_dir: Path, speed: float, wall_s: float, final_loss: float, *, steps: int, done: bool) -> None:
    """A trainer's output as the trainer writes it: metrics.jsonl, logs/train.log, summary.json."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    planned = 196 * 2048
    events, log = [], []
    for step in range(10, steps + 1, 10):
        tokens = step * 2048
        loss = final_loss + 6.0 * (1 - step / 196) ** 2
        events.append({"event": "train", "step": step, "loss": round(loss, 4), "lr": 3e-3, "tokens": tokens,
                       "tokens_per_s": speed, "mfu": None, "elapsed_s": round(tokens / speed, 3),
                       "budget_pct": round(100 * tokens / planned, 3), "seq_len": 128, "phase": "main"})
        log.append(f"step {step:>6}/196 | loss {loss:.4f} | lr 3.00e-03 | {speed / 1000:.1f}k tok/s | mfu - | "
                   f"{100 * tokens / planned:5.1f}% | 0:00:{int(tokens / speed) % 60:02d}")
        if step % 50 == 0:
            eval_loss = final_loss + 5.0 * (1 - step / 196) ** 2 + 0.05
            events.append({"event": "eval", "step": step, "tokens": tokens, "eval_loss": round(eval_loss, 4),
                           "phase": "main"})
            log.append(f"eval step {step:>6} | eval loss {eval_loss:.4f}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "logs" / "train.log").write_text("\n".join(log) + "\n")
    if done:
        (run_dir / "summary.json").write_text(json.dumps({
            "exit_reason": "budget_reached", "steps": steps, "tokens": steps * 2048, "wall_s": wall_s,
            "tokens_per_s": speed, "best_eval_loss": final_loss, "final_eval_loss": final_loss + 0.01,
            "peak_bytes": 612 * 2**20, "memory": {}}))


LONG_LIVED = {"follow", "supervise"}  # worker groups that run as long as what they watch


async def settle(pilot, timeout_s: float = 10.0) -> None:
    """Let the short workers finish and their messages land (the app stays interactive meanwhile)."""
    from textual.worker import WorkerState

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    await pilot.pause()
    idle = 0
    while loop.time() < deadline and idle < 3:
        # Idle three polls running: a worker may start others (the host list starts one check per
        # host) and their messages land a moment after they end.
        busy = [w for w in pilot.app.workers
                if w.group not in LONG_LIVED and w.state in (WorkerState.PENDING, WorkerState.RUNNING)]
        idle = 0 if busy else idle + 1
        await pilot.pause(0.02)
    await pilot.pause(0.15)  # one more poll of the followed run's files, then a refresh


def screen_text(app) -> str:
    """What the terminal shows, as plain text lines."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())
