"""Running jobs: plan, refuse or launch, follow, enforce caps, cancel, resume, reconcile.

``prepare`` does every check that can fail before anything starts (the job
file, missing data, the planner's verdict), ``launch`` records a run and starts
its trainer on a backend, ``wait`` follows it to the end while enforcing the
money and time caps, and ``reconcile`` brings runs whose runner went away back
in line with what really happened (read from the container, the process and
``summary.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runner import images, probe
from runner.backends import (DEFAULT_GRACE_S, LOG_FILE, Backend, LaunchSpec, Status, choose_backend, get_backend,
                             trainer_env)
from runner.backends.native import process_alive
from runner.catalog import Profile, profile as catalog_profile
from runner.errors import EXIT_REFUSED, UserError, UserErrors
from runner.hosts import Hardware, Host, Inventory, hardware, load_inventory
from runner.launch import launch_env
from runner.calibration import Calibration, default_calibration
from runner.plan import Plan, plan_job, plan_resolved, resolve
from runner.resolved import ResolvedRun
from runner.spec import Job, check_job, load_jobs
from runner.store import ACTIVE, TERMINAL, IllegalTransition, Run, Store, data_dir

if TYPE_CHECKING:
    from runner.backends.ssh import SSHBackend
    from runner.sync import SyncReport

Say = Callable[[str], None]
PEAK_ENV = "RUNNER_PEAK_TFLOPS"
SUMMARY_FILE = "summary.json"
FINISHED_OK = {"budget_reached", "early_stop"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Prepared:
    """One experiment, checked and planned, ready to launch on one host."""

    job: Job
    host: Host
    hardware: Hardware
    plan: Plan
    resolved: ResolvedRun
    backend: str
    image: images.ImageRef | None  # docker only


# --- before anything starts -------------------------------------------------------------------

def prepare(job_file: str | Path, *, experiment: str | None = None, host: str = "local",
            sets: list[str] | None = None, force: bool = False, backend: str | None = None,
            inventory: Inventory | None = None, node_hosts: list[str] | None = None,
            settle: bool = False, throughput: Calibration | None = None) -> list[Prepared]:
    """Check and plan every experiment of a job file; raise before anything starts.

    An experiment with ``train.nodes`` above 1 runs on the first ``nodes`` of
    ``node_hosts`` (default: its ``hosts:``), planned on the first, which holds
    the run directory. UserErrors (exit 2) for an invalid job or a missing data
    file, UserError with exit 3 when the planner refuses an experiment and
    ``force`` is not set. ``settle``: a probe, which runs a job refused only for
    being at the card's limit, since its outcome is what decides that.
    ``throughput``: the measurements of the store the run goes into (default: the
    default store's, as `runner plan` reads them).
    """
    inventory = inventory or load_inventory()
    target = inventory.get(host)
    jobs = load_jobs(job_file, sets or [])
    if experiment:
        jobs = [j for j in jobs if j.name == experiment]
        if not jobs:
            raise UserError(f"no experiment named {experiment!r}", file=str(job_file), field="experiment")
    errors = [e for job in jobs for e in check_job(job, inventory.names)]
    errors += [e for job in jobs for e in _node_errors(job, node_hosts, inventory)]
    if errors:
        raise UserErrors(errors)
    prepared = []
    if throughput is None:
        throughput = default_calibration()  # the same measured figures `runner plan` uses
    for job in jobs:
        nodes = job.spec.train.nodes
        spread_over = list((node_hosts or job.spec.hosts)[:nodes]) if nodes > 1 else []
        target = inventory.get(spread_over[0]) if spread_over else inventory.get(host)
        if target.kind == "ssh":
            if (backend or "auto") not in ("auto", "ssh"):
                raise UserError(f"host {target.name!r} is reached over SSH: its runs go in a container there",
                                field="backend", hint="leave --backend out for remote hosts")
            remote_backend(inventory)
        hw = hardware(target)
        plan = plan_job(job, target, inventory=inventory, throughput=throughput)
        if settle and plan.at_limit and len(plan.reasons) == 1:  # refused for that alone
            plan = replace(plan, passes=True)
        if not plan.passes:
            if not force or plan.profile is None:
                raise refusal(job, plan)
            _stderr(f"warning: {job.name}: the planner refuses it ({'; '.join(plan.reasons)}); running anyway (--force)")
            plan = replace(plan, passes=True)
        resolved = resolve(job, target, plan, inventory=inventory)
        if spread_over:  # the backend starts one torchrun on each, in this order
            resolved = resolved.model_copy(update={"experiment": resolved.experiment.model_copy(
                update={"hosts": spread_over})})
        chosen = "ssh" if target.kind == "ssh" else choose_backend(hw.profile, backend or job.spec.backend)
        image = None
        if chosen == "docker" or (chosen == "ssh" and any(
                inventory.get(h).backend == "docker" for h in spread_over or [target.name])):
            family = images.family_for(hw.profile)
            if family is None:  # only an SSH host can get here: choose_backend never picks docker for it
                raise UserError(f"profile {hw.profile.id} runs natively, but a host over SSH runs the trainer "
                                "in a container", field=target.name, hint="give the host a container profile")
            image = images.image_for(family)
            _check_probed(job, [inventory.get(h) for h in spread_over or [target.name]], hw.profile, force)
        prepared.append(Prepared(job, target, hw, plan, resolved, chosen, image))
    return prepared


def _node_errors(job: Job, node_hosts: list[str] | None, inventory: Inventory) -> list[UserError]:
    """Why a job over several hosts cannot start on them: too few, repeated, or this machine among them."""
    nodes = job.spec.train.nodes
    if nodes == 1:
        return []
    chosen = list((node_hosts or job.spec.hosts)[:nodes])
    field = ("hosts",) if node_hosts is None else ("train", "nodes")
    if len(chosen) < nodes:
        return [job.error(field, f"train.nodes: {nodes} needs {nodes} hosts, and {len(chosen)} are given: "
                                 f"{', '.join(chosen) or 'none'}")]
    local = [h for h in chosen if h in inventory.hosts and inventory.get(h).kind != "ssh"]
    if local:
        return [job.error(field, f"a run over several hosts starts one torchrun per SSH host; {local[0]} is this "
                                 "machine", hint="name SSH hosts from the inventory")]
    if len(set(chosen)) < nodes:
        return [job.error(field, f"the {nodes} hosts of a multi-host run must differ: {', '.join(chosen)}")]
    return []


def probe_blockers(host: Host, profile: Profile) -> list[str]:
    """What the last probe of an SSH host found that keeps its image from running there (no engine, no
    NVIDIA Container Toolkit, a driver too old for its CUDA); empty when it was never probed."""
    cached = probe.read_cached(host.name)
    found = probe.blockers(cached, probe.image_family(host, profile.id)) if cached else []
    return [f"{problem} (probed {cached.probed_at})" for problem in found]


def _check_probed(job: Job, targets: list[Host], profile: Profile, force: bool) -> None:
    """Refuse SSH hosts whose last probe found the job's image cannot run there, unless ``force``."""
    for host in targets:
        problems = probe_blockers(host, profile)
        if not problems:
            continue
        said = f"{host.name} cannot run the {images.family_for(profile).name} image: " + "; ".join(problems)
        if not force:
            raise UserError(said, file=job.file, field=job.name, exit_code=EXIT_REFUSED,
                            hint=f"fix it on the host, then `runner hosts probe {host.name}` again; "
                                 "or run it anyway with --force")
        _stderr(f"warning: {job.name}: {said}; running anyway (--force)")


def refusal(job: Job, plan: Plan) -> UserError:
    """The planner's no, with its reasons and fixes, as an exit-3 error."""
    fixes = [f"fix: {f.summary}" + (f" ({f.command_hint()})" if f.command_hint() else "") for f in plan.fixes]
    return UserError(f"refused on {plan.host}: " + "; ".join(plan.reasons), file=job.file, field=job.name,
                     hint="\n  ".join(fixes + ["or run it anyway with --force"]), exit_code=EXIT_REFUSED)


# --- starting ---------------------------------------------------------------------------------

_BACKENDS: dict[str, Backend] = {}


def backend_for(name: str) -> Backend:
    """One backend instance per process (the native one keeps its children to reap them)."""
    if name == "ssh":
        return remote_backend()
    if name not in _BACKENDS:
        _BACKENDS[name] = get_backend(name)
    return _BACKENDS[name]


def launch(store: Store, prep: Prepared, say: Say = _stderr) -> Run:
    """Record the run and start its trainer; the run is ``running`` (or ``failed``, re-raised) after."""
    spec, caps = prep.job.spec, prep.job.spec.budget
    run = store.create(
        job_file=str(Path(prep.job.file).resolve()), experiment=prep.job.name,
        resolved_json=prep.resolved.model_dump_json(), host=prep.host.name, profile=prep.hardware.profile.id,
        backend=prep.backend, image=prep.image.tag if prep.image else None,
        price_usd_per_hour=prep.hardware.price_usd_per_hour, max_cost_usd=caps.max_cost_usd,
        max_hours=caps.max_hours, predicted_tokens_per_s=prep.plan.tokens_per_s,
        predicted_seconds=prep.plan.seconds, predicted_cost_usd=prep.plan.cost_usd,
        reason=f"submitted {spec.name} from {prep.job.file}")
    say(f"run {run.id}: {run.experiment} on {run.host} ({run.backend}), run directory {run.run_dir}")
    return _start(store, run, prep.resolved, prep.hardware.profile, prep.image, say)


def _start(store: Store, run: Run, resolved: ResolvedRun, profile: Profile, image: images.ImageRef | None,
           say: Say) -> Run:
    run_dir = Path(run.run_dir)
    try:
        run = store.transition(run.id, "starting", f"starting attempt {run.attempt} with {run.backend}")
        run_dir.mkdir(parents=True, exist_ok=True)
        backend = backend_for(run.backend)
        tag = None
        if image is not None and run.backend == "ssh":
            tag = image.tag  # the backend puts it on the host by the cheapest path
        elif image is not None:
            from runner.backends.docker import DockerBackend

            assert isinstance(backend, DockerBackend)
            log = data_dir() / "builds" / f"{image.tag.replace(':', '-')}.log"
            started = time.monotonic()
            if images.ensure_image(backend.client, image, log, say):
                say(f"built image {image.tag} in {time.monotonic() - started:.0f}s (log: {log})")
            tag = image.tag
        env = trainer_env()
        env["RUNNER_RUN_ID"] = run.id
        env.update(launch_env(DEFAULT_GRACE_S))  # torchrun's wait for a stopped run's checkpoint
        peak = profile.tflops.get(resolved.precision)
        if peak:
            env[PEAK_ENV] = f"{peak:g}"  # one GPU's: the trainer multiplies by its processes
        spec = LaunchSpec(run_id=run.id, attempt=run.attempt, run_dir=run_dir, resolved=resolved, profile=profile,
                          gpus=resolved.gpus, env=env, image=tag)
        handle = backend.launch(spec)
        store.update(run.id, handle=handle, image=tag)
        if run.backend == "ssh":
            from runner.backends.ssh import describe

            what = describe(handle)
        else:
            what = f"container {handle[:12]}" if run.backend == "docker" else f"pid {handle.partition('@')[0]}"
        return store.transition(run.id, "running", f"{what} started")
    except BaseException as exc:
        message = exc.render() if isinstance(exc, UserError) else (
            "interrupted while starting" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
        current = store.get(run.id)
        if current.state not in TERMINAL:
            store.transition(run.id, "failed", f"launch failed: {message}")
        raise


# --- following and finishing ------------------------------------------------------------------

def cap_reached(run: Run, now: float | None = None) -> str | None:
    """Why a run must stop now (its max_hours or max_cost_usd is reached), or None."""
    elapsed = run.elapsed_s(now)
    if run.max_hours and elapsed >= run.max_hours * 3600:
        return f"max_hours cap reached after {elapsed / 3600:.2f} h (cap {run.max_hours:g} h)"
    cost = elapsed / 3600 * run.price_usd_per_hour
    if run.max_cost_usd and run.price_usd_per_hour > 0 and cost >= run.max_cost_usd:
        return f"max_cost_usd cap reached: ${cost:.2f} spent (cap ${run.max_cost_usd:g})"
    return None


def wait(store: Store, run_id: str, *, out: IO[bytes] | None = None, grace_s: float = DEFAULT_GRACE_S,
         poll_s: float = 1.0, offset: int = 0) -> Run:
    """Follow a run to its end: copy its log from ``offset`` to ``out``, stop it at a cap, record how it ended."""
    run = store.get(run_id)
    while True:
        run = store.get(run.id)
        backend = backend_for(run.backend)
        run_dir = Path(run.run_dir)
        if run.handle:
            backend.sync_logs(run.handle, run_dir)
        offset = _copy_new(run_dir / LOG_FILE, offset, out)
        if run.state in TERMINAL:
            return run
        if not run.handle:
            run = reconcile_run(store, run)
            time.sleep(poll_s)
            continue
        status = backend.poll(run.handle, run_dir)
        if not status.running:
            run = finish(store, run, status)
            continue
        why = cap_reached(run)
        if why and run.state == "running":
            run = store.transition(run.id, "stopping", f"{why}; stopping with a checkpoint", expect={"running"})
            backend.stop(run.handle, grace_s)
            continue
        time.sleep(poll_s)


def _copy_new(log: Path, offset: int, out: IO[bytes] | None) -> int:
    if out is None or not log.exists():
        return offset
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        out.write(data)
        out.flush()
    return offset + len(data)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def finish(store: Store, run: Run, status: Status) -> Run:
    """Record how a trainer that is no longer running ended, from its exit code and summary.json.

    ``run`` is read again first: a follower may have read it before a cancel from
    another process began, and the cancel is what makes the trainer's exit a
    cancellation by the user rather than a signal from outside the runner.
    """
    current = store.get(run.id)
    if current.state in TERMINAL or current.handle != run.handle:
        return current  # another runner recorded the end first, or a new attempt runs
    run = current
    run_dir = Path(run.run_dir)
    backend = backend_for(run.backend)
    if run.handle:
        backend.sync_logs(run.handle, run_dir)
    summary = read_summary(run_dir)
    state, reason = _verdict(run, status, summary)
    measured: dict[str, Any] = {"exit_code": status.exit_code}
    if summary:
        measured.update({k: summary.get(k) for k in ("tokens_per_s", "tokens", "steps", "peak_bytes", "mfu",
                                                      "final_eval_loss", "best_eval_loss", "exit_reason")})
    try:
        run = store.transition(run.id, state, reason, expect={"starting", "running", "stopping"}, **measured)
    except IllegalTransition:
        return store.get(run.id)  # another runner recorded the end first
    if run.handle:
        backend.release(run.handle)
    return run


def _verdict(run: Run, status: Status, summary: dict[str, Any] | None) -> tuple[str, str]:
    code, stopping = status.exit_code, run.state == "stopping"
    exit_reason = (summary or {}).get("exit_reason")
    if status.gone and summary is None:
        return "lost", status.detail or "the trainer disappeared without an exit code or a summary"
    if code == 0 and summary is not None:
        if exit_reason in FINISHED_OK:
            return "succeeded", f"{exit_reason}: {summary.get('steps')} steps, {summary.get('tokens')} tokens"
        if exit_reason == "max_time":
            return "cancelled", "the max_hours cap was reached; the trainer checkpointed and stopped"
        if exit_reason == "cancelled":
            return "cancelled", (run.reason if stopping else "stopped by a signal from outside the runner") + \
                f" (checkpoint {summary.get('checkpoint')})"
        return "failed", f"the trainer reported an error: {summary.get('error') or exit_reason}"
    if code == 0:
        return "failed", "the trainer exited 0 without writing summary.json"
    if stopping:
        if code == 137:
            return "cancelled", f"{run.reason}; it did not stop within the grace period and was killed"
        return "cancelled", f"{run.reason}; it ended with exit code {code} before it could checkpoint"
    if status.detail and "OOM" in status.detail:
        return "failed", status.detail
    if code == 137:
        return "failed", "killed with SIGKILL from outside the runner (exit code 137)"
    if code == 143:
        return "failed", "terminated by SIGTERM from outside the runner before it could checkpoint (exit code 143)"
    error = (summary or {}).get("error") or _last_line(Path(run.run_dir) / LOG_FILE)
    return "failed", f"the trainer exited with code {code}" + (f": {error}" if error else "")


def _last_line(log: Path) -> str | None:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1].strip() if lines else None


# --- reconciling ------------------------------------------------------------------------------

def reconcile_run(store: Store, run: Run) -> Run:
    """Bring one active run in line with reality; terminal runs are returned as they are."""
    if run.state in TERMINAL:
        return run
    if not run.handle:
        if run.launcher_pid == os.getpid() or (run.launcher_pid and process_alive(run.launcher_pid)):
            return run  # still being launched
        try:
            return store.transition(run.id, "failed", "the runner launching it exited before the trainer started",
                                    expect={"queued", "starting"})
        except IllegalTransition:
            return store.get(run.id)
    try:
        backend = backend_for(run.backend)
    except UserError:
        return run  # the engine is unreachable: nothing can be said about the container now
    status = backend.poll(run.handle, Path(run.run_dir))
    if status.running:
        backend.sync_logs(run.handle, Path(run.run_dir))
        return run
    return finish(store, run, status)


def reconcile(store: Store) -> list[Run]:
    """Reconcile every active run; return all runs, newest first."""
    for run in store.runs(states={"queued", "starting", "running", "stopping"}):
        reconcile_run(store, run)
    return store.runs()


# --- user actions on a recorded run -----------------------------------------------------------

def cancel(store: Store, run_id: str, *, grace_s: float = DEFAULT_GRACE_S,
           reason: str = "cancelled by the user") -> Run:
    """Stop a run gracefully (the trainer checkpoints), then record it as cancelled."""
    run = reconcile_run(store, store.get(run_id))
    if run.state in TERMINAL:
        raise UserError(f"run {run.id} already ended: {run.state} ({run.reason})", field="run")
    if not run.handle:
        return store.transition(run.id, "cancelled", f"{reason} before it started", expect={"queued", "starting"})
    if run.state != "stopping":
        run = store.transition(run.id, "stopping", reason, expect={"starting", "running"})
    backend = backend_for(run.backend)
    try:
        backend.stop(run.handle, grace_s)
    except UserError as exc:
        if run.backend != "ssh":
            raise
        # The host does not answer: record that the run is out of reach, so it can resume elsewhere.
        return store.transition(run.id, "lost", f"{reason}, but {exc.message}; the container may still run there",
                                expect={"stopping"})
    deadline = time.monotonic() + 30
    status = backend.poll(run.handle, Path(run.run_dir))
    while status.running and time.monotonic() < deadline:
        time.sleep(0.5)
        status = backend.poll(run.handle, Path(run.run_dir))
    return finish(store, run, status) if not status.running else store.get(run.id)


def resume(store: Store, run_id: str, say: Say = _stderr, *, host: str | None = None, force: bool = False) -> Run:
    """Start a new attempt of a run that did not succeed, in the same run directory.

    The trainer continues from the newest intact checkpoint there. A remote run
    may continue on another ``host`` where it fits as resolved (or anyway, with ``force``).
    """
    run = reconcile_run(store, store.get(run_id))
    if run.backend == "ssh":
        return resume_remote(store, run, host=host, force=force, say=say)
    if host not in (None, run.host):
        raise UserError(f"run {run.id} ran on {run.host} here; only runs on SSH hosts move", field="host")
    if run.state == "succeeded":
        raise UserError(f"run {run.id} succeeded; there is nothing to resume", field="run")
    if run.state not in TERMINAL:
        raise UserError(f"run {run.id} is still {run.state}", field="run", hint=f"runner cancel {run.id} first")
    resolved = ResolvedRun.model_validate_json(run.resolved_json)
    profile = catalog_profile(run.profile)
    image = None
    if run.backend == "docker":
        image = _image_for_resume(run, profile)
    previous = Path(run.run_dir) / SUMMARY_FILE
    if previous.exists():
        previous.replace(Path(run.run_dir) / "logs" / f"summary-attempt-{run.attempt}.json")
    checkpoints = sorted((Path(run.run_dir) / "checkpoints").glob("step-*"))
    where = f"from {checkpoints[-1].name}" if checkpoints else "from the start (no checkpoint)"
    run = store.transition(run.id, "queued", f"resume requested: attempt {run.attempt + 1} continues {where}")
    log = Path(run.run_dir) / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"--- attempt {run.attempt}: continues {where}\n")
    say(f"run {run.id}: attempt {run.attempt} continues {where}")
    return _start(store, run, resolved, profile, image, say)


