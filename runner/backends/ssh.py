"""The SSH backend: the trainer in a detached Docker container (or process group) on remote hosts.

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

A host with ``backend: native`` has no Docker: its ``python`` (with runner's
train extra) runs the supervisor and the trainer in a new session (``setsid``)
that outlives the SSH session, its pid in ``logs/pid``; inputs are reached
through symlinks in ``~/.runner/inputs/<run id>/`` instead of mounts, and the
supervisor's ``logs/exit_code`` says how it ended.

A run over several hosts (``train.nodes``) starts one torchrun per host, in
the order of the experiment's ``hosts:``, with a static rendezvous on the first
host's address; rank 0 runs there, so the run directory that comes home is the
first host's, and each other host's log (``logs/node-K.log`` there) comes home
beside it. Containers of such a run use the host's network (``--network host``)
so the nodes reach each other.

The handle recorded in the store is ``HOST/CONTAINER_ID`` (``HOST/pid-PID`` for
a native process), one per node joined by ``+``. A host that cannot be reached
is not given up at once: ``poll`` says the run still runs until the host has
been unreachable for ``unreachable_grace_s``, then that it is gone.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import os
import posixpath
import shlex
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import paramiko

from runner import images, ssh, sync
from runner.backends import DEFAULT_GRACE_S, LOG_FILE, LaunchSpec, Status, relocate_inputs
from runner.backends.docker import INPUTS_MOUNT, RUN_MOUNT, TEST_LABEL_ENV
from runner.backends.supervisor import supervisor_argv
from runner.errors import EXIT_FAILED, UserError
from runner.hosts import Inventory, load_inventory
from runner.launch import Rendezvous, trainer_argv
from runner.resolved import ResolvedRun

REMOTE_RUNS_DIR = ".runner/runs"  # relative to the remote home
REMOTE_ENV_DIR = ".runner/env"
REMOTE_BUILD_DIR = ".runner/build"
REMOTE_INPUTS_DIR = ".runner/inputs"  # native hosts: a run's inputs, as symlinks into the data cache
EXIT_CODE_FILE = "logs/exit_code"  # written by the supervisor
NODE_SEP = "+"  # between the node handles of a multi-host run
PID_PREFIX = "pid-"  # a native process group, where a container id would be
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


def node_handles(handle: str) -> list[tuple[str, str]]:
    """``HOST/ID+HOST/ID...`` -> (host, container id or pid-PID) per node, rank 0 first."""
    nodes = []
    for part in handle.split(NODE_SEP):
        host, sep, process = part.partition("/")
        if not sep or not host or not process:
            raise ValueError(f"not an ssh backend handle: {handle!r}")
        nodes.append((host, process))
    return nodes


def describe(handle: str) -> str:
    """What a handle started, for the run's history: ``container 0123abcd on a, pid 42 on b``."""
    return ", ".join(f"pid {p.removeprefix(PID_PREFIX)} on {h}" if p.startswith(PID_PREFIX)
                     else f"container {p[:12]} on {h}" for h, p in node_handles(handle))


def node_log(node_rank: int) -> str:
    """The log of a node of a multi-host run, in its host's run directory: rank 0's is the run's log."""
    return LOG_FILE if node_rank == 0 else f"logs/node-{node_rank}.log"


def supervised(python: str, run_dir: str, gpus: int = 1, rendezvous: Rendezvous | None = None) -> list[str]:
    """The supervisor (log, exit code) around the trainer, or around this node's torchrun."""
    trainer = trainer_argv(python, f"{run_dir}/resolved.json", run_dir, gpus=gpus, rendezvous=rendezvous)
    return supervisor_argv(python, run_dir, trainer, node_log(rendezvous.node_rank if rendezvous else 0))


def container_command(gpus: int = 1, rendezvous: Rendezvous | None = None) -> list[str]:
    """The container's command: the supervisor writes the log and the exit code, the trainer (or torchrun) trains."""
    return supervised("python", RUN_MOUNT, gpus, rendezvous)


