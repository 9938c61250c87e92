"""Real SSH test hosts for integration tests: one network namespace, user and sshd each.

A test host is as close to a remote machine as one machine allows: its own
network namespace reached over a veth pair on a private /24 (host side .1,
namespace side .2), its own Unix user with a home directory, its own host key
and a real OpenSSH server listening on port 22 of the namespace address. The
namespace shares the filesystem and the Docker socket with this machine, so
the user is put in the ``docker`` group when there is one.

Needs root and what ``scripts/ensure-sshd.sh`` installs. Everything a host
creates is removed by ``SSHTestHost.teardown()``; ``make_hosts()`` guarantees
that, also when a test fails.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SUBNET_PREFIX = "10.213"
SSHD_START_TIMEOUT_S = 10.0
PROCESS_EXIT_TIMEOUT_S = 5.0
REQUIRED_TOOLS = ("ip", "ssh-keygen", "useradd", "userdel", "runuser")


@dataclass
class SSHTestHost:
    """One SSH test host; create it with ``create_host()`` or ``make_hosts()``."""

    name: str
    address: str
    port: int
    user: str
    home: Path
    client_key_path: Path
    host_key_pub_path: Path
    host_public_key: str
    namespace: str
    veth_host: str
    veth_namespace: str
    workdir: Path
    sshd_pid: int | None = None
    _sshd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def sshd_config_path(self) -> Path:
        return self.workdir / "sshd" / "sshd_config"

    @property
    def sshd_log_path(self) -> Path:
        return self.workdir / "sshd" / "sshd.log"

    def link_down(self) -> None:
        """Cut the network to the host: new connections and open ones hang until ``link_up()``.

        The namespace end of the veth pair goes down, not this machine's end:
        taking this end down would delete the route to the /24, and packets for
        the host would leave through the default gateway instead of being lost.
        """
        _run("ip", "-n", self.namespace, "link", "set", self.veth_namespace, "down")

    def link_up(self) -> None:
        """Restore the network cut by ``link_down()``."""
        _run("ip", "-n", self.namespace, "link", "set", self.veth_namespace, "up")
        operstate = Path("/sys/class/net") / self.veth_host / "operstate"
        _wait_for(lambda: operstate.read_text().strip() == "up", 5.0, f"{self.veth_host} to come up")

    def start_sshd(self) -> None:
        """Start sshd in the namespace and wait until it accepts connections."""
        if self._sshd is not None:
            raise RuntimeError(f"sshd of {self.name} already runs (pid {self.sshd_pid})")
        with self.sshd_log_path.open("ab") as log:
            self._sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, SSHD, "-D", "-e", "-f", str(self.sshd_config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # `ip netns exec` execs sshd in place, so this pid is sshd's own.
        self.sshd_pid = self._sshd.pid
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        while not _accepts_connections(self.address, self.port):
            if self._sshd.poll() is not None or time.monotonic() > deadline:
                self.stop_sshd()
                raise RuntimeError(
                    f"sshd of {self.name} did not start listening on {self.address}:{self.port}; "
                    f"its log:\n{self.sshd_log_path.read_text()}"
                )
            time.sleep(0.05)

    def stop_sshd(self) -> None:
        """Stop the listening sshd; connections already open keep running."""
        if self._sshd is None:
            return
        _terminate(self._sshd)
        self._sshd = None
        self.sshd_pid = None

    def restart_sshd(self) -> None:
        self.stop_sshd()
        self.start_sshd()

    def rotate_host_key(self) -> None:
        """Give the host a new host key, as a reinstalled machine would have."""
        private_key = self.host_key_pub_path.with_suffix("")
        private_key.unlink()
        self.host_key_pub_path.unlink()
        self.host_public_key = _keygen(private_key, f"{self.name} host key")
        self.restart_sshd()

    def run_as_user(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run a shell command as the host's user inside its namespace, for checks."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, "runuser", "-l", self.user, "-c", command],
            capture_output=True,
            text=True,
            check=False,
        )

    def teardown(self) -> None:
        """Remove everything the host created; safe on a partly created host and to repeat."""
        errors = []
        for step in (self.stop_sshd, self._kill_leftover_processes, self._delete_network, self._delete_user):
            try:
                step()
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                errors.append(f"{step.__name__}: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise RuntimeError(f"teardown of SSH test host {self.name} left things behind: " + "; ".join(errors))

    def _kill_leftover_processes(self) -> None:
        """Kill what logins to this host left running: processes in its namespace or of its user."""
        pids = set(_namespace_pids(self.namespace)) | set(_user_pids(self.user))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_for(lambda: not any(_alive(pid) for pid in pids), PROCESS_EXIT_TIMEOUT_S,
                  f"processes {sorted(pids)} to exit")

    def _delete_network(self) -> None:
        # The pair first: deleting one end removes both at once, while a deleted
        # namespace takes its devices down asynchronously.
        if _link_exists(self.veth_host):
            _run("ip", "link", "del", self.veth_host)
        if _namespace_exists(self.namespace):
            _run("ip", "netns", "del", self.namespace)

    def _delete_user(self) -> None:
        if _user_exists(self.user):
            _run("userdel", "-r", "-f", self.user)


def create_host(name: str) -> SSHTestHost:
    """Create and start one SSH test host on the first free 10.213.X.0/24 subnet."""
    _check_prerequisites()
    for index in range(1, 255):
        if not _subnet_free(index) or _user_exists(f"rtest{index}") or _link_exists(f"rt{index}h"):
            continue
        namespace = f"runner-test-{index}"
        # Adding the namespace is the atomic claim on this index against parallel test runs.
        if subprocess.run(["ip", "netns", "add", namespace], capture_output=True).returncode != 0:
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"runner-ssh-{index}-"))
        host = SSHTestHost(
            name=name,
            address=f"{SUBNET_PREFIX}.{index}.2",
            port=22,
            user=f"rtest{index}",
            home=workdir / "home",
            client_key_path=workdir / "keys" / "client_ed25519",
            host_key_pub_path=workdir / "sshd" / "ssh_host_ed25519_key.pub",
            host_public_key="",
            namespace=namespace,
            veth_host=f"rt{index}h",
            veth_namespace=f"rt{index}n",
            workdir=workdir,
        )
        try:
            _build(host, index)
        except BaseException:
            host.teardown()
            raise
        return host
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X.0/24 subnet left for an SSH test host")


@contextmanager
def make_hosts(count: int) -> Iterator[list[SSHTestHost]]:
    """Create ``count`` SSH test hosts (host1, host2, ...) and tear all of them down afterwards."""
    hosts: list[SSHTestHost] = []
    try:
        for number in range(1, count + 1):
            hosts.append(create_host(f"host{number}"))
        yield hosts
    finally:
        errors = []
        for host in hosts:
            try:
                host.teardown()
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))


def known_hosts_line(host: SSHTestHost) -> str:
    """The known_hosts line that vouches for the host's current host key."""
    target = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    return f"{target} {host.host_public_key}"


