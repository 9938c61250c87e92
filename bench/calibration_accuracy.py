"""Calibration accuracy: after one probe of a host, how close is the planned time of a job to its measured time?

Probes this machine once (`runner probe`'s code path: a fixed-step run of one
model shape through dispatch), sizes the quickstart job, at the same model,
sequence length and batch, to about ``--seconds`` of training at the probed
rate, plans it with the calibration from that probe, runs it natively and
compares the planned and measured wall time. Repeats ``--rounds`` times, each in
a fresh run store. The hardware profile is the one the runner detects here, as
for ``local`` with ``profile: auto``. Run it on a quiet machine: other load
between the probe and the run shows up as prediction error. It prints a markdown
table and a verdict last; ``--out`` writes the rounds as JSON after each one.
Usage:

    .venv/bin/python bench/calibration_accuracy.py [--rounds 3] [--seconds 120]   # the quickstart, on a CPU
    python3 bench/calibration_accuracy.py --model gpt2-124m --seq 1024 --batch 16 --probe-steps 100 \\
        --set eval.every_steps=1000 --set checkpoint.every_steps=1000 --out calibration-gpu.json   # on a GPU

``--job-batch`` plans and runs the job at another micro-batch than the probe's:
then the plan stands on the fixed cost per micro-batch that the probe's second,
smaller run measured.

Both tokens/s are rates after the first logged steps, which hold compilation and
start-up (a run's fixed overhead). On a GPU, ``--set`` spaces out the
quickstart's evaluations and checkpoints, every 50 steps for a CPU: there they
would write a GPT-2 124M checkpoint (1.5 GB with its optimizer) every few seconds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner import capacity, dispatch  # noqa: E402
from runner.hosts import Host, Inventory, detect_local, hardware  # noqa: E402
from runner.store import Store  # noqa: E402

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
TARGET = 0.15  # the issue's: within 15% after one probe


@dataclass(frozen=True)
class Round:
    """One probe and one planned run, in a fresh run store."""

    probe_tokens_per_s: float
    probe_wall_s: float
    run_tokens_per_s: float
    tokens: int
    planned_s: float
    measured_s: float
    throughput_source: str

    @property
    def error(self) -> float:
        """Measured over planned, less one: positive when the run took longer than planned."""
        return (self.measured_s - self.planned_s) / self.planned_s

    @property
    def planned_overhead_s(self) -> float:
        """Planned time beyond the tokens at the probe's rate: the run's fixed overhead, and with
        ``--job-batch`` the fixed cost of the job's extra micro-batches too."""
        return self.planned_s - self.tokens / self.probe_tokens_per_s

    @property
    def measured_overhead_s(self) -> float:
        return self.measured_s - self.tokens / self.run_tokens_per_s


def one_round(args: argparse.Namespace, inventory: Inventory) -> Round:
    with tempfile.TemporaryDirectory() as home:
        os.environ["RUNNER_HOME"] = home
        store = Store.open()
        try:
            (probed,) = capacity.probe(store, "local", [args.model], [args.seq], steps=args.probe_steps,
                                       batch_size=args.batch, backend="native", inventory=inventory,
                                       say=lambda _: None)
            if not probed.stable:
                raise SystemExit(f"probe {probed.run_id}: {probed.outcome}: {probed.detail}")
            job_batch = args.job_batch or args.batch
            tokens_per_step = args.seq * job_batch
            tokens = int(probed.tokens_per_s * args.seconds / tokens_per_step) * tokens_per_step
            sets = [f"model={args.model}", f"data.seq_len={args.seq}", f"train.batch_size={job_batch}",
                    f"budget.tokens={tokens}", *args.sets]
            # planned with the calibration in this store, as `runner run` plans
            (prepared,) = dispatch.prepare(QUICKSTART, host="local", inventory=inventory, backend="native", sets=sets)
            if not prepared.plan.throughput_source.startswith("calibrated"):  # then the probe was not used
                raise SystemExit(f"the job is planned from the {prepared.plan.throughput_source}, not the probe")
            run = dispatch.wait(store, dispatch.launch(store, prepared, say=lambda _: None).id)
            if run.state != "succeeded":
                raise SystemExit(f"run {run.id} {run.state}: {run.reason}")
            run_rate = capacity.steady_tokens_per_s(Path(run.run_dir)) or run.tokens_per_s or 0.0
            return Round(probed.tokens_per_s, probed.wall_s, run_rate, tokens, prepared.plan.seconds,
                         run.wall_s or 0.0, prepared.plan.throughput_source)
        finally:
            store.close()


def verdict(rounds: list[Round]) -> str:
    errors = [r.error for r in rounds]
    met = all(abs(e) < TARGET for e in errors)
    return (f"median error {statistics.median(errors):+.1%}, worst {max(errors, key=abs):+.1%}; "
            f"target: within {TARGET:.0%}: {'met' if met else 'NOT met'}")


def report(args: argparse.Namespace, inventory: Inventory, rounds: list[Round]) -> dict:
    hw = hardware(inventory.get("local"))
    return {
        "date": datetime.date.today().isoformat(), "device": detect_local().device_name, "profile": hw.profile.id,
        "gpus": hw.gpus,
        "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
        "model": args.model, "seq_len": args.seq, "micro_batch": args.batch, "job_micro_batch": args.job_batch or args.batch,
        "probe_steps": args.probe_steps,
        "seconds": args.seconds, "sets": args.sets,
        "rounds": [{**asdict(r), "error": round(r.error, 4), "planned_overhead_s": round(r.planned_overhead_s, 1),
                    "measured_overhead_s": round(r.measured_overhead_s, 1)} for r in rounds],
        "verdict": verdict(rounds), "command": " ".join(sys.argv),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="the job's training time at the probed rate")
    parser.add_argument("--model", default="tiny", help="a model preset (default: the quickstart's)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the probe and the job")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch of the probe and the job")
    parser.add_argument("--job-batch", type=int, help="micro-batch of the job, when not the probe's: "
                        "checks the fixed cost per micro-batch that the probe's smaller runs measure")
    parser.add_argument("--probe-steps", type=int, default=40, help="steps of each probe")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                        help="another override of the job (not the probe), as `runner run --set`")
    parser.add_argument("--out", type=Path, help="also write the rounds here as JSON")
    args = parser.parse_args()
    inventory = Inventory({"local": Host(name="local", kind="local")}, None)  # profile auto: detected
    print(f"{hardware(inventory.get('local')).source}: {args.model}, seq {args.seq}, batch {args.batch}", flush=True)
    rounds: list[Round] = []
    lines = ["| round | probe tokens/s | run tokens/s | planned s | measured s | error |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i in range(args.rounds):
        r = one_round(args, inventory)
        rounds.append(r)
        lines.append(f"| {i + 1} | {r.probe_tokens_per_s:,.0f} | {r.run_tokens_per_s:,.0f} | {r.planned_s:.1f} | "
                     f"{r.measured_s:.1f} | {r.error:+.1%} |")
        print(f"round {i + 1}: probe {r.probe_wall_s:.0f}s, {r.throughput_source}; planned {r.planned_s:.1f}s "
              f"(overhead {r.planned_overhead_s:.1f}s), measured {r.measured_s:.1f}s "
              f"(overhead {r.measured_overhead_s:.1f}s): {r.error:+.1%}", flush=True)
        if args.out:  # after each round, so a run cut short still leaves the rounds it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report(args, inventory, rounds), indent=2) + "\n")
    print("\n".join(["", *lines, "", verdict(rounds)]))


if __name__ == "__main__":
    main()
