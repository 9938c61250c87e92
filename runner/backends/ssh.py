"""The SSH backend: the trainer in a detached Docker container on a remote host.

A run on host H lives in ``~/.runner/runs/<run id>/`` of H's login user; the
local run directory is its mirror, brought home by ``sync.pull``. Launching:

1. the trainer image reaches H by the cheapest path: already there with the
   same content tag (``docker image inspect``), else ``docker save`` from this
   machine's engine, gzipped through the SSH channel into ``docker load``, else
   built on H from the build context sent there;
2. every local input file goes to H's content-addressed data cache once
   (``sync.push_data``) and is mounted read-only from there;
3. ``resolved.json`` with the container's paths is written to the remote run
   directory, the allow-listed environment to a mode-0600 file that
   ``docker run --env-file`` reads and that is removed right after, so no
   secret appears on a command line;
4. ``docker run --detach`` starts the container, so it outlives the SSH
   session. Inside it the supervisor (``runner.backends.supervisor``) appends
   the trainer's output, secrets redacted, to ``logs/train.log`` in the run
   directory: the log is a file on H from the first byte and comes home by
   byte offset, with nothing lost or repeated across reconnects.

The handle recorded in the store is ``HOST/CONTAINER_ID``. A host that cannot
be reached is not given up at once: ``poll`` says the run still runs until the
host has been unreachable for ``unreachable_grace_s``, then that it is gone.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import os
import posixpath
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import paramiko

from runner import images, ssh, sync
from runner.backends import DEFAULT_GRACE_S, LOG_FILE, LaunchSpec, Status
from runner.backends.docker import INPUTS_MOUNT, RUN_MOUNT, TEST_LABEL_ENV
from runner.errors import EXIT_FAILED, UserError
from runner.hosts import Inventory, load_inventory
from runner.launch import trainer_argv
from runner.resolved import ResolvedRun

REMOTE_RUNS_DIR = ".runner/runs"  # relative to the remote home
REMOTE_ENV_DIR = ".runner/env"
REMOTE_BUILD_DIR = ".runner/build"
UNREACHABLE_GRACE_ENV = "RUNNER_UNREACHABLE_GRACE_S"
SYNC_EVERY_ENV = "RUNNER_SYNC_EVERY_S"
DEFAULT_UNREACHABLE_GRACE_S = 900.0  # a rented box that reboots comes back within minutes
DEFAULT_SYNC_EVERY_S = 30.0
RECONNECT_WITHIN_S = 15.0  # short: the follow loop retries on its own, and must stay responsive
COMMAND_TIMEOUT_S = 60.0
IMAGE_TIMEOUT_S = 3600.0
RUNNING_STATES = ("created", "running", "restarting", "paused")
PUSH_STAGING_PREFIX = ".push-"  # a checkpoint being sent lands here, then is renamed into place
Say = Callable[[str], None]


def handle_for(host: str, container_id: str) -> str:
    return f"{host}/{container_id}"


def split_handle(handle: str) -> tuple[str, str]:
    """``HOST/CONTAINER_ID`` -> (host, container id)."""
    host, sep, container = handle.partition("/")
    if not sep or not host or not container:
        raise ValueError(f"not an ssh backend handle: {handle!r}")
    return host, container


def container_command(gpus: int = 1) -> list[str]:
    """The container's command: the supervisor writes the log and the exit code, the trainer (or torchrun) trains."""
    return ["python", "-m", "runner.backends.supervisor", RUN_MOUNT, "--",
            *trainer_argv("python", f"{RUN_MOUNT}/resolved.json", RUN_MOUNT, gpus=gpus)]