def _build(host: SSHTestHost, index: int) -> None:
    host.workdir.chmod(0o755)  # the user must reach its home inside it
    for private in ("keys", "sshd"):
        (host.workdir / private).mkdir(mode=0o700)

    _run("ip", "link", "add", host.veth_host, "type", "veth", "peer", "name", host.veth_namespace)
    _run("ip", "link", "set", host.veth_namespace, "netns", host.namespace)
    _run("ip", "addr", "add", f"{SUBNET_PREFIX}.{index}.1/24", "dev", host.veth_host)
    _run("ip", "link", "set", host.veth_host, "up")
    _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.veth_namespace)
    _run("ip", "-n", host.namespace, "link", "set", host.veth_namespace, "up")
    _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
    # A fixed neighbour entry keeps link_down() a silent loss: without it, failed ARP
    # turns a hanging connect into a quick "No route to host".
    _run("ip", "neigh", "replace", host.address, "lladdr", _namespace_mac(host), "dev", host.veth_host,
         "nud", "permanent")

    groups = ["-G", "docker"] if _group_exists("docker") else []
    # Password "*" rather than useradd's locking "!": without PAM, sshd refuses locked accounts.
    _run("useradd", "--create-home", "--home-dir", str(host.home), "--shell", "/bin/bash",
         "--password", "*", *groups, host.user)
    user = pwd.getpwnam(host.user)

    client_public_key = _keygen(host.client_key_path, f"runner tests -> {host.name}")
    ssh_dir = host.home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(client_public_key + "\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, user.pw_uid, user.pw_gid)

    host.host_public_key = _keygen(host.host_key_pub_path.with_suffix(""), f"{host.name} host key")
    host.sshd_config_path.write_text(
        f"""\
ListenAddress {host.address}
Port {host.port}
HostKey {host.host_key_pub_path.with_suffix("")}
PidFile {host.workdir / "sshd" / "sshd.pid"}
AllowUsers {host.user}
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
"""
    )
    host.start_sshd()


def _namespace_mac(host: SSHTestHost) -> str:
    fields = _run("ip", "-n", host.namespace, "-o", "link", "show", "dev", host.veth_namespace).split()
    return fields[fields.index("link/ether") + 1]


def _keygen(private_key: Path, comment: str) -> str:
    """Make an ed25519 key pair without passphrase; return the public key as "type base64"."""
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private_key))
    key_type, key_base64 = Path(f"{private_key}.pub").read_text().split()[:2]
    return f"{key_type} {key_base64}"


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("SSH test hosts need root (network namespaces, useradd)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if not Path("/run/sshd").is_dir():
        missing.append("/run/sshd")
    if missing:
        raise RuntimeError(f"SSH test hosts need {', '.join(missing)}: run scripts/ensure-sshd.sh")


def _subnet_free(index: int) -> bool:
    """Whether no address or route of this machine lies in 10.213.<index>.0/24."""
    prefix = f"{SUBNET_PREFIX}.{index}."
    addresses = _run("ip", "-o", "-4", "addr", "show")
    routes = _run("ip", "-4", "route", "show", "table", "all")
    return prefix not in addresses and prefix not in routes


def _accepts_connections(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(PROCESS_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(PROCESS_EXIT_TIMEOUT_S)


def _namespace_pids(namespace: str) -> list[int]:
    if not _namespace_exists(namespace):
        return []
    return [int(pid) for pid in _run("ip", "netns", "pids", namespace).split()]


def _user_pids(user: str) -> list[int]:
    if not _user_exists(user):
        return []
    uid = pwd.getpwnam(user).pw_uid
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            owner = entry.stat().st_uid
        except FileNotFoundError:
            continue
        if owner == uid:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """Whether the process still runs; a zombie waiting for a parent that does not reap it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _namespace_exists(namespace: str) -> bool:
    return Path("/run/netns", namespace).exists()


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout
