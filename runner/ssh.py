"""SSH connections to remote hosts: resolve, verify the host key, authenticate, run quoted commands.

Everything remote goes through here. Hosts are resolved from the inventory's
fields and from ``~/.ssh/config`` (HostName, User, Port, IdentityFile,
ProxyJump, ProxyCommand, all parsed by paramiko). Host keys are checked against
``~/.ssh/known_hosts`` and the runner's own known_hosts file; an unknown or a
changed key is refused, never added silently. Commands are built from argument
lists, each argument quoted for the remote POSIX shell.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shlex
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import paramiko

from runner.errors import UserError

CONNECT_TIMEOUT_S = 15.0
KEEPALIVE_S = 10.0
# A link that takes this long to acknowledge data is treated as dropped (TCP_USER_TIMEOUT).
DEAD_LINK_S = 20.0
RECONNECT_WITHIN_S = 120.0
# Large channel windows and packets let SFTP keep many reads in flight.
WINDOW_BYTES = 64 * 2**20
MAX_PACKET_BYTES = 2**18
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")

T = TypeVar("T")


class HostKeyError(UserError):
    """The host presented a key that is not known, or that differs from the known one."""


class ConnectionLost(UserError):
    """The host could not be reached, or the link to it dropped."""


class CommandTimeout(UserError):
    """A remote command did not finish within its time limit."""


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to log in, after the inventory and ~/.ssh/config are applied."""

    name: str  # what the user calls it: an inventory name or an ssh_config alias
    hostname: str
    port: int = 22
    user: str = ""
    key_paths: tuple[str, ...] = ()  # explicit identity files, tried before the agent
    identities_only: bool = False  # IdentitiesOnly yes: no agent keys
    jump: tuple[Endpoint, ...] = ()  # ProxyJump hops, the first one is dialled directly
    proxy_command: str | None = None

    @property
    def known_hosts_name(self) -> str:
        """The name this host has in known_hosts, as OpenSSH writes it."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}" if self.user else f"{self.hostname}:{self.port}"


def ssh_config_path() -> Path:
    return Path("~/.ssh/config").expanduser()


def _load_ssh_config(path: Path | None) -> paramiko.SSHConfig:
    path = path if path is not None else ssh_config_path()
    if not path.is_file():
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise UserError(f"cannot read SSH config: {exc}", file=str(path)) from None


def resolve(
    address: str,
    *,
    name: str | None = None,
    user: str | None = None,
    port: int | None = None,
    key: str | None = None,
    config_path: Path | None = None,
) -> Endpoint:
    """Resolve an address (hostname or ~/.ssh/config alias) into an Endpoint.

    Fields given here (from the inventory) win over ~/.ssh/config, as ssh's own
    command-line options do.
    """
    config = _load_ssh_config(config_path)
    return _resolve(config, address, name=name, user=user, port=port, key=key, depth=0)


def _resolve(config: paramiko.SSHConfig, address: str, *, name: str | None, user: str | None,
             port: int | None, key: str | None, depth: int) -> Endpoint:
    if depth > 8:
        raise UserError(f"ProxyJump chain through {address!r} is too deep (a loop?)", file=str(ssh_config_path()))
    found = config.lookup(address)
    hostname = found.get("hostname", address)
    try:
        port_n = int(port if port is not None else found.get("port", 22))
    except ValueError:
        raise UserError(f"port of {address!r} is not a number: {found.get('port')!r}",
                        file=str(ssh_config_path())) from None
    keys = [key] if key else list(found.get("identityfile", []))
    jump: list[Endpoint] = []
    proxy_jump = found.get("proxyjump")
    if proxy_jump and proxy_jump.lower() != "none":
        for hop in proxy_jump.split(","):
            hop_user, hop_host, hop_port = _split_jump(hop.strip())
            hop_ep = _resolve(config, hop_host, name=hop_host, user=hop_user, port=hop_port, key=None,
                              depth=depth + 1)
            # A hop with its own ProxyJump is reached through that first.
            jump.extend(hop_ep.jump)
            jump.append(_without_jump(hop_ep))
    proxy_command = found.get("proxycommand")
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    return Endpoint(
        name=name or address,
        hostname=hostname,
        port=port_n,
        user=user or found.get("user") or _local_user(),
        key_paths=tuple(str(Path(k).expanduser()) for k in keys),
        identities_only=str(found.get("identitiesonly", "no")).lower() == "yes",
        jump=tuple(jump),
        proxy_command=None if jump else proxy_command,
    )


def _without_jump(ep: Endpoint) -> Endpoint:
    return Endpoint(ep.name, ep.hostname, ep.port, ep.user, ep.key_paths, ep.identities_only)


def _split_jump(spec: str) -> tuple[str | None, str, int | None]:
    """Split a ProxyJump hop ``[user@]host[:port]`` (or ``ssh://[user@]host[:port]``)."""
    spec = spec.removeprefix("ssh://")
    user, _, hostport = spec.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    return (user or None), host, port


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def endpoint_for(host: object, *, config_path: Path | None = None) -> Endpoint:
    """The Endpoint of an inventory host (``runner.hosts.Host``).

    Fields the inventory leaves at their defaults (the port) do not override ~/.ssh/config.
    """
    address = getattr(host, "address", None) or getattr(host, "name")
    given = getattr(host, "model_fields_set", None)
    port = getattr(host, "port", None)
    if given is not None and "port" not in given:
        port = None
    return resolve(
        address,
        name=getattr(host, "name", address),
        user=getattr(host, "user", None),
        port=port,
        key=getattr(host, "key", None),
        config_path=config_path,
    )


# --------------------------------------------------------------------------- host keys


def runner_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "runner"


def runner_known_hosts_path() -> Path:
    """The known_hosts file that `runner hosts trust` writes to."""
    return runner_config_dir() / "known_hosts"


def user_known_hosts_path() -> Path:
    return Path("~/.ssh/known_hosts").expanduser()


def fingerprint(key: paramiko.PKey) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it (``SHA256:...``, no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class HostKey:
    """A host's key as presented, compared with what known_hosts says about that host."""

    host: str  # the name the user trusts it under (inventory name or alias)
    known_hosts_name: str  # hostname or [hostname]:port
    key_type: str  # ssh-ed25519, ecdsa-sha2-nistp256, ...
    fingerprint: str  # SHA256:...
    key_base64: str
    status: str  # "known", "unknown" or "changed"
    known_fingerprints: tuple[str, ...] = ()  # what known_hosts holds for this host and key type

    def known_hosts_line(self) -> str:
        return f"{self.known_hosts_name} {self.key_type} {self.key_base64}"


def _load_known_hosts() -> list[paramiko.HostKeys]:
    tables = []
    for path in (user_known_hosts_path(), runner_known_hosts_path()):
        table = paramiko.HostKeys()
        if path.is_file():
            try:
                table.load(str(path))
            except (OSError, paramiko.SSHException) as exc:
                raise UserError(f"cannot read known_hosts: {exc}", file=str(path)) from None
        tables.append(table)
    return tables


def _known_keys(ep: Endpoint) -> dict[str, list[paramiko.PKey]]:
    """Keys known for this endpoint, by key type, from every known_hosts file."""
    keys: dict[str, list[paramiko.PKey]] = {}
    for table in _load_known_hosts():
        entry = table.lookup(ep.known_hosts_name)
        if entry is None:
            continue
        for key_type in entry.keys():
            keys.setdefault(key_type, []).append(entry[key_type])
    return keys


def _compare(ep: Endpoint, key: paramiko.PKey) -> HostKey:
    known = _known_keys(ep)
    same_type = known.get(key.get_name(), [])
    if any(k.asbytes() == key.asbytes() for k in same_type):
        status = "known"
    elif same_type:
        status = "changed"
    else:
        status = "unknown"
    return HostKey(
        host=ep.name,
        known_hosts_name=ep.known_hosts_name,
        key_type=key.get_name(),
        fingerprint=fingerprint(key),
        key_base64=key.get_base64(),
        status=status,
        known_fingerprints=tuple(fingerprint(k) for k in same_type),
    )


def _refuse(hk: HostKey) -> HostKeyError:
    if hk.status == "changed":
        return HostKeyError(
            f"HOST KEY CHANGED for {hk.host} ({hk.known_hosts_name}): it now presents {hk.key_type} "
            f"{hk.fingerprint}, but known_hosts has {', '.join(hk.known_fingerprints)}. "
            "Someone may be intercepting the connection (man-in-the-middle), or the host was reinstalled. "
            "Refusing to connect.",
            hint=f"if you know the host was rebuilt, check the new fingerprint out of band, then run "
                 f"`runner hosts trust {hk.host}`",
        )
    return HostKeyError(
        f"unknown host key for {hk.host} ({hk.known_hosts_name}): {hk.key_type} {hk.fingerprint}; refusing to connect",
        hint=f"check the fingerprint with the host's provider, then run `runner hosts trust {hk.host}`",
    )


def record_host_key(hk: HostKey, path: Path | None = None) -> Path:
    """Record a host key in the runner's known_hosts, replacing older keys of its type for that host."""
    path = path or runner_known_hosts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = paramiko.HostKeys()
    if path.is_file():
        table.load(str(path))
    key = paramiko.PKey.from_type_string(hk.key_type, base64.b64decode(hk.key_base64))
    table.add(hk.known_hosts_name, hk.key_type, key)
    tmp = path.with_name(path.name + ".tmp")
    table.save(str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def fetch_host_key(ep: Endpoint, *, timeout_s: float = CONNECT_TIMEOUT_S) -> HostKey:
    """Connect far enough to see the host's key, without logging in, and compare it with known_hosts.

    Jump hosts on the way must already be trusted.
    """
    transport = _handshake(ep, timeout_s=timeout_s)
    try:
        return _compare(ep, transport.get_remote_server_key())
    finally:
        transport.close()


def trust_host(ep: Endpoint, confirm: Callable[[HostKey], bool] | None = None) -> HostKey:
    """Fetch the host's key, let the caller show it (``confirm``), and record it if confirmed."""
    hk = fetch_host_key(ep)
    if hk.status != "known" and (confirm is None or confirm(hk)):
        record_host_key(hk)
    return hk


# --------------------------------------------------------------------------- connecting


def _tune_socket(sock: socket.socket) -> None:
    """Make a dead link fail within about DEAD_LINK_S instead of TCP's default quarter of an hour."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(KEEPALIVE_S))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(DEAD_LINK_S * 1000))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _dial(ep: Endpoint, timeout_s: float) -> tuple[socket.socket | paramiko.Channel | paramiko.ProxyCommand,
                                                   list[paramiko.Transport]]:
    """Open the byte stream to the host: directly, through ProxyJump hops, or a ProxyCommand."""
    hops: list[paramiko.Transport] = []
    if ep.jump:
        try:
            via = _connect(ep.jump[0], timeout_s=timeout_s)
            hops.append(via)
            for hop in (*ep.jump[1:], ep):
                chan = via.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                        timeout=timeout_s)
                if hop is ep:
                    return chan, hops
                via = _connect(hop, timeout_s=timeout_s, sock=chan)
                hops.append(via)
        except paramiko.ChannelException as exc:
            for t in hops:
                t.close()
            raise ConnectionLost(f"jump host could not reach {ep.describe()}: {exc}") from None
        except BaseException:
            for t in hops:
                t.close()
            raise
    if ep.proxy_command:
        return paramiko.ProxyCommand(ep.proxy_command), hops
    try:
        sock = socket.create_connection((ep.hostname, ep.port), timeout=timeout_s)
    except OSError as exc:
        raise ConnectionLost(f"cannot reach {ep.name} ({ep.describe()}): {exc.strerror or exc}") from None
    _tune_socket(sock)
    return sock, hops


def _handshake(ep: Endpoint, *, timeout_s: float, sock=None) -> paramiko.Transport:
    """Open a transport and run key exchange; the host key is not yet checked."""
    hops: list[paramiko.Transport] = []
    if sock is None:
        sock, hops = _dial(ep, timeout_s)
    transport = paramiko.Transport(sock, default_window_size=WINDOW_BYTES, default_max_packet_size=MAX_PACKET_BYTES)
    transport._runner_hops = hops  # closed with it  # noqa: SLF001
    # paramiko starts a rekey every 512 MiB and can stall in it while SFTP reads are
    # in flight (paramiko issue #822); leave rekeying to sshd, whose RekeyLimit applies.
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 2**62
    # Ask for a key type we already know for this host, as OpenSSH does, so a
    # host with several keys is not reported unknown for showing another one.
    known_types = list(_known_keys(ep))
    options = transport.get_security_options()
    options.key_types = [t for t in options.key_types if t in known_types] + [
        t for t in options.key_types if t not in known_types]
    # AES-GCM encrypts and authenticates in one pass: the fastest paramiko has.
    options.ciphers = sorted(options.ciphers, key=lambda c: "-gcm@" not in c)
    options.digests = sorted(options.digests, key=lambda d: "-etm@" not in d)
    try:
        transport.start_client(timeout=timeout_s)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        _close(transport)
        raise ConnectionLost(f"SSH handshake with {ep.name} ({ep.describe()}) failed: {exc}") from None
    return transport


def _close(transport: paramiko.Transport) -> None:
    transport.close()
    for hop in reversed(getattr(transport, "_runner_hops", [])):
        hop.close()


def _connect(ep: Endpoint, *, timeout_s: float = CONNECT_TIMEOUT_S, sock=None) -> paramiko.Transport:
    transport = _handshake(ep, timeout_s=timeout_s, sock=sock)
    try:
        hk = _compare(ep, transport.get_remote_server_key())
        if hk.status != "known":
            raise _refuse(hk)
        _authenticate(transport, ep)
    except BaseException:
        _close(transport)
        raise
    transport.set_keepalive(int(KEEPALIVE_S))
    return transport


def _identity_files(ep: Endpoint) -> list[Path]:
    if ep.key_paths:
        return [Path(p) for p in ep.key_paths]
    return [p for p in (Path("~/.ssh").expanduser() / n for n in DEFAULT_IDENTITIES) if p.is_file()]


def _authenticate(transport: paramiko.Transport, ep: Endpoint) -> None:
    tried: list[str] = []
    locked: list[str] = []
    for path in _identity_files(ep):
        try:
            key = paramiko.PKey.from_path(str(path))
        except FileNotFoundError:
            if ep.key_paths:
                raise UserError(f"key file for {ep.name} not found: {path}", field="key") from None
            continue
        except paramiko.PasswordRequiredException:
            locked.append(str(path))
            continue
        except (paramiko.SSHException, OSError, ValueError) as exc:
            raise UserError(f"cannot load key {path}: {exc}", field="key") from None
        if _try_key(transport, ep, key):
            return
        tried.append(str(path))
    if not ep.identities_only:
        try:
            agent_keys = paramiko.Agent().get_keys()
        except paramiko.SSHException:
            agent_keys = ()
        for key in agent_keys:
            if _try_key(transport, ep, key):
                return
            tried.append(f"agent key {fingerprint(key)}")
    hint = "add the key with `ssh-copy-id`, or set `key:` for this host in hosts.yaml"
    if locked:
        hint = f"load passphrase-protected keys into the agent: ssh-add {' '.join(locked)}"
    raise UserError(
        f"{ep.name} ({ep.describe()}) refused every key offered: {', '.join(tried) or 'no keys found'}",
        hint=hint,
    )


def _try_key(transport: paramiko.Transport, ep: Endpoint, key: paramiko.PKey) -> bool:
    try:
        transport.auth_publickey(ep.user, key)
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise ConnectionLost(f"{ep.name}: connection dropped while logging in: {exc}") from None
    return transport.is_authenticated()


# --------------------------------------------------------------------------- the connection


@dataclass
class Connection:
    """A logged-in connection to one host that reconnects, with backoff, after the link drops.

    ``transport()`` and ``sftp()`` reconnect when the old link is gone;
    ``retrying(fn)`` reruns an idempotent operation after a drop.
    """

    endpoint: Endpoint
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    reconnect_within_s: float = RECONNECT_WITHIN_S
    _transport: paramiko.Transport | None = field(default=None, repr=False)
    _sftp: paramiko.SFTPClient | None = field(default=None, repr=False)

    def __enter__(self) -> Connection:
        self.transport()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._transport is not None:
            _close(self._transport)
            self._transport = None

    def transport(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            self.reconnect()
        assert self._transport is not None
        return self._transport

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None or self._transport is None or not self._transport.is_active():
            transport = self.transport()
            try:
                self._sftp = paramiko.SFTPClient.from_transport(
                    transport, window_size=WINDOW_BYTES, max_packet_size=MAX_PACKET_BYTES)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._drop()
                raise ConnectionLost(f"{self.endpoint.name}: cannot start SFTP: {exc}") from None
            assert self._sftp is not None
            self._sftp.get_channel().settimeout(DEAD_LINK_S + KEEPALIVE_S)
        return self._sftp

    def _drop(self) -> None:
        self._sftp = None
        if self._transport is not None:
            _close(self._transport)
            self._transport = None

    def reconnect(self) -> None:
        """Log in again, retrying with backoff while the host is unreachable."""
        self._drop()
        deadline = time.monotonic() + self.reconnect_within_s
        delay_s = 0.5
        while True:
            try:
                self._transport = _connect(self.endpoint, timeout_s=self.connect_timeout_s)
                return
            except ConnectionLost as exc:
                if time.monotonic() + delay_s > deadline:
                    raise ConnectionLost(
                        f"{self.endpoint.name} unreachable for {self.reconnect_within_s:.0f}s: {exc.message}",
                        hint="check the host is running and the network is up; the run on it is left alone",
                    ) from None
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)

    def retrying(self, fn: Callable[[Connection], T], *, attempts: int = 5) -> T:
        """Run an idempotent operation, reconnecting and rerunning it if the link drops."""
        for attempt in range(attempts):
            try:
                return fn(self)
            except (ConnectionLost, paramiko.SSHException, OSError, EOFError) as exc:
                if not self._is_link_failure(exc):
                    raise
                if attempt == attempts - 1:
                    raise _as_lost(self.endpoint, exc) from None
                self.reconnect()  # gives up with ConnectionLost after reconnect_within_s
        raise AssertionError("unreachable")

    def _is_link_failure(self, exc: BaseException) -> bool:
        """Tell a dropped link from an error the host reported (a missing file, a refused write)."""
        if isinstance(exc, (ConnectionLost, EOFError, paramiko.SSHException, TimeoutError, ConnectionError)):
            return True
        return self._transport is None or not self._transport.is_active()


def _as_lost(ep: Endpoint, exc: BaseException) -> ConnectionLost:
    if isinstance(exc, ConnectionLost):
        return exc
    return ConnectionLost(f"lost the connection to {ep.name}: {exc or type(exc).__name__}",
                          hint="the operation can be repeated; it resumes where it stopped")


def connect(ep: Endpoint, **kwargs: float) -> Connection:
    """Open a Connection (logged in) to an endpoint."""
    conn = Connection(ep, **kwargs)
    conn.transport()
    return conn


# --------------------------------------------------------------------------- commands


def remote_cmd(argv: list[str]) -> str:
    """Quote an argument list into one command line for the remote POSIX shell."""
    if not argv:
        raise ValueError("empty command")
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"command arguments must be strings, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"a command argument cannot contain a NUL byte: {arg!r}")
    return " ".join(shlex.quote(arg) for arg in argv)


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def run(conn: Connection, argv: list[str], *, timeout_s: float = 60.0, stdin: bytes | None = None) -> CommandResult:
    """Run a command given as an argument list on the host and collect its output.

    Raises CommandTimeout if it runs longer than ``timeout_s`` and ConnectionLost
    if the link drops; it is not rerun, because it may not be idempotent.
    """
    command = remote_cmd(argv)
    try:
        chan = conn.transport().open_session(timeout=conn.connect_timeout_s)
        try:
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = _collect(chan, time.monotonic() + timeout_s, argv)
            return CommandResult(chan.recv_exit_status(), out, err)
        finally:
            chan.close()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise _as_lost(conn.endpoint, exc) from None


def _collect(chan: paramiko.Channel, deadline: float, argv: list[str]) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    while True:
        if chan.recv_ready():
            out += chan.recv(2**16)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(2**16)
        elif chan.eof_received and chan.exit_status_ready():
            return bytes(out), bytes(err)
        else:
            transport = chan.get_transport()
            if transport is None or not transport.is_active():
                raise EOFError("the connection closed before the command finished")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(f"remote command did not finish in time: {remote_cmd(argv)[:200]}")
            # stdout wakes the select; stderr and exit status are polled.
            select.select([chan], [], [], min(remaining, 0.05))


# --------------------------------------------------------------------------- SFTP


def home(conn: Connection) -> str:
    """The remote user's home directory (absolute)."""
    return conn.retrying(lambda c: c.sftp().normalize("."))


def makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """Create a remote directory and its parents, like ``mkdir -p``."""
    parts = [p for p in path.split("/") if p]
    current = "/" if path.startswith("/") else ""
    for part in parts:
        current = f"{current}{part}" if current.endswith("/") or not current else f"{current}/{part}"
        try:
            attrs = sftp.lstat(current)
        except FileNotFoundError:
            sftp.mkdir(current)
            continue
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise UserError(f"remote path {current!r} exists and is not a directory")


def walk(sftp: paramiko.SFTPClient, top: str) -> Iterator[tuple[str, paramiko.SFTPAttributes]]:
    """Yield (path relative to top, attributes) for every entry under a remote directory.

    Uses lstat data from the listing, so symlinks are reported as links and never followed.
    A directory removed after its parent was listed (a checkpoint the trainer's keep-last
    pruned meanwhile) is passed over; ``top`` itself must exist.
    """
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = sftp.listdir_attr(f"{top}/{rel}" if rel else top)
        except FileNotFoundError:
            if not rel:
                raise
            continue
        for attrs in entries:
            child = f"{rel}/{attrs.filename}" if rel else attrs.filename
            yield child, attrs
            if stat.S_ISDIR(attrs.st_mode or 0):
                stack.append(child)


def put_file(conn: Connection, local: Path, remote: str) -> None:
    """Upload one file, writing to a temporary name and renaming it into place."""
    sftp = conn.sftp()
    tmp = f"{remote}.partial"
    sftp.put(str(local), tmp, confirm=True)
    sftp.posix_rename(tmp, remote)
