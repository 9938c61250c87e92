"""Bring a remote run directory home incrementally, and send data files to a host once.

``pull`` lists the remote run directory over SFTP without following links and
decides what to move:

- checkpoint files are driven by the trainer's ``checkpoints/*/manifest.json``
  (relative path, size, sha256): a file moves only when the local copy is
  missing or differs, lands as ``.NAME.partial``, resumes from the partial's
  size after an interruption, and is renamed into place only once its sha256
  matches. The local manifest is written last, so a local checkpoint directory
  with a manifest is complete and verified;
- append-only files (logs, ``*.jsonl``) are fetched from the local byte offset on;
- other files move when their size or mtime changed.

Symlinks, special files and any path that would leave the run directory are
refused, on both sides, and reported. The bytes move over exec channels
(``tail -c +N`` per large file, several at once, and ``tar`` for batches of
small files), which costs this side much less than SFTP reads; see docs/remote.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import paramiko

from runner import ssh
from runner.errors import UserError

MANIFEST_NAME = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
APPEND_ONLY_SUFFIXES = (".log", ".jsonl", ".out", ".err")
PARTIAL_SUFFIX = ".partial"
# Large files and file tails come through one `tail -c +N` stream each, several at once:
# no per-request round trips, and far less work for paramiko than SFTP replies.
PARALLEL_STREAMS = 3
# Per stream channel; bounds what paramiko holds in memory when the disk here is slower.
STREAM_WINDOW_BYTES = 16 * 2**20
# Each recv takes all that the channel holds (never more than its window): a smaller
# recv makes paramiko shift the rest of its buffer, which costs most when this side lags.
RECV_ALL_BYTES = STREAM_WINDOW_BYTES
# Small files that must move whole come through one tar stream per batch instead of
# three SFTP round trips each; tar gets their names as quoted arguments.
BATCH_MAX_FILE_BYTES = 2**20
BATCH_FILES = 500
TAR_READ_BYTES = 2**16  # tarfile's read size: its default 10 KiB costs calls, 1 MiB costs copies
TAIL_CHECK_BYTES = 4096  # compared before appending, so a rewritten log is refetched instead
DATA_CACHE_DIR = ".cache/runner/data"  # relative to the remote home


class UnsafePath(ValueError):
    """A path that is absolute, climbs out with '..', or is otherwise not a plain relative path."""


def safe_relpath(path: str) -> str:
    """Check that a path is a plain relative path inside its directory, and return it normalized.

    Refuses empty paths, absolute paths, '..' components, backslashes, NUL and
    other control characters, instead of trying to repair them.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty path")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise UnsafePath(f"control character in path {path!r}")
    if "\\" in path:
        raise UnsafePath(f"backslash in path {path!r}")
    if path.startswith("/") or path.startswith("~"):
        raise UnsafePath(f"absolute path {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafePath(f"path {path!r} names the directory itself")
    if ".." in parts:
        raise UnsafePath(f"path {path!r} contains '..'")
    return "/".join(parts)


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a checkpoint: path relative to the checkpoint directory, size, sha256."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]


def parse_manifest(text: str | bytes, *, where: str = MANIFEST_NAME) -> Manifest:
    """Parse a checkpoint manifest: ``{"files": [{"path", "size", "sha256"}, ...]}``.

    Raises UserError naming the file for anything malformed or unsafe.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"manifest is not valid JSON: {exc}", file=where) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise UserError("manifest needs a 'files' list", file=where)
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(files):
        field_name = f"files[{i}]"
        if not isinstance(item, dict):
            raise UserError("each file entry must be an object", file=where, field=field_name)
        path, size, digest = item.get("path"), item.get("size"), item.get("sha256")
        try:
            path = safe_relpath(path)
        except UnsafePath as exc:
            raise UserError(f"refused: {exc}", file=where, field=f"{field_name}.path") from None
        if path == MANIFEST_NAME:
            raise UserError("a manifest cannot list itself", file=where, field=f"{field_name}.path")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise UserError(f"size must be a non-negative integer, got {size!r}", file=where,
                            field=f"{field_name}.size")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise UserError(f"sha256 must be 64 hex digits, got {digest!r}", file=where,
                            field=f"{field_name}.sha256")
        if path in seen:
            raise UserError(f"{path!r} is listed twice", file=where, field=f"{field_name}.path")
        seen.add(path)
        entries.append(ManifestEntry(path, size, digest.lower()))
    return Manifest(tuple(entries))


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Refusal:
    path: str
    reason: str


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    moved: tuple[str, ...]  # run-relative paths that were (partly) transferred
    bytes_moved: int
    skipped: int  # files already up to date
    refused: tuple[Refusal, ...]
    complete_checkpoints: tuple[str, ...]  # checkpoint dirs verified complete locally
    pending: tuple[str, ...]  # files not moved yet: checkpoints still being written
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.refused


@dataclass
class _Tally:
    moved: list[str] = field(default_factory=list)
    bytes_moved: int = 0
    skipped: int = 0
    refused: list[Refusal] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- local side


def _local_target(local_root: Path, rel: str) -> Path:
    """The local path for a run-relative path, refusing symlinks on the way.

    A path with no '..' and no symlink below the run directory cannot leave it,
    so checking each component with lstat is enough (no realpath per file).
    """
    rel = safe_relpath(rel)
    path = local_root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise UnsafePath(f"local {path} is a symlink")
    return path


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- remote reads


def _fetch_range(transport: paramiko.Transport, host_name: str, remote: str, dest, start: int, end: int,
                 hasher=None) -> int:
    """Copy bytes [start, end) of a remote file into an open local file through one ``tail -c +N`` stream.

    A stream costs this side a fraction of the CPU that SFTP's request and reply
    packets do, and paramiko's side is the bottleneck. Bytes past ``end`` (a log
    still growing) are not read. A stream that ends early raises EOFError, so
    ``Connection.retrying`` lists the directory again.
    """
    if end <= start:
        return 0
    want = end - start
    chan = transport.open_session(window_size=STREAM_WINDOW_BYTES, timeout=ssh.CONNECT_TIMEOUT_S)
    copied = 0
    try:
        chan.settimeout(ssh.DEAD_LINK_S + ssh.KEEPALIVE_S)
        chan.exec_command(ssh.remote_cmd(["tail", "-c", f"+{start + 1}", "--", remote]))
        chan.shutdown_write()
        while copied < want:
            chunk = chan.recv(min(RECV_ALL_BYTES, want - copied))
            if not chunk:
                break
            if hasher is not None:
                hasher.update(chunk)
            dest.write(chunk)
            copied += len(chunk)
        if copied != want:
            chan.status_event.wait(ssh.DEAD_LINK_S)
            if chan.exit_status == 127:
                raise UserError(f"{host_name}: `tail` not found on the host",
                                hint="install coreutils or busybox on the host")
            raise EOFError(f"{remote}: expected {want} bytes, got {copied} (file shrank or vanished?)")
    finally:
        chan.close()
    return copied


class _ChannelStream:
    """A channel's stdout for ``tarfile``'s stream mode, reading all the channel holds at once (see RECV_ALL_BYTES)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self._held = b""
        self._at = 0

    def read(self, size: int) -> bytes:
        if self._at >= len(self._held):
            self._held, self._at = self._chan.recv(RECV_ALL_BYTES), 0
        out = self._held[self._at:self._at + size]
        self._at += len(out)
        return out


