"""The native backend: the trainer as a subprocess of this machine, in a virtual environment.

For Apple Silicon (a container cannot reach the GPU, see Dockerfile.mps-notes)
and for hosts without Docker. The interpreter is this one when it has torch,
else a virtual environment under the runner's data directory with the ``train``
extra installed. The trainer runs under ``runner.backends.supervisor`` in a new
session; the handle is ``PID`` or ``PID@START`` (start time in clock ticks, so
a reused pid is not mistaken for the trainer).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

from runner.backends import DEFAULT_GRACE_S, LaunchSpec, Status
from runner.backends.supervisor import EXIT_CODE_FILE, supervisor_argv
from runner.errors import EXIT_FAILED, UserError
from runner.launch import trainer_argv
from runner.store import data_dir

# What a native trainer inherits besides the allow-list: enough to find Python, caches and devices.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "XDG_CACHE_HOME",
            "HF_HOME", "CUDA_VISIBLE_DEVICES", "PYTORCH_ENABLE_MPS_FALLBACK", "PYTHONPATH", "VIRTUAL_ENV")


def train_requirements() -> list[str]:
    """The ``train`` extra of the installed runner package, as pip requirement strings."""
    found = []
    for requirement in importlib.metadata.requires("runner") or []:
        name, _, marker = requirement.partition(";")
        if re.search(r"extra\s*==\s*['\"]train['\"]", marker):
            found.append(name.strip())
    return found


def trainer_python() -> str:
    """An interpreter that can run the trainer: this one if it has torch, else the runner's venv."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return str(ensure_venv(data_dir() / "venv"))


def ensure_venv(path: Path) -> Path:
    """Create (once) a venv that sees this installation of runner and has the train extra."""
    requirements = train_requirements()
    stamp = path / ".train-requirements"
    wanted = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    python = path / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    # System site packages: the venv sees the runner package installed alongside this interpreter.
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(path)
    log = path.parent / "venv-install.log"
    print(f"installing the trainer's packages into {path} (log: {log})", file=sys.stderr)
    with open(log, "w") as out:
        result = subprocess.run([str(python), "-m", "pip", "install", *requirements], stdout=out,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise UserError(f"installing the train extra into {path} failed", hint=f"see {log}", exit_code=EXIT_FAILED)
    stamp.write_text(wanted)
    return python


def _start_ticks(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), or None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, given its start time from /proc, is still the same one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc (macOS): the signal check is all we have
    if fields[0] == "Z":
        return False
    return start is None or fields[19] == start


def parse_handle(handle: str) -> tuple[int, str | None]:
    pid, _, start = handle.partition("@")
    return int(pid), start or None


class NativeBackend:
    """Runs the trainer as a local subprocess under the supervisor."""

    name = "native"

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen] = {}

    def launch(self, spec: LaunchSpec) -> str:
        python = trainer_python()
        logs = spec.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        resolved = spec.run_dir / "resolved.json"
        resolved.write_text(spec.resolved.model_dump_json(indent=2) + "\n")
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        env.update(spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        command = supervisor_argv(sys.executable, str(spec.run_dir),
                                  trainer_argv(python, str(resolved), str(spec.run_dir), gpus=spec.resolved.gpus))
        with open(logs / "supervisor.log", "ab") as err:
            child = subprocess.Popen(command, start_new_session=True, env=env, stdin=subprocess.DEVNULL,
                                     stdout=err, stderr=err, cwd=spec.run_dir)
        self._children[child.pid] = child
        start = _start_ticks(child.pid)
        return f"{child.pid}@{start}" if start else str(child.pid)

    def sync_logs(self, handle: str, run_dir: Path) -> None:
        """Nothing to copy: the supervisor writes the log as the trainer prints."""

    def _running(self, handle: str) -> bool:
        pid, start = parse_handle(handle)
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None  # also reaps it, so it does not linger as a zombie
        return process_alive(pid, start)

    def poll(self, handle: str, run_dir: Path) -> Status:
        """Running while the supervisor lives; then the exit code it left in the run directory."""
        if self._running(handle):
            return Status(running=True)
        code_file = run_dir / EXIT_CODE_FILE
        try:
            code = int(code_file.read_text().strip())
        except (OSError, ValueError):
            return Status(running=False, gone=True,
                          detail="the trainer's process ended without recording an exit code (killed?)")
        detail = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else None
        return Status(running=False, exit_code=code if code >= 0 else 128 - code, detail=detail)

    def stop(self, handle: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        pid, _ = parse_handle(handle)
        if not self._running(handle):
            return
        try:
            os.killpg(pid, signal.SIGTERM)  # the session: supervisor and trainer
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self._running(handle):
                return
            time.sleep(0.2)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def release(self, handle: str) -> None:
        pid, _ = parse_handle(handle)
        child = self._children.pop(pid, None)
        if child is not None:
            child.poll()