def _image_for_resume(run: Run, profile: Profile) -> images.ImageRef:
    """The image the run used, while it exists; else the current sources' image."""
    family = images.family_for(profile)
    if family is None:
        raise UserError(f"profile {profile.id} has no container image", field="backend")
    current = images.image_for(family)
    if run.image and run.image != current.tag:
        backend = backend_for("docker")
        from runner.backends.docker import DockerBackend

        assert isinstance(backend, DockerBackend)
        import docker.errors

        try:
            backend.client.images.get(run.image)
            return replace(current, tag=run.image)
        except docker.errors.ImageNotFound:
            pass
    return current


def log_size(run: Run) -> int:
    """How many bytes of the run's log exist now (to follow only what comes after)."""
    try:
        return (Path(run.run_dir) / LOG_FILE).stat().st_size
    except OSError:
        return 0


def follow_logs(store: Store, run_id: str, out: IO[bytes], *, follow: bool = False, poll_s: float = 1.0) -> Run:
    """Print a run's log; with ``follow``, keep printing until the run ends."""
    run = reconcile_run(store, store.get(run_id))
    if follow and run.state not in TERMINAL:
        return wait(store, run.id, out=out, poll_s=poll_s, grace_s=DEFAULT_GRACE_S)
    _copy_new(Path(run.run_dir) / LOG_FILE, 0, out)
    return run