# --------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class _RemoteFile:
    rel: str
    size: int
    mtime: int


def _list_remote(sftp: paramiko.SFTPClient, remote_root: str, tally: _Tally) -> dict[str, _RemoteFile]:
    files: dict[str, _RemoteFile] = {}
    for rel, attrs in ssh.walk(sftp, remote_root):
        mode = attrs.st_mode or 0
        try:
            rel = safe_relpath(rel)
        except UnsafePath as exc:
            tally.refused.append(Refusal(rel, str(exc)))
            continue
        if stat.S_ISLNK(mode):
            tally.refused.append(Refusal(rel, "remote symlink (not followed)"))
        elif stat.S_ISREG(mode):
            if not PurePosixPath(rel).name.endswith(PARTIAL_SUFFIX):
                files[rel] = _RemoteFile(rel, attrs.st_size or 0, int(attrs.st_mtime or 0))
        elif not stat.S_ISDIR(mode):
            tally.refused.append(Refusal(rel, "not a regular file"))
    return files


def _checkpoint_dir(rel: str) -> str | None:
    """The checkpoint directory ``checkpoints/NAME`` a run-relative path lies in, if any."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == CHECKPOINTS_DIR:
        return f"{parts[0]}/{parts[1]}"
    return None


@dataclass(frozen=True)
class _Stream:
    """One file (or a log's new tail) to bring home through its own stream.

    ``entry`` set: a checkpoint file, resumed from its partial and checked against
    the manifest. ``append_from`` set: a log that grew, appended in place.
    Otherwise a whole file, written to its partial name and renamed.
    """

    rel: str
    remote_path: str
    local: Path
    size: int
    mtime: int
    entry: ManifestEntry | None = None
    append_from: int | None = None


@dataclass(frozen=True)
class _Done:
    """What one stream did: bytes moved, and whether its file is in place."""

    stream: _Stream
    bytes_moved: int
    ok: bool


@dataclass(frozen=True)
class _CheckpointPlan:
    """A checkpoint whose manifest is written once every file it waits for is in place."""

    manifest_rel: str
    local_manifest: Path
    manifest_bytes: bytes
    already: bool  # the local manifest is this one: the checkpoint was complete before
    waits_for: tuple[str, ...]


def pull(conn: ssh.Connection, remote_dir: str, local_dir: Path) -> SyncReport:
    """Bring a remote run directory home: only what is new or changed moves; see the module doc.

    ``remote_dir`` is absolute or relative to the remote home. Reconnects and
    resumes if the link drops; raises ConnectionLost if it stays down.
    """
    started = time.monotonic()
    local_dir.mkdir(parents=True, exist_ok=True)
    tally = _Tally()
    done: set[str] = set()  # what earlier attempts finished, so a retry does not count it twice

    def attempt(c: ssh.Connection) -> None:
        _pull_once(c, remote_dir.rstrip("/") or "/", local_dir, tally, done)

    conn.retrying(attempt)
    return SyncReport(
        moved=tuple(dict.fromkeys(tally.moved)),
        bytes_moved=tally.bytes_moved,
        skipped=tally.skipped,
        refused=tuple(dict.fromkeys(tally.refused)),
        complete_checkpoints=tuple(sorted(set(tally.complete))),
        pending=tuple(sorted(set(tally.pending))),
        wall_s=time.monotonic() - started,
    )


def _pull_once(conn: ssh.Connection, remote_root: str, local_root: Path, tally: _Tally,
               done: set[str]) -> None:
    """List, decide what moves (on this thread, over SFTP), then move it over parallel streams."""
    sftp = conn.sftp()
    tally.refused.clear()
    tally.pending.clear()
    files = _list_remote(sftp, remote_root, tally)
    streams: list[_Stream] = []
    checkpoints: list[_CheckpointPlan] = []
    for ckpt in sorted({d for rel in files if (d := _checkpoint_dir(rel))}):
        # The trainer writes into a hidden directory and renames it when done.
        if f"{ckpt}/{MANIFEST_NAME}" not in files or ckpt.split("/")[1].startswith("."):
            tally.pending.extend(rel for rel in files if rel.startswith(ckpt + "/"))
            continue
        plan = _plan_checkpoint(sftp, remote_root, local_root, ckpt, files, tally, done, streams)
        if plan is not None:
            checkpoints.append(plan)
    small: list[_RemoteFile] = []
    for rel in sorted(files):
        if _checkpoint_dir(rel) or rel in done:
            continue
        if _wants_whole(local_root, files[rel]):
            small.append(files[rel])
        elif (stream := _plan_plain(sftp, remote_root, local_root, files[rel], tally)) is not None:
            streams.append(stream)
        else:
            done.add(rel)
    # Largest first, so the streams still running at the end are the short ones.
    streams.sort(key=lambda s: s.size, reverse=True)
    finished = _move(conn, remote_root, local_root, streams, small, tally, done)
    for plan in checkpoints:
        if all(rel in finished for rel in plan.waits_for):
            _finish_checkpoint(plan, tally, done)


def _move(conn: ssh.Connection, remote_root: str, local_root: Path, streams: list[_Stream],
          small: list[_RemoteFile], tally: _Tally, done: set[str]) -> set[str]:
    """Run the streams, PARALLEL_STREAMS at a time, beside one worker for the tar batches of small files.

    Several streams at once keep the link busy while this side hashes and
    writes, and small files cost per file (headers, creating files), not per
    byte. The workers get the transport, not the Connection, so only this
    thread reconnects; their results are counted here, the first error raised
    after all have stopped. Returns the run-relative paths now in place.
    """
    transport, host = conn.transport(), conn.endpoint.name
    finished: set[str] = set()
    batches = [small[i:i + BATCH_FILES] for i in range(0, len(small), BATCH_FILES)]
    small_tally = _Tally()
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=PARALLEL_STREAMS + 1, thread_name_prefix="sync") as pool:
        try:
            tar_job = pool.submit(_pull_batches, transport, host, remote_root, local_root, batches, small_tally,
                                  done)
            jobs = [pool.submit(_run_stream, transport, host, s) for s in streams]
            for job in jobs:
                try:
                    result = job.result()
                except Exception as exc:  # noqa: BLE001 - raised below, once every worker has stopped
                    errors.append(exc)
                    continue
                rel = result.stream.rel
                tally.bytes_moved += result.bytes_moved
                if result.ok:
                    tally.moved.append(rel)
                    finished.add(rel)
                    done.add(rel)
                else:
                    tally.refused.append(Refusal(rel, "sha256 does not match the manifest"))
            try:
                tar_job.result()
            except Exception as exc:  # noqa: BLE001 - as above
                errors.append(exc)
        except BaseException:
            # Interrupted while waiting (Ctrl-C): stop every stream now rather than when its file is
            # done; the partial files stay for the next sync, which reconnects.
            transport.close()
            raise
    tally.moved.extend(small_tally.moved)
    tally.bytes_moved += small_tally.bytes_moved
    tally.refused.extend(small_tally.refused)
    tally.pending.extend(small_tally.pending)
    if errors:
        raise errors[0]
    return finished


def _run_stream(transport: paramiko.Transport, host: str, s: _Stream) -> _Done:
    if s.entry is not None:
        return _fetch_verified(transport, host, s)
    if s.append_from is not None:
        with open(s.local, "ab") as dest:
            moved = _fetch_range(transport, host, s.remote_path, dest, s.append_from, s.size)
    else:
        partial = _partial_path(s.local)
        with open(partial, "wb") as dest:
            moved = _fetch_range(transport, host, s.remote_path, dest, 0, s.size)
        os.replace(partial, s.local)
    os.utime(s.local, (s.mtime, s.mtime))
    return _Done(s, moved, True)


def _plan_checkpoint(sftp: paramiko.SFTPClient, remote_root: str, local_root: Path, ckpt: str,
                     files: dict[str, _RemoteFile], tally: _Tally, done: set[str],
                     streams: list[_Stream]) -> _CheckpointPlan | None:
    """Decide which files of a checkpoint move; None when its manifest cannot be written this time."""
    manifest_rel = f"{ckpt}/{MANIFEST_NAME}"
    try:
        with sftp.open(f"{remote_root}/{manifest_rel}", "rb") as f:
            manifest_bytes = f.read()
    except FileNotFoundError:  # the trainer's keep-last pruned it after the listing: nothing to bring home
        return None
    try:
        manifest = parse_manifest(manifest_bytes, where=manifest_rel)
    except UserError as exc:
        tally.refused.append(Refusal(manifest_rel, exc.render()))
        return None
    try:
        local_manifest = _local_target(local_root, manifest_rel)
    except UnsafePath as exc:
        tally.refused.append(Refusal(manifest_rel, str(exc)))
        return None
    already = local_manifest.is_file() and local_manifest.read_bytes() == manifest_bytes
    waits_for: list[str] = []
    complete = True
    for entry in manifest.entries:
        rel = f"{ckpt}/{entry.path}"
        if rel in done:
            continue
        remote = files.get(rel)
        if remote is None:
            tally.refused.append(Refusal(rel, "listed in the manifest but not a regular file in the run "
                                              "directory (missing, or behind a symlink)"))
            complete = False
            continue
        if remote.size != entry.size_bytes:
            tally.pending.append(rel)  # still being written, or replaced: try again next time
            complete = False
            continue
        try:
            local = _local_target(local_root, rel)
        except UnsafePath as exc:
            tally.refused.append(Refusal(rel, str(exc)))
            complete = False
            continue
        if local.is_file() and local.stat().st_size == entry.size_bytes and (
                already or _sha256_file(local) == entry.sha256):
            tally.skipped += 1
            done.add(rel)
            continue
        streams.append(_Stream(rel, f"{remote_root}/{rel}", local, entry.size_bytes, remote.mtime, entry=entry))
        waits_for.append(rel)
    if not complete:
        return None
    return _CheckpointPlan(manifest_rel, local_manifest, manifest_bytes, already, tuple(waits_for))


def _finish_checkpoint(plan: _CheckpointPlan, tally: _Tally, done: set[str]) -> None:
    """Write the local manifest last, so a local checkpoint with a manifest is complete and verified."""
    if not plan.already:
        tmp = _partial_path(plan.local_manifest)
        tmp.write_bytes(plan.manifest_bytes)
        os.replace(tmp, plan.local_manifest)
        tally.moved.append(plan.manifest_rel)
        tally.bytes_moved += len(plan.manifest_bytes)
    else:
        tally.skipped += 1
    tally.complete.append(plan.manifest_rel.rsplit("/", 1)[0])
    done.add(plan.manifest_rel)


def _fetch_verified(transport: paramiko.Transport, host: str, s: _Stream) -> _Done:
    """Fetch into the partial file (resuming it), check the sha256, rename into place.

    New bytes are hashed as they arrive; only a resumed partial's earlier bytes
    are read back from disk.
    """
    assert s.entry is not None
    partial = _partial_path(s.local)
    s.local.parent.mkdir(parents=True, exist_ok=True)
    if partial.is_symlink():
        partial.unlink()
    have = partial.stat().st_size if partial.is_file() else 0
    if have > s.size:
        partial.unlink()
        have = 0
    hasher = hashlib.sha256()
    if have:
        with open(partial, "rb") as f:
            while chunk := f.read(4 * 2**20):
                hasher.update(chunk)
    with open(partial, "ab") as dest:
        moved = _fetch_range(transport, host, s.remote_path, dest, have, s.size, hasher)
    if hasher.hexdigest() != s.entry.sha256:
        partial.unlink()
        return _Done(s, moved, False)
    os.replace(partial, s.local)
    return _Done(s, moved, True)


def _wants_whole(local_root: Path, remote: _RemoteFile) -> bool:
    """A small file that is missing locally, or changed and not appendable: fetched in a tar batch."""
    if remote.size > BATCH_MAX_FILE_BYTES:
        return False
    try:
        local = _local_target(local_root, remote.rel)
    except UnsafePath:
        return False  # refused with its reason by _plan_plain
    if not local.exists():
        return True
    if not local.is_file() or local.is_symlink():
        return False
    st = local.stat()
    if remote.rel.endswith(APPEND_ONLY_SUFFIXES) and 0 < st.st_size <= remote.size:
        return False  # fetched from its byte offset
    return st.st_size != remote.size or int(st.st_mtime) != remote.mtime


def _pull_batches(transport: paramiko.Transport, host: str, remote_root: str, local_root: Path,
                  batches: list[list[_RemoteFile]], tally: _Tally, done: set[str]) -> None:
    for batch in batches:
        _pull_batch(transport, host, remote_root, local_root, batch, tally, done)


def _pull_batch(transport: paramiko.Transport, host: str, remote_root: str, local_root: Path,
                batch: list[_RemoteFile], tally: _Tally, done: set[str]) -> None:
    """Fetch many small files through one ``tar -c`` stream; only the regular files asked for are taken."""
    wanted = {f.rel: f for f in batch}
    argv = ["tar", "-C", remote_root, "-cf", "-", "--", *wanted]
    chan = transport.open_session(window_size=STREAM_WINDOW_BYTES, timeout=ssh.CONNECT_TIMEOUT_S)
    try:
        chan.settimeout(ssh.DEAD_LINK_S + ssh.KEEPALIVE_S)
        chan.exec_command(ssh.remote_cmd(argv))
        chan.shutdown_write()
        with tarfile.open(fileobj=_ChannelStream(chan), mode="r|", bufsize=TAR_READ_BYTES) as archive:
            for member in archive:
                rel = member.name
                if rel not in wanted or rel in done:
                    tally.refused.append(Refusal(rel, "unexpected entry in the tar stream"))
                    continue
                if not member.isreg():
                    tally.refused.append(Refusal(rel, "changed into a symlink or special file while listed"))
                    continue
                try:
                    local = _local_target(local_root, rel)
                except UnsafePath as exc:
                    tally.refused.append(Refusal(rel, str(exc)))
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                partial = _partial_path(local)
                source = archive.extractfile(member)
                assert source is not None
                with open(partial, "wb") as dest:
                    while chunk := source.read(2**20):
                        dest.write(chunk)
                os.utime(partial, (member.mtime, member.mtime))
                os.replace(partial, local)
                tally.moved.append(rel)
                tally.bytes_moved += member.size
                done.add(rel)
        chan.recv_exit_status()
    except tarfile.ReadError as exc:
        raise UserError(f"{host}: tar stream of the run directory unreadable: {exc}",
                        hint="is GNU or BSD tar installed on the host?") from None
    finally:
        chan.close()
    for rel in wanted:
        if rel not in done:
            tally.pending.append(rel)  # gone or unreadable on the host since the listing


def _plan_plain(sftp: paramiko.SFTPClient, remote_root: str, local_root: Path, remote: _RemoteFile,
                tally: _Tally) -> _Stream | None:
    """Decide how a file outside the checkpoints moves; None when it does not (up to date or refused)."""
    try:
        local = _local_target(local_root, remote.rel)
    except UnsafePath as exc:
        tally.refused.append(Refusal(remote.rel, str(exc)))
        return None
    remote_path = f"{remote_root}/{remote.rel}"
    local.parent.mkdir(parents=True, exist_ok=True)
    if local.exists() and not local.is_file():
        tally.refused.append(Refusal(remote.rel, "local path exists and is not a regular file"))
        return None
    have = local.stat().st_size if local.is_file() else 0
    # Size and mtime as on the host (set after every fetch and append): nothing to do,
    # and no round trip, which matters with thousands of log files.
    if local.is_file() and have == remote.size and int(local.stat().st_mtime) == remote.mtime:
        tally.skipped += 1
        return None
    if remote.rel.endswith(APPEND_ONLY_SUFFIXES) and 0 < have <= remote.size and _same_tail(
            sftp, remote_path, local, have):
        if have < remote.size:
            return _Stream(remote.rel, remote_path, local, remote.size, remote.mtime, append_from=have)
        tally.skipped += 1
        os.utime(local, (remote.mtime, remote.mtime))
        return None
    return _Stream(remote.rel, remote_path, local, remote.size, remote.mtime)


def _same_tail(sftp, remote_path: str, local: Path, have: int) -> bool:
    """Whether the local file is still a prefix of the remote one (checked on its last bytes)."""
    start = max(0, have - TAIL_CHECK_BYTES)
    with open(local, "rb") as f:
        f.seek(start)
        mine = f.read(have - start)
    with sftp.open(remote_path, "rb") as f:
        f.seek(start)
        theirs = f.read(have - start)
    return mine == theirs


# --------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    """Where a data file lies on the host, and whether this call had to send it."""

    remote_path: str  # absolute: ~/.cache/runner/data/<sha256>/<name>
    sha256: str
    size_bytes: int
    sent: bool


def push_data(conn: ssh.Connection, local_path: Path) -> PushResult:
    """Put a data file into the host's content-addressed cache; a file already there is not sent again."""
    if not local_path.is_file():
        raise UserError(f"data file not found: {local_path}")
    name = local_path.name
    digest = _sha256_file(local_path)
    size = local_path.stat().st_size
    home = ssh.home(conn)
    remote_dir = posixpath.join(home, DATA_CACHE_DIR, digest)
    remote_path = posixpath.join(remote_dir, name)

    def attempt(c: ssh.Connection) -> bool:
        sftp = c.sftp()
        try:
            attrs = sftp.lstat(remote_path)
            if stat.S_ISREG(attrs.st_mode or 0) and attrs.st_size == size:
                return False
        except FileNotFoundError:
            pass
        ssh.makedirs(sftp, remote_dir)
        partial = posixpath.join(remote_dir, f".{name}{PARTIAL_SUFFIX}")
        sftp.put(str(local_path), partial)
        check = ssh.run(c, ["sha256sum", "--", partial], timeout_s=600)
        if not check.ok or check.text().split()[0] != digest:
            sftp.remove(partial)
            raise UserError(f"{name}: sha256 on the host does not match after upload", hint="try again")
        sftp.posix_rename(partial, remote_path)
        return True

    sent = conn.retrying(attempt)
    return PushResult(remote_path, digest, size, sent)