def mount_option(source: str, target: str, readonly: bool) -> str:
    """A ``--mount`` value; docker reads it as CSV, so a path with a comma or a quote stays one field."""
    fields = ["type=bind", f"source={source}", f"target={target}"] + (["readonly"] if readonly else [])
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def remote_inputs(conn: ssh.Connection, resolved: ResolvedRun,
                  root: str = INPUTS_MOUNT) -> tuple[ResolvedRun, list[tuple[str, str]], int]:
    """Send every local input to the host's data cache and rewrite its path to one under ``root``.

    Returns the rewritten run, the read-only mounts (host path, path under
    ``root``: a container path, or a symlink a native host gets) and the bytes
    sent. A file is mounted with its cache directory (``ROOT/N/NAME``); a
    directory (a local model) file by file at its relative paths. Hub ids are
    left alone.
    """
    mounts: list[tuple[str, str]] = []
    sent = 0
    slots = itertools.count()

    def send(path: Path, must_exist: bool) -> str | None:
        nonlocal sent
        if not path.exists():
            if must_exist:
                raise UserError(f"input not found: {path}", field="data")
            return None
        target = f"{root}/{next(slots)}"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            pushed = sync.push_data(conn, file)
            sent += pushed.size_bytes if pushed.sent else 0
            if file == path:
                mounts.append((posixpath.dirname(pushed.remote_path), target))
                return f"{target}/{posixpath.basename(pushed.remote_path)}"
            mounts.append((pushed.remote_path, f"{target}/{file.relative_to(path).as_posix()}"))
        return target

    return relocate_inputs(resolved, send, root), mounts, sent


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

    def node_hosts(self, resolved: ResolvedRun) -> list[str]:
        """The hosts of a run, rank 0's first: the first ``nodes`` of the experiment's ``hosts:``."""
        if resolved.nodes == 1:
            return [resolved.host]
        return list(resolved.experiment.hosts[:resolved.nodes])

    def launch(self, spec: LaunchSpec) -> str:
        hosts = self.node_hosts(spec.resolved)
        if len(hosts) == 1:
            return self._launch_node(spec, hosts[0], None)
        address = ssh.endpoint_for(self.inventory.get(hosts[0])).hostname
        started: list[str] = []
        try:
            for rank, host in enumerate(hosts):
                started.append(self._launch_node(spec, host, Rendezvous(address, len(hosts), rank)))
        except BaseException:
            if started:
                self.release(NODE_SEP.join(started))  # no node waits for a rendezvous that cannot happen
            raise
        return NODE_SEP.join(started)

    def _launch_node(self, spec: LaunchSpec, host: str, rendezvous: Rendezvous | None) -> str:
        """Start one host's trainer (one node's torchrun with ``rendezvous``); returns its node handle."""
        native = self.inventory.get(host).backend == "native"
        if not native and not spec.image:
            raise ValueError("the ssh backend needs an image for a docker host")
        with self.lock(host):
            conn = self.connection(host)
            run_dir = self.run_dir(host, spec.run_id)
            if not native:
                self._ensure_image(conn, spec)
            root = (posixpath.join(self.home(host), REMOTE_INPUTS_DIR, sync.safe_relpath(spec.run_id)) if native
                    else INPUTS_MOUNT)
            resolved, mounts, sent = remote_inputs(conn, spec.resolved, root)
            if sent:
                self.say(f"sent {sent / 2**20:.1f} MiB of data to {host}'s cache")
            sftp = conn.sftp()
            ssh.makedirs(sftp, posixpath.join(run_dir, "logs"))
            _write_remote(sftp, posixpath.join(run_dir, "resolved.json"),
                          (resolved.model_dump_json(indent=2) + "\n").encode())
            if native:
                self._link_inputs(conn, root, mounts)
            env_file = self._write_env(conn, host, spec, exported=native)
            try:
                argv = (self._native_start(host, spec, run_dir, env_file, rendezvous) if native
                        else self._docker_run(conn, spec, run_dir, mounts, env_file, host, rendezvous))
                result = ssh.run(conn, argv, timeout_s=COMMAND_TIMEOUT_S)
            finally:
                try:
                    conn.sftp().remove(env_file)
                except FileNotFoundError:
                    pass  # a native start reads and removes it
        what = "the trainer" if native else "the container"
        if not result.ok:
            raise UserError(f"{what} did not start on {host}: "
                            f"{result.stderr.decode(errors='replace').strip()[-500:]}", exit_code=EXIT_FAILED)
        started = result.text().strip()
        return handle_for(host, PID_PREFIX + started if native else started)

    def _link_inputs(self, conn: ssh.Connection, root: str, mounts: list[tuple[str, str]]) -> None:
        """What a container would mount, as symlinks into the host's data cache."""
        ssh.run(conn, ["rm", "-rf", "--", root])
        sftp = conn.sftp()
        for source, target in mounts:
            ssh.makedirs(sftp, posixpath.dirname(target))
            sftp.symlink(source, target)

    def _native_start(self, host: str, spec: LaunchSpec, run_dir: str, env_file: str,
                      rendezvous: Rendezvous | None) -> list[str]:
        """The command that starts the supervisor in a new session on a host without Docker; it prints the pid."""
        python = self.inventory.get(host).python or "python3"
        log = node_log(rendezvous.node_rank if rendezvous else 0)
        script = ('cd "$1" || exit 1; env_file=$2 log=$3; shift 3; . "$env_file"; rm -f "$env_file" '
                  f'{EXIT_CODE_FILE}; setsid "$@" </dev/null >>"$log" 2>&1 & echo $! >logs/pid; echo $!')
        return ["sh", "-c", script, "sh", run_dir, env_file, log,
                *supervised(python, run_dir, spec.resolved.gpus, rendezvous)]

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

    def _write_env(self, conn: ssh.Connection, host: str, spec: LaunchSpec, *, exported: bool = False) -> str:
        """The environment as a mode-0600 file on the host, so no value appears on a command line.

        ``exported``: as quoted ``export`` lines for a shell to read, else as ``docker run --env-file`` reads it.
        """
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
            f.write("".join(f"export {k}={shlex.quote(v)}\n" if exported else f"{k}={v}\n"
                            for k, v in spec.env.items()).encode())
        return path

    def _docker_run(self, conn: ssh.Connection, spec: LaunchSpec, run_dir: str, mounts: list[tuple[str, str]],
                    env_file: str, host: str, rendezvous: Rendezvous | None = None) -> list[str]:
        ids = ssh.run(conn, ["id", "-u"]).text().strip(), ssh.run(conn, ["id", "-g"]).text().strip()
        argv = ["docker", "run", "--detach", "--init", "--name", f"runner-{spec.run_id}-{spec.attempt}",
                "--label", f"runner.run_id={spec.run_id}", "--label", f"runner.attempt={spec.attempt}",
                "--label", f"runner.host={host}", "--user", f"{ids[0]}:{ids[1]}", "--shm-size", "2g",
                "--workdir", RUN_MOUNT, "--env-file", env_file,
                "--mount", mount_option(run_dir, RUN_MOUNT, readonly=False)]
        if rendezvous is not None:
            argv += ["--network", "host"]  # the nodes reach each other at their hosts' addresses
        if os.environ.get(TEST_LABEL_ENV):
            argv += ["--label", f"runner.test={os.environ[TEST_LABEL_ENV]}"]
        for source, target in mounts:
            argv += ["--mount", mount_option(source, target, readonly=True)]
        if spec.profile.device == "cuda":
            devices = self._free_gpus(conn, host, spec.gpus)
            argv += ["--gpus", f'"device={",".join(devices)}"', "--label", f"runner.gpus={','.join(devices)}"]
        return [*argv, "--entrypoint", "python", spec.image or "",
                *container_command(spec.resolved.gpus, rendezvous)[1:]]

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
        """The log by byte offset now, and the whole run directory every ``sync_every_s``; other nodes' logs too."""
        nodes = node_handles(handle)
        host = nodes[0][0]
        try:
            if time.monotonic() - self._last_pull.get(f"{host}/{run_dir.name}", 0.0) >= self.sync_every_s:
                self.pull(host, run_dir.name, run_dir)
            else:
                self._pull_node_log(host, run_dir, LOG_FILE)
            self._unreachable_since.pop(host, None)
        except (ssh.ConnectionLost, ssh.CommandTimeout):
            self._unreachable_since.setdefault(host, time.monotonic())
        for rank, (other, _) in enumerate(nodes[1:], start=1):
            try:
                self._pull_node_log(other, run_dir, node_log(rank))
                self._unreachable_since.pop(other, None)
            except (ssh.ConnectionLost, ssh.CommandTimeout):
                self._unreachable_since.setdefault(other, time.monotonic())

    def _pull_node_log(self, host: str, run_dir: Path, rel: str) -> None:
        with self.lock(host):
            conn = self.connection(host)
            conn.retrying(lambda c: self._pull_log(c, host, run_dir, rel))

    def _pull_log(self, conn: ssh.Connection, host: str, run_dir: Path, rel: str = LOG_FILE) -> None:
        """Append what the remote log ``rel`` has beyond the local one's size."""
        sftp = conn.sftp()
        remote = posixpath.join(self.run_dir(host, run_dir.name), rel)
        local = run_dir / rel
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
        """Running while any node runs; gone when any node vanished; else rank 0's exit (or another's failure)."""
        nodes = node_handles(handle)
        statuses = [self._poll_node(host, process, run_dir.name) for host, process in nodes]
        named = [(f"node {rank} on {host}: " if len(nodes) > 1 else "", status)
                 for rank, ((host, _), status) in enumerate(zip(nodes, statuses))]
        gone = [(where, s) for where, s in named if s.gone]
        if gone:
            where, status = gone[0]
            self._final_pull(handle, run_dir)
            return Status(running=False, gone=True, detail=where + (status.detail or "it vanished"))
        if any(s.running for s in statuses):
            running = [(where, s) for where, s in named if s.running and s.detail]
            return Status(running=True, detail=running[0][0] + running[0][1].detail if running else None)
        self._final_pull(handle, run_dir)
        failed = [(where, s) for where, s in named if s.exit_code != 0]
        if not failed:
            return statuses[0]
        where, status = failed[0]
        return Status(running=False, exit_code=status.exit_code,
                      detail=where + status.detail if status.detail else None)

    def _poll_node(self, host: str, process: str, run_id: str) -> Status:
        if process.startswith(PID_PREFIX):
            return self._poll_native(host, process.removeprefix(PID_PREFIX), run_id)
        try:
            with self.lock(host):
                found = ssh.run(self.connection(host),
                                ["docker", "inspect", "--type", "container", "--format",
                                 "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", process],
                                timeout_s=COMMAND_TIMEOUT_S)
        except (ssh.ConnectionLost, ssh.CommandTimeout) as exc:
            return self._unreachable(host, exc.message)
        if not found.ok:
            err = found.stderr.decode(errors="replace").strip()
            if "No such" not in err:
                return self._unreachable(host, f"docker on {host} does not answer: {err[:200]}")
            self._unreachable_since.pop(host, None)
            return Status(running=False, gone=True,
                          detail=f"the container vanished from {host} (removed, or the host was preempted "
                                 "or rebuilt)")
        self._unreachable_since.pop(host, None)
        state, code, oom = (found.text().split() + ["", "", ""])[:3]
        if state in RUNNING_STATES:
            return Status(running=True)
        detail = "out of memory: the kernel killed the trainer (OOMKilled)" if oom == "true" else None
        return Status(running=False, exit_code=int(code) if code.lstrip("-").isdigit() else None, detail=detail)

    def _poll_native(self, host: str, pid: str, run_id: str) -> Status:
        """The supervisor's exit code when written, else whether its process lives (checked again after)."""
        script = ('f="$1/' + EXIT_CODE_FILE + '"; if [ -f "$f" ]; then echo exited "$(cat "$f")"; '
                  'elif kill -s 0 "$2" 2>/dev/null; then echo running; '
                  'elif [ -f "$f" ]; then echo exited "$(cat "$f")"; else echo gone; fi')
        try:
            with self.lock(host):
                found = ssh.run(self.connection(host), ["sh", "-c", script, "sh", self.run_dir(host, run_id), pid],
                                timeout_s=COMMAND_TIMEOUT_S)
        except (ssh.ConnectionLost, ssh.CommandTimeout) as exc:
            return self._unreachable(host, exc.message)
        self._unreachable_since.pop(host, None)
        state, _, code = found.text().strip().partition(" ")
        if state == "running":
            return Status(running=True)
        if state == "exited" and code.lstrip("-").isdigit():
            value = int(code)
            return Status(running=False, exit_code=value if value >= 0 else 128 - value)
        return Status(running=False, gone=True,
                      detail=f"the trainer's process {pid} vanished from {host} without an exit code (killed, "
                             "or the host rebooted)")

    def _final_pull(self, handle: str, run_dir: Path) -> None:
        nodes = node_handles(handle)
        try:
            self.pull(nodes[0][0], run_dir.name, run_dir)
            for rank, (host, _) in enumerate(nodes[1:], start=1):
                self._pull_node_log(host, run_dir, node_log(rank))
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
        """Stop every node at once: SIGTERM (passed to the trainers, which checkpoint), then a kill after the grace."""
        nodes = node_handles(handle)
        if len(nodes) == 1:
            self._stop_node(*nodes[0], grace_s)
            return
        errors: list[BaseException] = []

        def stop_one(host: str, process: str) -> None:
            try:
                self._stop_node(host, process, grace_s)
            except UserError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stop_one, args=node) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _stop_node(self, host: str, process: str, grace_s: float) -> None:
        """``docker stop``, or the same for a native process group: TERM, then KILL after ``grace_s``."""
        if process.startswith(PID_PREFIX):
            ticks = max(1, int(grace_s * 2))
            argv = ["sh", "-c", 'kill -s TERM -- "-$1" 2>/dev/null || exit 0; i=0; '
                    'while kill -s 0 -- "-$1" 2>/dev/null; do if [ "$i" -ge "$2" ]; then '
                    'kill -s KILL -- "-$1"; exit 0; fi; sleep 0.5; i=$((i+1)); done',
                    "sh", process.removeprefix(PID_PREFIX), str(ticks)]
        else:
            argv = ["docker", "stop", "--time", str(max(1, int(grace_s))), process]
        with self.lock(host):
            ssh.run(self.connection(host), argv, timeout_s=grace_s + COMMAND_TIMEOUT_S)

    def release(self, handle: str) -> None:
        """Remove every node's container, or kill what is left of its process group."""
        for host, process in node_handles(handle):
            argv = (["sh", "-c", 'kill -s KILL -- "-$1" 2>/dev/null; true', "sh", process.removeprefix(PID_PREFIX)]
                    if process.startswith(PID_PREFIX) else ["docker", "rm", "--force", process])
            try:
                with self.lock(host):
                    ssh.run(self.connection(host), argv)
            except (ssh.ConnectionLost, ssh.CommandTimeout):
                pass  # left on the host; `runner resume` removes a container before another attempt

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
