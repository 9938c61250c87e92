"""The Docker backend: the trainer in a detached container of the trainer image.

The container sees the run directory read-write at ``/workspace/run``, each
input's directory read-only under ``/inputs/N``, and only the allow-listed
environment. ``resolved.json`` in the run directory carries the container's
paths; the store keeps the host's.

Inside it the supervisor (``runner.backends.supervisor``) runs the trainer and
appends its output, whole lines with secrets redacted, to ``logs/train.log`` in
the mounted run directory, as on SSH hosts and natively: the log is written
where the runner reads it, with no copy through Docker's log API.
"""

from __future__ import annotations

import os
from pathlib import Path

import docker
import docker.errors
import docker.types

from runner.backends import (DEFAULT_GRACE_S, LOG_FILE, LaunchSpec, Status, redact, relocate_inputs, secret_values,
                             supervisor)
from runner.errors import EXIT_FAILED, UserError
from runner.launch import trainer_argv
from runner.resolved import ResolvedRun

RUN_MOUNT = "/workspace/run"
INPUTS_MOUNT = "/inputs"
IMAGE_UID = 1000  # the image's non-root user (see Dockerfile)
TEST_LABEL_ENV = "RUNNER_TEST_LABEL"  # set by the test suite to its session id: containers get runner.test=<id>
# Bytes of Docker's log already copied, for a container whose trainer prints there (see sync_logs).
OFFSET_FILE = "logs/.train.log.offset"


def container_inputs(resolved: ResolvedRun) -> tuple[ResolvedRun, dict[str, str]]:
    """The resolved run with every local input path rewritten to its container path.

    Returns it and the read-only mounts it needs, host directory -> container directory.
    Hub ids (a model or tokenizer that is not a local path) are left alone.
    """
    mounts: dict[str, str] = {}

    def mount(path: Path, must_exist: bool) -> str | None:
        if not path.exists() and not must_exist:
            return None
        path = path.resolve()
        directory = path if path.is_dir() else path.parent
        target = mounts.setdefault(str(directory), f"{INPUTS_MOUNT}/{len(mounts)}")
        return target if path.is_dir() else f"{target}/{path.name}"

    return relocate_inputs(resolved, mount, INPUTS_MOUNT), mounts


def runs_supervisor(container) -> bool:
    """Whether the container's command is the supervisor, which writes the log itself (what ``launch`` starts)."""
    return supervisor.MODULE in (container.attrs["Config"].get("Cmd") or [])


def unsent_output(output: bytes, offset: int, running: bool) -> bytes:
    """What of the container's output after ``offset`` to copy now: whole lines while it runs, so no secret is split."""
    new = output[offset:]
    return new[: new.rfind(b"\n") + 1] if running else new


def copy_docker_log(container, run_dir: Path) -> None:
    """Append a container's output from Docker's log, redacted, beyond the offset kept in the run directory.

    For containers started before the supervisor ran inside, whose trainer
    prints to Docker's log. Each call fetches that whole log again, a cost
    that ends with the last of them.
    """
    try:
        container.reload()  # before the fetch: a container that had ended then has its whole output in it
        output = container.logs(stdout=True, stderr=True)
    except docker.errors.APIError:
        return
    offset_file = run_dir / OFFSET_FILE
    offset = int(offset_file.read_text() or 0) if offset_file.exists() else 0
    new = unsent_output(output, offset, container.status == "running")
    if not new:
        return
    log = run_dir / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(redact(new, secret_values(dict(os.environ))))
    offset_file.write_text(str(offset + len(new)))