def run_json(store: Store, run: Run) -> dict[str, Any]:
    """A run as JSON-ready data: the store's record, its transitions and the trainer's summary."""
    data = run.as_dict()
    data["transitions"] = [vars(t) for t in store.transitions(run.id)]
    data["summary"] = read_summary(Path(run.run_dir))
    return data


# --- remote hosts -----------------------------------------------------------------------------

_HOSTS_FILE: list[str | Path | None] = [None]


def use_hosts_file(path: str | Path | None) -> None:
    """Read SSH hosts from this inventory file (``--hosts-file``) when a remote run is followed."""
    _HOSTS_FILE[0] = path
    backend = _BACKENDS.get("ssh")
    if backend is not None and backend.hosts_file != path:  # type: ignore[attr-defined]
        backend.hosts_file = path  # type: ignore[attr-defined]
        backend.inventory = load_inventory(path)  # type: ignore[attr-defined]


def remote_backend(inventory: Inventory | None = None) -> SSHBackend:
    """The process's SSH backend, one connection per host; ``inventory`` replaces the hosts it reads."""
    from runner.backends.ssh import SSHBackend

    backend = _BACKENDS.get("ssh")
    if not isinstance(backend, SSHBackend):
        backend = SSHBackend(hosts_file=_HOSTS_FILE[0], say=_stderr)
        _BACKENDS["ssh"] = backend  # type: ignore[assignment]
    if inventory is not None:
        backend.inventory = inventory
    return backend


