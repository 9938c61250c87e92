"""Calibration accuracy: after one probe of a host, how close is the planned time of a job to its measured time?

Probes this machine once (`runner probe`'s code path: a fixed-step run of the
quickstart's model shape through dispatch), sizes the quickstart job to about
``--seconds`` at the probed rate, plans it with the calibration from that probe,
runs it natively and prints the planned and measured wall time. Repeats
``--rounds`` times, each in a fresh run store. Run it on a quiet machine: other
load between the probe and the run shows up as prediction error. Usage:

    .venv/bin/python bench/calibration_accuracy.py [--rounds 3] [--seconds 120]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner import capacity, dispatch  # noqa: E402
from runner.calibration import Calibration  # noqa: E402
from runner.hosts import Host, Inventory  # noqa: E402
from runner.plan import plan_job  # noqa: E402
from runner.spec import load_jobs  # noqa: E402
from runner.store import Store  # noqa: E402

QUICKSTART = REPO / "jobs" / "quickstart.yaml"


def one_round(seconds: float) -> tuple[float, float, float, float]:
    """(probed tokens/s, run tokens/s, planned s, measured s) in a fresh run store."""
    with tempfile.TemporaryDirectory() as home:
        os.environ["RUNNER_HOME"] = home
        store = Store.open()
        try:
            inventory = Inventory({"local": Host(name="local", kind="local", profile="cpu")}, None)
            (probed,) = capacity.probe(store, "local", ["tiny"], [128], steps=40, batch_size=16, backend="native",
                                       inventory=inventory, say=lambda _: None)
            tokens = int(probed.tokens_per_s * seconds / 2048) * 2048
            sets = [f"budget.tokens={tokens}"]
            job = load_jobs(QUICKSTART, sets)[0]
            plan = plan_job(job, "local", inventory=inventory, throughput=Calibration.from_store(store))
            (prepared,) = dispatch.prepare(QUICKSTART, host="local", inventory=inventory, backend="native", sets=sets)
            run = dispatch.wait(store, dispatch.launch(store, prepared, say=lambda _: None).id)
            if run.state != "succeeded":
                raise SystemExit(f"run {run.id} {run.state}: {run.reason}")
            return probed.tokens_per_s, run.tokens_per_s or 0.0, plan.seconds, run.wall_s or 0.0
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="the job's length at the probed rate")
    args = parser.parse_args()
    errors = []
    print("| round | probe tokens/s | run tokens/s | planned s | measured s | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for i in range(args.rounds):
        probed, ran, planned, measured = one_round(args.seconds)
        errors.append((measured - planned) / planned)
        print(f"| {i + 1} | {probed:,.0f} | {ran:,.0f} | {planned:.1f} | {measured:.1f} | {errors[-1]:+.1%} |",
              flush=True)
    print(f"\nmedian error {statistics.median(errors):+.1%}, worst {max(errors, key=abs):+.1%}; "
          f"target: within 15%: {'met' if all(abs(e) < 0.15 for e in errors) else 'NOT met'}")


if __name__ == "__main__":
    main()