class DockerBackend:
    """Runs the trainer image through the Docker SDK for Python."""

    name = "docker"

    def __init__(self, client: docker.DockerClient | None = None):
        try:
            self.client = client or docker.from_env()
        except docker.errors.DockerException as exc:
            raise UserError(f"cannot reach the Docker Engine: {exc}", field="backend",
                            hint="start Docker, or use --backend native", exit_code=EXIT_FAILED) from None

    def prepare(self, spec: LaunchSpec) -> dict[str, str]:
        """Write resolved.json with the container's paths, make the run directory writable by its user.

        Returns the read-only input mounts.
        """
        resolved, mounts = container_inputs(spec.resolved)
        (spec.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "resolved.json").write_text(resolved.model_dump_json(indent=2) + "\n")
        if os.getuid() == 0:
            # The image's user must write the run directory; as root we can hand it over.
            for path in [spec.run_dir, *spec.run_dir.rglob("*")]:
                os.lchown(path, IMAGE_UID, IMAGE_UID)
        return mounts

    def launch(self, spec: LaunchSpec) -> str:
        if not spec.image:
            raise ValueError("the docker backend needs an image")
        mounts = self.prepare(spec)
        volumes = {host: {"bind": target, "mode": "ro"} for host, target in mounts.items()}
        volumes[str(spec.run_dir.resolve())] = {"bind": RUN_MOUNT, "mode": "rw"}
        labels = {"runner.run_id": spec.run_id, "runner.attempt": str(spec.attempt)}
        if os.environ.get(TEST_LABEL_ENV):
            labels["runner.test"] = os.environ[TEST_LABEL_ENV]
        device_requests = []
        if spec.profile.device == "cuda":
            device_requests.append(docker.types.DeviceRequest(count=spec.gpus, capabilities=[["gpu"]]))
        options = {}
        if os.getuid() != 0:
            options["user"] = f"{os.getuid()}:{os.getgid()}"
        try:
            # python -m runner.trainer, or torchrun with one process per GPU, under the supervisor
            trainer = trainer_argv("python", f"{RUN_MOUNT}/resolved.json", RUN_MOUNT, gpus=spec.resolved.gpus)
            argv = supervisor.supervisor_argv("python", RUN_MOUNT, trainer)
            container = self.client.containers.run(
                spec.image, argv[1:], entrypoint=argv[:1], environment=spec.env,
                name=f"runner-{spec.run_id}-{spec.attempt}", detach=True, init=True, labels=labels,
                volumes=volumes, device_requests=device_requests or None,
                shm_size="2g", working_dir=RUN_MOUNT, **options)
        except docker.errors.DockerException as exc:
            raise UserError(f"the container did not start: {exc}", exit_code=EXIT_FAILED) from None
        return container.id

    def _container(self, handle: str):
        try:
            return self.client.containers.get(handle)
        except docker.errors.NotFound:
            return None

    def sync_logs(self, handle: str, run_dir: Path) -> None:
        """Nothing to copy: the container's supervisor writes the log into the mounted run directory.

        Reading Docker's log by increments instead (``since`` with timestamps,
        or a followed stream) would need a cursor of timestamps that can
        repeat, the reassembly of lines Docker splits at 16 KiB, and the Engine
        would still keep a second copy of a day's output (unrotated by
        default). The supervisor already gives the SSH and native backends
        whole, redacted lines exactly once whatever the runner does meanwhile.

        A container started by an earlier runner, whose trainer prints to
        Docker's log, is still copied from there until it ends.
        """
        container = self._container(handle)
        if container is not None and not runs_supervisor(container):
            copy_docker_log(container, run_dir)

    def poll(self, handle: str, run_dir: Path) -> Status:
        container = self._container(handle)
        if container is None:
            return Status(running=False, gone=True, detail="the container no longer exists")
        state = container.attrs.get("State", {})
        if state.get("Status") in ("created", "running", "restarting", "paused"):
            return Status(running=True)
        code = state.get("ExitCode")
        detail = "out of memory: the kernel killed the trainer (OOMKilled)" if state.get("OOMKilled") else None
        if not detail and state.get("Error"):
            detail = state["Error"]
        return Status(running=False, exit_code=code, detail=detail)

    def stop(self, handle: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        container = self._container(handle)
        if container is None:
            return
        try:
            container.stop(timeout=max(1, int(grace_s)))  # SIGTERM, then SIGKILL after the timeout
        except docker.errors.NotFound:
            pass

    def release(self, handle: str) -> None:
        container = self._container(handle)
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
