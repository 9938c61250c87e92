"""``python -m runner.trainer JOB_OR_RESOLVED_JSON --out RUN_DIR``: train one run.

Given a ``resolved.json`` (what the runner writes), it runs that plan. Given a
job file, it resolves the plan for this machine first (``runner.plan.resolve``),
which is how a job is tried by hand. Exit code 0 when the run ended normally
(budget reached, early stop, max time, cancelled by a signal), 1 on an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.errors import UserError, UserErrors
from runner.trainer import allocator


def load_resolved(path: Path, experiment: str | None, sets: list[str], host: str):
    from runner.resolved import ResolvedRun

    if path.suffix == ".json":
        from pydantic import ValidationError

        try:
            return ResolvedRun.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            raise UserError(f"not a resolved run: {exc}".splitlines()[0], file=str(path)) from None
    from runner.spec import load_jobs, pick_experiment

    job = pick_experiment(load_jobs(path, sets), experiment, path)
    try:
        from runner.plan import resolve
    except ImportError:
        raise UserError("the planner (runner.plan) is not installed here, so a job file cannot be resolved",
                        file=str(path), hint="pass the resolved.json that `runner plan` writes") from None
    return resolve(job, host=host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="a resolved.json, or a job file (.yaml) to resolve for this machine")
    parser.add_argument("--out", type=Path, required=True, help="the run directory (resumes if it has a checkpoint)")
    parser.add_argument("--experiment", help="which experiment of a multi-experiment job file")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a job-file field, e.g. --set budget.tokens=1M")
    parser.add_argument("--host", default="local", help="the host to resolve a job file for (default: local)")
    args = parser.parse_args(argv)
    allocator.configure()  # before torch touches CUDA
    try:
        resolved = load_resolved(args.input, args.experiment, args.sets, args.host)
    except (UserError, UserErrors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from runner.trainer.loop import train

    summary = train(resolved, args.out)
    return 1 if summary.exit_reason == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