def mount_option(source: str, target: str, readonly: bool) -> str:
    """A ``--mount`` value; docker reads it as CSV, so a path with a comma or a quote stays one field."""
    fields = ["type=bind", f"source={source}", f"target={target}"] + (["readonly"] if readonly else [])
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def remote_inputs(conn: ssh.Connection, resolved: ResolvedRun) -> tuple[ResolvedRun, list[tuple[str, str]], int]:
    """Send every local input to the host's data cache and rewrite its path to a container path.

    Returns the rewritten run, the read-only mounts (host path, container path)
    and the bytes sent. A file is mounted with its cache directory
    (``/inputs/N/NAME``); a directory (a local model) file by file at its
    relative paths. Hub ids are left alone.
    """
    job_dir = Path(resolved.job_dir)
    mounts: list[tuple[str, str]] = []
    sent = 0
    slots = itertools.count()

    def send(path_text: str, must_exist: bool) -> str | None:
        nonlocal sent
        path = Path(path_text).expanduser()
        path = path if path.is_absolute() else job_dir / path
        if not path.exists():
            if must_exist:
                raise UserError(f"input not found: {path}", field="data")
            return None
        target = f"{INPUTS_MOUNT}/{next(slots)}"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            pushed = sync.push_data(conn, file)
            sent += pushed.size_bytes if pushed.sent else 0
            if file == path:
                mounts.append((posixpath.dirname(pushed.remote_path), target))
                return f"{target}/{posixpath.basename(pushed.remote_path)}"
            mounts.append((pushed.remote_path, f"{target}/{file.relative_to(path).as_posix()}"))
        return target

    data = resolved.model_dump(mode="json")
    experiment = data["experiment"]
    for spec in [experiment["data"]] + [p["data"] for p in experiment.get("phases", []) if p.get("data")]:
        for source in spec["sources"]:
            if source.get("path"):
                source["path"] = send(source["path"], must_exist=True)
    model = experiment["model"]
    if model.get("path"):
        model["path"] = send(model["path"], must_exist=True)
    if model.get("tokenizer"):
        model["tokenizer"] = send(model["tokenizer"], must_exist=False) or model["tokenizer"]
    data["job_dir"] = INPUTS_MOUNT
    return ResolvedRun.model_validate(data), mounts, sent


# --------------------------------------------------------------------------- the image


def remote_has_image(conn: ssh.Connection, tag: str) -> bool:
    return ssh.run(conn, ["docker", "image", "inspect", "--format", "{{.Id}}", tag], timeout_s=COMMAND_TIMEOUT_S).ok


def send_image(conn: ssh.Connection, tag: str, tar_chunks: Iterable[bytes]) -> int:
    """Stream an image (``docker save`` output) gzipped through the SSH channel into ``docker load``.

    Returns the compressed bytes sent.
    """
    sent = 0
    try:
        chan = conn.transport().open_session(timeout=conn.connect_timeout_s)
        try:
            chan.exec_command(ssh.remote_cmd(["sh", "-c", "gunzip | docker load"]))
            packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip, level 1: the link is the bottleneck, not the CPU
            for chunk in tar_chunks:
                packed = packer.compress(chunk)
                chan.sendall(packed)
                sent += len(packed)
            tail = packer.flush()
            chan.sendall(tail)
            sent += len(tail)
            chan.shutdown_write()
            chan.settimeout(IMAGE_TIMEOUT_S)
            chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            code = chan.recv_exit_status()
        finally:
            chan.close()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise ssh.ConnectionLost(f"sending image {tag} to {conn.endpoint.name} failed: {exc}") from None
    if code != 0:
        raise UserError(f"docker load of {tag} on {conn.endpoint.name} failed: "
                        f"{err.decode(errors='replace').strip()[-300:]}", exit_code=EXIT_FAILED)
    return sent


def build_context_files(root: Path) -> list[Path]:
    """What a local build sends the engine (the allow-list in .dockerignore), to send to a host instead."""
    files = [root / "Dockerfile", root / "pyproject.toml", root / "README.md"]
    for top in (root / "runner", root / images.WHEELS_DIR):
        files += sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                        and p.suffix != ".pyc") if top.is_dir() else []
    return [p for p in files if p.is_file()]