def sync_run(store: Store, run_id: str) -> SyncReport:
    """Bring a remote run's directory home now."""
    run = store.get(run_id)
    if run.backend != "ssh":
        raise UserError(f"run {run.id} ran on this machine; its directory is already here: {run.run_dir}",
                        field="run")
    return remote_backend().pull(run.host, run.id, Path(run.run_dir))


def resume_remote(store: Store, run: Run, *, host: str | None = None, force: bool = False,
                  say: Say = _stderr) -> Run:
    """Start a new attempt of a remote run, on its host or on ``host``, from the newest intact checkpoint.

    A run that moves must fit the new host as it was resolved (``move_refusal``),
    unless ``force``; a refused move changes nothing. What the old host still has
    comes home first, when it answers, and its old container is removed; the
    newest checkpoint verified at home then goes to the target host unless it
    has it (with the rest of the run directory when the run moves), so the
    trainer continues from the newest one on either side.
    """
    from runner.backends.ssh import newest_complete_checkpoint, remote_has_image

    if run.state == "succeeded":
        raise UserError(f"run {run.id} succeeded; there is nothing to resume", field="run")
    if run.state not in TERMINAL:
        raise UserError(f"run {run.id} is still {run.state}", field="run", hint=f"runner cancel {run.id} first")
    planned_run = ResolvedRun.model_validate_json(run.resolved_json)
    if planned_run.nodes > 1 and host not in (None, run.host):
        raise UserError(f"run {run.id} runs over {', '.join(planned_run.experiment.hosts)}; it resumes there, "
                        f"with rank 0 on {run.host}", field="host", hint="start a new run to use other hosts")
    backend = remote_backend()
    target = backend.inventory.get(host or run.host)
    hw, family = _resume_target(run, target)
    moved = target.name != run.host
    if moved:  # before anything is pulled or copied: a refused move leaves the run as it was
        refused = move_refusal(store, run, target, backend.inventory)
        if refused is not None and not force:
            raise refused
        if refused is not None:
            say(f"warning: {refused.message}; resuming it there anyway (--force)")
    local_dir = Path(run.run_dir)
    try:
        backend.pull(run.host, run.id, local_dir)
        if run.handle:
            backend.release(run.handle)  # a container left behind by an unreachable host must not write on
    except UserError as exc:  # the old host does not answer, or is no longer in the inventory
        if target.name == run.host:
            raise
        say(f"{run.host}: {exc.message}; continuing from what is here")
    newest = newest_complete_checkpoint(local_dir)
    where = f"from {newest.name}" if newest else "from the start (no checkpoint)"
    image = images.image_for(family)
    if run.image and run.image != image.tag:
        with backend.lock(target.name):
            if remote_has_image(backend.connection(target.name), run.image):
                image = replace(image, tag=run.image)
    resolved = ResolvedRun.model_validate_json(run.resolved_json)
    on = f" on {target.name}" + (f" (moved from {run.host})" if moved else "")
    ended_attempt = run.attempt
    if moved:
        resolved = resolved.model_copy(update={"host": target.name, "profile": hw.profile.id})
    run = store.transition(run.id, "queued", f"resume requested: attempt {run.attempt + 1} continues {where}{on}",
                           host=target.name, profile=hw.profile.id, price_usd_per_hour=hw.price_usd_per_hour,
                           resolved_json=resolved.model_dump_json())
    summary = local_dir / SUMMARY_FILE
    if summary.exists():
        summary.replace(local_dir / "logs" / f"summary-attempt-{ended_attempt}.json")
    try:
        backend.prepare_resume(target.name, run.id, local_dir, ended_attempt,
                               f"--- attempt {run.attempt}: continues {where}{on}\n", moved=moved)
    except BaseException as exc:
        message = exc.render() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        store.transition(run.id, "failed", f"resume failed: {message}", expect={"queued"})
        raise
    say(f"run {run.id}: attempt {run.attempt} continues {where}{on}")
    return _start(store, run, resolved, hw.profile, image, say)


