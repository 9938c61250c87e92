"""Where a run's trainer process lives: a Docker container, or a native subprocess.

Every backend does the same four things behind the ``Backend`` protocol: launch
the trainer on a run directory, copy its output into ``RUN_DIR/logs/train.log``,
say whether it still runs (and its exit code when not), and stop it (SIGTERM,
then a kill after a grace period). ``choose_backend`` picks one from the host's
profile and what this machine has; a job's ``backend:`` or ``--backend`` forces one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from runner.catalog import Profile
from runner.errors import UserError
from runner.resolved import ResolvedRun

BackendName = Literal["docker", "native", "ssh"]

LOG_FILE = "logs/train.log"
DEFAULT_GRACE_S = 120.0  # a checkpoint of a large model can take a minute or more

# The only environment variables a trainer sees from the runner's environment. OMP_NUM_THREADS caps
# torch's CPU threads, which on a shared CPU host are far slower when they outnumber the free cores.
PASSED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
              "TRANSFORMERS_OFFLINE", "TZ", "OMP_NUM_THREADS")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Hugging Face access tokens look like this; redacted even when their value is not known here.
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{20,}")
REDACTED = b"[redacted]"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one attempt of a run."""

    run_id: str
    attempt: int
    run_dir: Path
    resolved: ResolvedRun  # with this machine's paths; a container backend rewrites them
    profile: Profile
    gpus: int
    env: dict[str, str] = field(repr=False)  # from trainer_env(): allow-listed, may hold secrets
    image: str | None = None  # the trainer image tag (docker)


@dataclass(frozen=True)
class Status:
    """What a backend sees of a launched trainer."""

    running: bool
    exit_code: int | None = None  # None while running, or when the process vanished without one
    detail: str | None = None  # why it ended, when the backend knows more than the code ("OOM killed")
    gone: bool = False  # the container or process no longer exists and left no exit code


class Backend(Protocol):
    """A place to run the trainer. ``handle`` is what ``launch`` returned (container id, pid)."""

    name: BackendName

    def launch(self, spec: LaunchSpec) -> str:
        """Start the trainer detached; return the handle to record in the store."""
        ...

    def sync_logs(self, handle: str, run_dir: Path) -> None:
        """Append the trainer's output produced since the last call to ``RUN_DIR/logs/train.log``."""
        ...

    def poll(self, handle: str, run_dir: Path) -> Status:
        """Whether the trainer still runs, and how it ended if not."""
        ...

    def stop(self, handle: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        """SIGTERM (the trainer checkpoints and exits), then kill if it is still alive after ``grace_s``."""
        ...

    def release(self, handle: str) -> None:
        """Free what the finished trainer left behind (a stopped container) once its end is recorded."""
        ...


def relocate_inputs(resolved: ResolvedRun, place: Callable[[Path, bool], str | None], job_dir: str) -> ResolvedRun:
    """The resolved run with every local input (data sources, model and tokenizer paths) moved by ``place``.

    ``place(path, must_exist)`` gets the input as an absolute local path and
    returns where the trainer will find it, or None for a tokenizer that is no
    local path (a hub id, left alone). ``job_dir`` is the trainer's new job
    directory. The container and the SSH backends share this walk.
    """
    base = Path(resolved.job_dir)

    def moved(path_text: str, must_exist: bool) -> str | None:
        path = Path(path_text).expanduser()
        return place(path if path.is_absolute() else base / path, must_exist)

    data = resolved.model_dump(mode="json")
    experiment = data["experiment"]
    for spec in [experiment["data"]] + [p["data"] for p in experiment.get("phases", []) if p.get("data")]:
        for source in spec["sources"]:
            if source.get("path"):
                source["path"] = moved(source["path"], True)
    model = experiment["model"]
    if model.get("path"):
        model["path"] = moved(model["path"], True)
    if model.get("tokenizer"):
        model["tokenizer"] = moved(model["tokenizer"], False) or model["tokenizer"]
    data["job_dir"] = job_dir
    return ResolvedRun.model_validate(data)


def trainer_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of the environment that a trainer receives."""
    environ = dict(os.environ if environ is None else environ)
    return {k: environ[k] for k in PASSED_ENV if environ.get(k)}


def secret_values(env: dict[str, str]) -> list[bytes]:
    return [env[k].encode() for k in SECRET_ENV if env.get(k)]


def redact(data: bytes, secrets: list[bytes]) -> bytes:
    """Replace known secret values and anything shaped like a Hugging Face token."""
    for value in secrets:
        if len(value) >= 4:
            data = data.replace(value, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, data)


def docker_available() -> bool:
    """Whether a Docker Engine answers on this machine."""
    try:
        import docker
        import docker.errors
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
        return True
    except (docker.errors.DockerException, OSError):
        return False


def choose_backend(profile: Profile, forced: str | None = None,
                   has_docker: Callable[[], bool] = docker_available) -> BackendName:
    """The backend for a profile: native for Apple, docker when an engine answers, else native."""
    if forced in (None, "auto"):
        if profile.image == "native":
            return "native"
        return "docker" if has_docker() else "native"
    if forced == "docker":
        if profile.image == "native":
            raise UserError(f"profile {profile.id} runs natively: a container cannot reach Apple's GPU",
                            field="backend", hint="use --backend native (see Dockerfile.mps-notes)")
        if not has_docker():
            raise UserError("backend docker was asked for, but no Docker Engine answers", field="backend",
                            hint="start Docker (scripts/ensure-docker.sh on Debian), or use --backend native")
        return "docker"
    if forced == "native":
        return "native"
    raise UserError(f"unknown backend {forced!r}", field="backend", hint="docker, native or auto")


def get_backend(name: str) -> Backend:
    """An instance of the named backend (imported lazily: the docker SDK is not always needed)."""
    if name == "docker":
        from runner.backends.docker import DockerBackend
        return DockerBackend()
    if name == "native":
        from runner.backends.native import NativeBackend
        return NativeBackend()
    if name == "ssh":
        from runner.backends.ssh import SSHBackend
        return SSHBackend()
    raise UserError(f"unknown backend {name!r}", field="backend")