def build_on_host(conn: ssh.Connection, ref: images.ImageRef, say: Say) -> None:
    """Send the build context as one tar stream and build the image with the host's engine."""
    context = posixpath.join(ssh.home(conn), REMOTE_BUILD_DIR, ref.tag.replace(":", "-"))
    made = ssh.run(conn, ["mkdir", "-p", "--", context])
    if not made.ok:
        raise UserError(f"cannot create {context} on {conn.endpoint.name}: {made.stderr.decode().strip()}")
    say(f"sending the build context of {ref.tag} to {conn.endpoint.name}")
    try:
        chan = conn.transport().open_session(timeout=conn.connect_timeout_s)
        try:
            chan.exec_command(ssh.remote_cmd(["tar", "-x", "-z", "-f", "-", "-C", context]))
            stream = chan.makefile("wb", 2**20)
            with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=1) as packed, \
                    tarfile.open(fileobj=packed, mode="w|") as archive:
                for path in build_context_files(ref.context):
                    archive.add(str(path), arcname=path.relative_to(ref.context).as_posix(), recursive=False)
            stream.flush()
            chan.shutdown_write()
            code = chan.recv_exit_status()
        finally:
            chan.close()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise ssh.ConnectionLost(f"sending the build context to {conn.endpoint.name} failed: {exc}") from None
    if code != 0:
        raise UserError(f"unpacking the build context on {conn.endpoint.name} failed (tar exit {code})")
    say(f"building {ref.tag} on {conn.endpoint.name}")
    argv = ["docker", "build", "--tag", ref.tag, "--label", f"runner.image-family={ref.family}"]
    for key, value in sorted(ref.build_args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    try:
        built = ssh.run(conn, [*argv, context], timeout_s=IMAGE_TIMEOUT_S)
    finally:
        ssh.run(conn, ["rm", "-rf", "--", context])
    if not built.ok:
        raise UserError(f"building {ref.tag} on {conn.endpoint.name} failed: "
                        f"{built.stderr.decode(errors='replace').strip()[-500:]}", exit_code=EXIT_FAILED)


def ensure_remote_image(conn: ssh.Connection, ref: images.ImageRef, say: Say) -> str:
    """Put the image on the host by the cheapest path; returns which one: present, sent or built.

    Present: the host has the content tag. Sent: this machine has an engine, so
    the image is built here if needed and streamed over. Built: no engine here,
    so the host builds it from the sent build context.
    """
    if remote_has_image(conn, ref.tag):
        return "present"
    client = local_engine()
    if client is None:
        build_on_host(conn, ref, say)
        return "built"
    from runner.store import data_dir

    log = data_dir() / "builds" / f"{ref.tag.replace(':', '-')}.log"
    if images.ensure_image(client, ref, log, say):
        say(f"built image {ref.tag} here (log: {log})")
    if remote_has_image(conn, ref.tag):
        return "present"  # the host shares this machine's engine
    started = time.monotonic()
    sent = send_image(conn, ref.tag, client.images.get(ref.tag).save(named=True))
    say(f"sent image {ref.tag} to {conn.endpoint.name}: {sent / 2**20:.0f} MiB gzipped "
        f"in {time.monotonic() - started:.0f}s")
    return "sent"


def local_engine():
    """A client of this machine's Docker Engine, or None when none answers."""
    from runner.backends import docker_available

    if not docker_available():
        return None
    import docker

    return docker.from_env()


# --------------------------------------------------------------------------- sending a run directory


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a local run directory that sync verified (it has its manifest)."""
    found = sorted(p for p in (run_dir / sync.CHECKPOINTS_DIR).glob("step-*")
                   if p.is_dir() and not p.is_symlink() and (p / sync.MANIFEST_NAME).is_file())
    return found[-1] if found else None


def push_run_dir(conn: ssh.Connection, local_dir: Path, remote_dir: str, *, with_files: bool) -> int:
    """Send what another attempt needs to a host's run directory; returns the bytes sent.

    With ``with_files`` (the run moves to this host) the run's files outside
    ``checkpoints/`` go too (logs, metrics); then the newest complete checkpoint
    goes into a staging directory that is renamed into place once all its files
    are there, unless the host has it with the same manifest. Symlinks and
    partial files are left behind.
    """
    sent = 0
    sftp = conn.sftp()
    ssh.makedirs(sftp, remote_dir)
    if with_files:
        for path in sorted(local_dir.rglob("*")):
            rel = path.relative_to(local_dir).as_posix()
            if (path.is_symlink() or not path.is_file() or path.name.endswith(sync.PARTIAL_SUFFIX)
                    or rel.startswith(sync.CHECKPOINTS_DIR + "/") or any(p.is_symlink() for p in path.parents)):
                continue
            remote = posixpath.join(remote_dir, sync.safe_relpath(rel))
            ssh.makedirs(sftp, posixpath.dirname(remote))
            ssh.put_file(conn, path, remote)
            sent += path.stat().st_size
    newest = newest_complete_checkpoint(local_dir)
    if newest is None:
        return sent
    final = posixpath.join(remote_dir, sync.CHECKPOINTS_DIR, newest.name)
    manifest = (newest / sync.MANIFEST_NAME).read_bytes()
    try:
        with sftp.open(posixpath.join(final, sync.MANIFEST_NAME), "rb") as f:
            if f.read() == manifest:
                return sent
    except FileNotFoundError:
        pass
    staging = posixpath.join(remote_dir, sync.CHECKPOINTS_DIR, PUSH_STAGING_PREFIX + newest.name)
    ssh.run(conn, ["rm", "-rf", "--", staging, final])
    for entry in sync.parse_manifest(manifest, where=str(newest / sync.MANIFEST_NAME)).entries:
        remote = posixpath.join(staging, entry.path)
        ssh.makedirs(sftp, posixpath.dirname(remote))
        sftp.put(str(newest / entry.path), remote, confirm=True)
        sent += entry.size_bytes
    sftp.put(str(newest / sync.MANIFEST_NAME), posixpath.join(staging, sync.MANIFEST_NAME))
    sftp.posix_rename(staging, final)
    return sent + len(manifest)


def _write_remote(sftp: paramiko.SFTPClient, path: str, data: bytes) -> None:
    tmp = path + sync.PARTIAL_SUFFIX
    with sftp.open(tmp, "wb") as f:
        f.write(data)
    sftp.posix_rename(tmp, path)


# --------------------------------------------------------------------------- the backend


class SSHBackend:
    """Runs the trainer image with the Docker Engine of a remote host, driven over SSH."""

    name = "ssh"

    def __init__(self, inventory: Inventory | None = None, *, hosts_file: str | Path | None = None,
                 unreachable_grace_s: float | None = None, sync_every_s: float | None = None,
                 reconnect_within_s: float = RECONNECT_WITHIN_S, say: Say | None = None):
        self._inventory = inventory
        self.hosts_file = hosts_file
        self.unreachable_grace_s = unreachable_grace_s if unreachable_grace_s is not None else float(
            os.environ.get(UNREACHABLE_GRACE_ENV) or DEFAULT_UNREACHABLE_GRACE_S)
        self.sync_every_s = sync_every_s if sync_every_s is not None else float(
            os.environ.get(SYNC_EVERY_ENV) or DEFAULT_SYNC_EVERY_S)
        self.reconnect_within_s = reconnect_within_s
        self.say = say or (lambda _: None)
        self._connections: dict[str, ssh.Connection] = {}
        self._homes: dict[str, str] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._unreachable_since: dict[str, float] = {}
        self._last_pull: dict[str, float] = {}
        self._guard = threading.Lock()

    @property
    def inventory(self) -> Inventory:
        """The hosts to reach, loaded on first use (``runner runs`` with only local runs needs none)."""
        if self._inventory is None:
            self._inventory = load_inventory(self.hosts_file)
        return self._inventory

    @inventory.setter
    def inventory(self, inventory: Inventory) -> None:
        self._inventory = inventory

    # -- connections

    def lock(self, host: str) -> threading.RLock:
        """One operation at a time per host: an SFTP session is not shared between threads."""
        with self._guard:
            return self._locks.setdefault(host, threading.RLock())

    def connection(self, host: str) -> ssh.Connection:
        """The open connection to an inventory host, made on first use and remade after a drop."""
        with self._guard:
            conn = self._connections.get(host)
            if conn is None:
                conn = ssh.Connection(ssh.endpoint_for(self.inventory.get(host)),
                                      reconnect_within_s=self.reconnect_within_s)
                self._connections[host] = conn
        conn.transport()
        return conn

    def home(self, host: str) -> str:
        """The login user's home directory on the host (absolute)."""
        if host not in self._homes:
            self._homes[host] = ssh.home(self.connection(host))
        return self._homes[host]

    def run_dir(self, host: str, run_id: str) -> str:
        """The run's directory on the host (absolute)."""
        return posixpath.join(self.home(host), REMOTE_RUNS_DIR, sync.safe_relpath(run_id))

    def close(self) -> None:
        with self._guard:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()

    # -- launching

    def launch(self, spec: LaunchSpec) -> str:
        host = spec.resolved.host
        if not spec.image:
            raise ValueError("the ssh backend needs an image")
        with self.lock(host):
            conn = self.connection(host)
            self._ensure_image(conn, spec)
            resolved, mounts, sent = remote_inputs(conn, spec.resolved)
            if sent:
                self.say(f"sent {sent / 2**20:.1f} MiB of data to {host}'s cache")
            run_dir = self.run_dir(host, spec.run_id)
            sftp = conn.sftp()
            ssh.makedirs(sftp, posixpath.join(run_dir, "logs"))
            _write_remote(sftp, posixpath.join(run_dir, "resolved.json"),
                          (resolved.model_dump_json(indent=2) + "\n").encode())
            env_file = self._write_env(conn, host, spec)
            try:
                result = ssh.run(conn, self._docker_run(conn, spec, run_dir, mounts, env_file),
                                 timeout_s=COMMAND_TIMEOUT_S)
            finally:
                conn.sftp().remove(env_file)
        if not result.ok:
            raise UserError(f"the container did not start on {host}: "
                            f"{result.stderr.decode(errors='replace').strip()[-500:]}", exit_code=EXIT_FAILED)
        return handle_for(host, result.text().strip())

    def _ensure_image(self, conn: ssh.Connection, spec: LaunchSpec) -> None:
        assert spec.image is not None
        family = images.family_for(spec.profile)
        ref = images.image_for(family) if family is not None else None
        if ref is not None and ref.tag == spec.image:
            how = ensure_remote_image(conn, ref, self.say)
            if how != "present":
                self.say(f"image {ref.tag} on {conn.endpoint.name}: {how}")
            return
        # An earlier attempt's image (the sources changed since): only one that exists can be used.
        if remote_has_image(conn, spec.image):
            return
        client = local_engine()
        if client is None:
            raise UserError(f"image {spec.image} is neither on {conn.endpoint.name} nor here", field="image")
        import docker.errors

        try:
            chunks = client.images.get(spec.image).save(named=True)
        except docker.errors.ImageNotFound:
            raise UserError(f"image {spec.image} is neither on {conn.endpoint.name} nor here",
                            field="image") from None
        send_image(conn, spec.image, chunks)

    def _write_env(self, conn: ssh.Connection, host: str, spec: LaunchSpec) -> str:
        """The environment as a mode-0600 file on the host, so no value appears on a command line."""
        for key, value in spec.env.items():
            if "\n" in value or "\r" in value:
                raise UserError(f"environment variable {key} contains a line break", field="env")
        sftp = conn.sftp()
        directory = posixpath.join(self.home(host), REMOTE_ENV_DIR)
        ssh.makedirs(sftp, directory)
        sftp.chmod(directory, 0o700)
        path = posixpath.join(directory, f"{spec.run_id}-{spec.attempt}.env")
        with sftp.open(path, "wb") as f:
            f.chmod(0o600)  # before any secret is written
            f.write("".join(f"{k}={v}\n" for k, v in spec.env.items()).encode())
        return path

    def _docker_run(self, conn: ssh.Connection, spec: LaunchSpec, run_dir: str, mounts: list[tuple[str, str]],
                    env_file: str) -> list[str]:
        host = spec.resolved.host
        ids = ssh.run(conn, ["id", "-u"]).text().strip(), ssh.run(conn, ["id", "-g"]).text().strip()
        argv = ["docker", "run", "--detach", "--init", "--name", f"runner-{spec.run_id}-{spec.attempt}",
                "--label", f"runner.run_id={spec.run_id}", "--label", f"runner.attempt={spec.attempt}",
                "--label", f"runner.host={host}", "--user", f"{ids[0]}:{ids[1]}", "--shm-size", "2g",
                "--workdir", RUN_MOUNT, "--env-file", env_file,
                "--mount", mount_option(run_dir, RUN_MOUNT, readonly=False)]
        if os.environ.get(TEST_LABEL_ENV):
            argv += ["--label", f"runner.test={os.environ[TEST_LABEL_ENV]}"]
        for source, target in mounts:
            argv += ["--mount", mount_option(source, target, readonly=True)]
        if spec.profile.device == "cuda":
            devices = self._free_gpus(conn, host, spec.gpus)
            argv += ["--gpus", f'"device={",".join(devices)}"', "--label", f"runner.gpus={','.join(devices)}"]
        return [*argv, "--entrypoint", "python", spec.image or "", *container_command(spec.resolved.gpus)[1:]]

    def _free_gpus(self, conn: ssh.Connection, host: str, count: int) -> list[str]:
        """GPU indices that no running runner container on this host holds (their runner.gpus labels)."""
        listed = ssh.run(conn, ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"])
        all_ids = [line.strip() for line in listed.text().splitlines() if line.strip()] if listed.ok else []
        busy = ssh.run(conn, ["docker", "ps", "--filter", f"label=runner.host={host}", "--filter",
                              "label=runner.gpus", "--format", '{{.Label "runner.gpus"}}'])
        taken = {g for line in busy.text().splitlines() for g in line.split(",") if g}
        free = [g for g in all_ids if g not in taken]
        if len(free) < count:
            raise UserError(f"{host} has {len(free)} free GPUs ({', '.join(free) or 'none'}); the run needs {count}",
                            field="gpus", hint="wait for a run there to end, or pick another host")
        return free[:count]

    # -- following

    def pull(self, host: str, run_id: str, local_dir: Path) -> sync.SyncReport:
        """Bring the run's remote directory home now (``sync.pull``); ConnectionLost if the host is away."""
        with self.lock(host):
            report = sync.pull(self.connection(host), self.run_dir(host, run_id), local_dir)
        self._last_pull[f"{host}/{run_id}"] = time.monotonic()
        return report

    def sync_logs(self, handle: str, run_dir: Path) -> None:
        """The log by byte offset now, and the whole run directory every ``sync_every_s``."""
        host, _ = split_handle(handle)
        try:
            if time.monotonic() - self._last_pull.get(f"{host}/{run_dir.name}", 0.0) >= self.sync_every_s:
                self.pull(host, run_dir.name, run_dir)
            else:
                with self.lock(host):
                    conn = self.connection(host)
                    conn.retrying(lambda c: self._pull_log(c, host, run_dir))
            self._unreachable_since.pop(host, None)
        except (ssh.ConnectionLost, ssh.CommandTimeout):
            self._unreachable_since.setdefault(host, time.monotonic())

    def _pull_log(self, conn: ssh.Connection, host: str, run_dir: Path) -> None:
        """Append what the remote log has beyond the local one's size."""
        sftp = conn.sftp()
        remote = posixpath.join(self.run_dir(host, run_dir.name), LOG_FILE)
        local = run_dir / LOG_FILE
        try:
            size = sftp.stat(remote).st_size or 0
        except FileNotFoundError:
            return
        have = local.stat().st_size if local.is_file() else 0
        if size <= have:
            return  # nothing new (or a rewritten log, which the next whole pull compares and refetches)
        local.parent.mkdir(parents=True, exist_ok=True)
        with sftp.open(remote, "rb") as f, open(local, "ab") as out:
            f.seek(have)
            while have < size:
                chunk = f.read(min(size - have, 2**20))
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                have += len(chunk)

    def poll(self, handle: str, run_dir: Path) -> Status:
        host, container = split_handle(handle)
        try:
            with self.lock(host):
                found = ssh.run(self.connection(host),
                                ["docker", "inspect", "--type", "container", "--format",
                                 "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", container],
                                timeout_s=COMMAND_TIMEOUT_S)
        except (ssh.ConnectionLost, ssh.CommandTimeout) as exc:
            return self._unreachable(host, exc.message)
        if not found.ok:
            err = found.stderr.decode(errors="replace").strip()
            if "No such" not in err:
                return self._unreachable(host, f"docker on {host} does not answer: {err[:200]}")
            self._unreachable_since.pop(host, None)
            self._final_pull(host, run_dir)
            return Status(running=False, gone=True,
                          detail=f"the container vanished from {host} (removed, or the host was preempted "
                                 "or rebuilt)")
        self._unreachable_since.pop(host, None)
        state, code, oom = (found.text().split() + ["", "", ""])[:3]
        if state in RUNNING_STATES:
            return Status(running=True)
        self._final_pull(host, run_dir)
        detail = "out of memory: the kernel killed the trainer (OOMKilled)" if oom == "true" else None
        return Status(running=False, exit_code=int(code) if code.lstrip("-").isdigit() else None, detail=detail)

    def _final_pull(self, host: str, run_dir: Path) -> None:
        try:
            self.pull(host, run_dir.name, run_dir)
        except (ssh.ConnectionLost, ssh.CommandTimeout):
            pass  # what did not come home now comes with `runner sync RUN`

    def _unreachable(self, host: str, why: str) -> Status:
        """Still running while the host has been away for less than the grace; then gone."""
        since = self._unreachable_since.setdefault(host, time.monotonic())
        down_s = time.monotonic() - since
        if down_s < self.unreachable_grace_s:
            return Status(running=True, detail=f"{host} unreachable for {down_s:.0f}s: {why}")
        return Status(running=False, gone=True,
                      detail=f"host {host} unreachable for {down_s:.0f}s, longer than the grace of "
                             f"{self.unreachable_grace_s:.0f}s (last error: {why}); the container may still run there")

    def stop(self, handle: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        """``docker stop``: SIGTERM (the supervisor passes it to the trainer, which checkpoints), then a kill."""
        host, container = split_handle(handle)
        with self.lock(host):
            ssh.run(self.connection(host), ["docker", "stop", "--time", str(max(1, int(grace_s))), container],
                    timeout_s=grace_s + COMMAND_TIMEOUT_S)

    def release(self, handle: str) -> None:
        host, container = split_handle(handle)
        try:
            with self.lock(host):
                ssh.run(self.connection(host), ["docker", "rm", "--force", container])
        except (ssh.ConnectionLost, ssh.CommandTimeout):
            pass  # the container stays on the host; `runner resume` removes it before another attempt

    # -- resuming

    def prepare_resume(self, host: str, run_id: str, local_dir: Path, ended_attempt: int, note: str, *,
                       moved: bool) -> None:
        """Make the host's run directory ready for another attempt.

        The newest complete local checkpoint goes there unless the host has it
        (and, when the run moves here, the rest of the run directory); the last
        attempt's summary is set aside and ``note`` is appended to the log, so
        the local log stays a prefix of the remote one.
        """
        with self.lock(host):
            conn = self.connection(host)
            remote = self.run_dir(host, run_id)
            sent = push_run_dir(conn, local_dir, remote, with_files=moved)
            if sent:
                self.say(f"sent {sent / 2**20:.1f} MiB of the run directory to {host}")
            sftp = conn.sftp()
            ssh.makedirs(sftp, posixpath.join(remote, "logs"))
            try:
                sftp.posix_rename(posixpath.join(remote, "summary.json"),
                                  posixpath.join(remote, "logs", f"summary-attempt-{ended_attempt}.json"))
            except FileNotFoundError:
                pass
            with sftp.open(posixpath.join(remote, LOG_FILE), "ab") as f:
                f.write(note.encode())