def _resume_target(run: Run, target: Host) -> tuple[Hardware, str]:
    """The hardware and image family of a host a remote run may resume on; UserError when it cannot."""
    if target.kind != "ssh":
        raise UserError(f"{target.name} is this machine; a remote run resumes on an SSH host", field="host")
    hw = hardware(target)
    family = images.family_for(hw.profile)
    if family is None:
        raise UserError(f"profile {hw.profile.id} of {target.name} runs natively, not in a container", field="host")
    planned = catalog_profile(run.profile)
    if hw.profile.device != planned.device:
        raise UserError(f"run {run.id} was planned for {planned.device} ({planned.id}); {target.name} trains on "
                        f"{hw.profile.device} ({hw.profile.id})", field="host",
                        hint="resume it on a host of the same kind, or start a new run there")
    return hw, family


def move_refusal(store: Store, run: Run, target: Host, inventory: Inventory) -> UserError | None:
    """Why a remote run, as it was resolved, cannot continue on ``target``, as an exit-3 error; None if it can.

    The planner judges the resolved run there (micro-batch, accumulation and
    precision kept, the store's measurements counted), and its GPUs must be free
    of other active runs. The fixes are the other hosts where it would go on,
    and a new run, which is planned for the host it starts on.
    """
    resolved = ResolvedRun.model_validate_json(run.resolved_json)
    throughput = Calibration.from_store(store)

    def why_not(host: Host) -> tuple[Plan, list[str]]:
        plan = plan_resolved(resolved, host, job_file=run.job_file, inventory=inventory, throughput=throughput)
        reasons = list(plan.reasons) + probe_blockers(host, hardware(host).profile)
        total, free = hardware(host).gpus, free_slots(store, host)
        if free < resolved.gpus <= total:
            slots = "GPUs" if plan.device == "cuda" else "slots"  # a host without GPUs has one slot
            reasons.append(f"runs active on {host.name} hold {total - free} of its {total} {slots}; "
                           f"this run needs {resolved.gpus}")
        return plan, reasons

    plan, reasons = why_not(target)
    if not reasons:
        return None
    elsewhere = []
    for host in inventory.hosts.values():
        if host.name == target.name:
            continue
        try:
            _resume_target(run, host)
        except UserError:  # this machine, a native profile, another device kind, or not probed
            continue
        other, blocked = why_not(host)
        if not blocked:
            elsewhere.append(other)
    fixes = [f"fix: resume it on {p.host} ({p.profile}), where it fits: runner resume {run.id}"
             + ("" if p.host == run.host else f" --host {p.host}")
             for p in sorted(elsewhere, key=lambda p: (p.cost_usd, p.seconds))[:2]]
    if plan.reasons:  # the host itself refuses, not its other runs: a new run is planned for it
        spec = resolved.experiment
        new = f"runner run {run.job_file} --experiment {run.experiment} --host {target.name}"
        if not plan.fits and not spec.curriculum:
            new += "" if spec.train.batch_size == "auto" else " --set train.batch_size=auto"
            fixes.append(f"fix: start a new run there instead; batch_size auto picks a micro-batch that fits "
                         f"{target.name}: {new}")
        else:
            fixes.append(f"fix: start a new run there instead, planned for {target.name}: {new}")
    batch = ", ".join(dict.fromkeys(f"{s.micro_batch} x {s.grad_accum}" for s in resolved.stages))
    by_stage = " by stage" if len(resolved.stages) > 1 else ""
    return UserError(
        f"run {run.id} was resolved for {run.profile} on {run.host} (micro-batch {batch} accumulation{by_stage}, "
        f"{resolved.precision}, kept on resume); refused on {target.name} ({plan.profile}): " + "; ".join(reasons),
        field="host", hint="\n  ".join(fixes + ["or resume it there anyway with --force"]), exit_code=EXIT_REFUSED)


def free_slots(store: Store, host: Host) -> int:
    """GPUs of a host that no active run holds (a host without GPUs has one slot)."""
    busy = 0
    for run in store.runs(states=set(ACTIVE)):
        resolved = ResolvedRun.model_validate_json(run.resolved_json)
        if host.name in (resolved.experiment.hosts[:resolved.nodes] if resolved.nodes > 1 else [run.host]):
            busy += resolved.gpus
    return hardware(host).gpus - busy


def spread(store: Store, job_files: list[str | Path], hosts: list[str], *, experiment: str | None = None,
           sets: list[str] | None = None, force: bool = False, backend: str | None = None,
           inventory: Inventory | None = None) -> list[Prepared]:
    """Place every experiment of the job files on a free host: one run per GPU unless it asks for more.

    Hosts with the most free GPUs are tried first; a host whose planner refuses
    the experiment is skipped. Raises before anything starts when an experiment
    fits nowhere.
    """
    inventory = inventory or load_inventory()
    throughput = Calibration.from_store(store)
    free = {name: free_slots(store, inventory.get(name)) for name in dict.fromkeys(hosts)}
    placed: list[Prepared] = []
    for job_file in job_files:
        jobs = [j for j in load_jobs(job_file, sets or []) if experiment in (None, j.name)]
        if not jobs:
            raise UserError(f"no experiment named {experiment!r}", file=str(job_file), field="experiment")
        for job in jobs:
            name = job.name
            if job.spec.train.nodes > 1:  # one run over the hosts, in the order given
                (prep,) = prepare(job_file, experiment=name, sets=sets, force=force, backend=backend,
                                  inventory=inventory, node_hosts=list(free), throughput=throughput)
                busy = [h for h in prep.resolved.experiment.hosts if free[h] < prep.resolved.gpus]
                if busy:
                    raise UserError(f"{name} runs on {', '.join(prep.resolved.experiment.hosts)}, and "
                                    f"{', '.join(f'{h} ({free[h]} free)' for h in busy)} cannot take it now",
                                    file=str(job_file), field="hosts", hint="wait for runs there to end")
                for node in prep.resolved.experiment.hosts:
                    free[node] -= prep.resolved.gpus
                placed.append(prep)
                continue
            refusals: list[UserError] = []
            for host in sorted(free, key=lambda h: -free[h]):
                if free[host] <= 0:
                    continue
                try:
                    (prep,) = prepare(job_file, experiment=name, host=host, sets=sets, force=force,
                                      backend=backend, inventory=inventory, throughput=throughput)
                except UserError as exc:
                    if exc.exit_code != EXIT_REFUSED:
                        raise
                    refusals.append(exc)
                    continue
                if prep.resolved.gpus <= free[host]:
                    free[host] -= prep.resolved.gpus
                    placed.append(prep)
                    break
            else:
                if refusals:
                    raise refusals[0]
                raise UserError(f"no free host for {name}: {', '.join(f'{h} ({n} free)' for h, n in free.items())}",
                                file=str(job_file), field="hosts",
                                hint="add hosts to --hosts, or wait for runs on them to end")
    return placed


class _Prefixed:
    """Writes whole lines of one run's log to a shared stream, each prefixed with the run id."""

    def __init__(self, out: IO[bytes], prefix: str, lock):
        self.out, self.prefix, self.lock, self.pending = out, prefix.encode(), lock, b""

    def write(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if lines:
            with self.lock:
                self.out.write(b"".join(self.prefix + line + b"\n" for line in lines))

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


def wait_many(store: Store, run_ids: list[str], *, out: IO[bytes] | None = None, grace_s: float = DEFAULT_GRACE_S,
              poll_s: float = 1.0) -> list[Run]:
    """Follow several runs at once (one thread and store connection each); their log lines are prefixed."""
    import threading

    if len(run_ids) == 1:
        return [wait(store, run_ids[0], out=out, grace_s=grace_s, poll_s=poll_s)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def follow(run_id: str) -> None:
        own = Store.open(store.path)
        try:
            stream = _Prefixed(out, f"[{run_id}] ", lock) if out is not None else None
            wait(own, run_id, out=stream, grace_s=grace_s, poll_s=poll_s)  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=follow, args=(run_id,), daemon=True) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [store.get(run_id) for run_id in run_ids]
