"""Probe a host: OS, kernel, GPUs, CUDA, Docker and the NVIDIA runtime, free disk, Python.

The same shell script runs on a remote host over SSH and on this machine as a
subprocess, so both are read by one parser. A probe picks the hardware profile
of a host whose inventory says ``profile: auto`` and is cached with a timestamp.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from runner import hosts, ssh
from runner.catalog import load_catalog
from runner.errors import UserError
from runner.images import ImageFamily, family_for

PROBE_TIMEOUT_S = 60.0
# The oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes, table 3):
# any driver of the major runs every minor's runtime through CUDA's minor-version compatibility.
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# Each section starts with a marker line; a missing tool leaves its section empty.
PROBE_SCRIPT = r"""
echo @@os; cat /etc/os-release 2>/dev/null
echo @@kernel; uname -sr 2>/dev/null
echo @@arch; uname -m 2>/dev/null
echo @@gpus; nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null
echo @@cuda; nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p'
echo @@docker; docker version --format '{{.Server.Version}}' 2>/dev/null
echo @@runtimes; docker info --format '{{json .Runtimes}}' 2>/dev/null; command -v nvidia-container-runtime 2>/dev/null
echo @@disk; df -Pk "$HOME" 2>/dev/null | tail -n 1
echo @@python; python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null
echo @@cpus; nproc 2>/dev/null
echo @@memory; grep MemTotal /proc/meminfo 2>/dev/null
echo @@end
"""


@dataclass(frozen=True)
class GPU:
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    driver_version: str


@dataclass(frozen=True)
class HostProbe:
    """What a host has, as found by one probe."""

    host: str
    probed_at: str  # ISO 8601, UTC
    os_name: str  # PRETTY_NAME from /etc/os-release
    kernel: str
    arch: str
    gpus: tuple[GPU, ...]
    cuda_version: str | None  # the highest CUDA the driver supports
    docker_version: str | None  # the engine's version; None when no engine answers this user
    nvidia_runtime: bool  # the NVIDIA container runtime is installed
    disk_free_bytes: int  # on the filesystem holding the user's home
    python_version: str | None
    cpus: int
    memory_bytes: int

    @property
    def profile(self) -> str:
        """The catalog profile this host plans as."""
        if not self.gpus:
            return "cpu"
        return profile_for_gpu(self.gpus[0].name, self.gpus[0].memory_total_bytes)


def profile_for_gpu(gpu_name: str, memory_bytes: int) -> str:
    """Map a GPU name as nvidia-smi reports it to a catalog profile id (e.g. rtx-4090, a100-80gb)."""
    return hosts.gpu_profile(gpu_name, memory_bytes, 1, "nvidia-smi").profile


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current = sections.setdefault(line[2:].strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    return sections


def _mib(text: str) -> int:
    number = text.strip().split()[0]
    return int(float(number) * 2**20)


def parse_gpus(lines: list[str]) -> tuple[GPU, ...]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader``."""
    gpus = []
    for line in lines:
        parts = line.rsplit(",", 3)
        if len(parts) != 4:
            continue
        name, total, used, driver = (p.strip() for p in parts)
        try:
            gpus.append(GPU(name, _mib(total), _mib(used), driver))
        except (ValueError, IndexError):
            continue  # "[N/A]" and the like: not a usable GPU line
    return tuple(gpus)


def image_family(host: hosts.Host, profile_id: str) -> ImageFamily | None:
    """The image an SSH host trains in; None for this machine (it may train natively) and native SSH hosts."""
    if host.kind != "ssh" or host.backend == "native":
        return None
    return family_for(load_catalog().get(profile_id))


def blockers(found: HostProbe, family: ImageFamily | None) -> list[str]:
    """What keeps the trainer's image ``family`` from running on a probed host; empty when nothing does.

    None for a host that trains natively, outside a container: nothing to check here.
    """
    if family is None:
        return []
    found_blockers = []
    if found.docker_version is None:
        found_blockers.append("no Docker Engine answers this user (install one, or add the user to the docker group)")
    if family.gpu == "nvidia" and found.gpus:
        if not found.nvidia_runtime:
            found_blockers.append("the NVIDIA Container Toolkit is not installed: containers cannot reach the GPUs")
        needs, driver = family.cuda_version, _major(found.cuda_version)
        if needs and driver is not None and driver < needs[0]:
            minimum = MIN_DRIVER.get(needs[0])
            found_blockers.append(
                f"driver {found.gpus[0].driver_version} runs CUDA {found.cuda_version} at most; the {family.name} image "
                f"runs CUDA {needs[0]}.{needs[1]}, which needs "
                + (f"driver {minimum} or newer" if minimum else f"a driver for CUDA {needs[0]}"))
    return found_blockers


def _major(version: str | None) -> int | None:
    head = (version or "").split(".")[0]
    return int(head) if head.isdigit() else None


def parse_probe(text: str, *, host: str, probed_at: str | None = None) -> HostProbe:
    """Read the output of PROBE_SCRIPT."""
    s = _sections(text)
    if "end" not in s:
        raise UserError(f"probe of {host} was cut short", hint="run the probe again")
    os_release = dict(line.split("=", 1) for line in s.get("os", []) if "=" in line)
    os_name = os_release.get("PRETTY_NAME", os_release.get("NAME", "unknown")).strip('"')
    runtimes = " ".join(s.get("runtimes", []))
    disk = s.get("disk", [])
    disk_free = 0
    if disk:
        fields = disk[-1].split()
        if len(fields) >= 4 and fields[3].isdigit():
            disk_free = int(fields[3]) * 1024
    memory = 0
    for line in s.get("memory", []):
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            memory = int(parts[1]) * 1024

    def first(name: str) -> str | None:
        values = s.get(name, [])
        return values[0] if values else None

    cpus = first("cpus")
    return HostProbe(
        host=host,
        probed_at=probed_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        os_name=os_name,
        kernel=first("kernel") or "unknown",
        arch=first("arch") or "unknown",
        gpus=parse_gpus(s.get("gpus", [])),
        cuda_version=first("cuda"),
        docker_version=first("docker"),
        nvidia_runtime="nvidia" in runtimes,
        disk_free_bytes=disk_free,
        python_version=first("python"),
        cpus=int(cpus) if cpus and cpus.isdigit() else 0,
        memory_bytes=memory,
    )


def probe_remote(conn: ssh.Connection, host: str) -> HostProbe:
    """Probe a host over an open SSH connection."""
    result = ssh.run(conn, ["sh", "-c", PROBE_SCRIPT], timeout_s=PROBE_TIMEOUT_S)
    if not result.ok:
        raise UserError(f"probe of {host} failed (exit {result.exit_code}): "
                        f"{result.stderr.decode(errors='replace').strip()[:300]}")
    return parse_probe(result.text(), host=host)


def probe_local(host: str = hosts.LOCAL) -> HostProbe:
    """Probe this machine with the same script."""
    try:
        done = subprocess.run(["sh", "-c", PROBE_SCRIPT], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"probe of this machine failed: {exc}") from None
    return parse_probe(done.stdout, host=host)


def probe_host(host: hosts.Host) -> HostProbe:
    """Probe an inventory host (over SSH unless it is local) and cache the result."""
    if host.kind == "local":
        found = probe_local(host.name)
    else:
        with ssh.connect(ssh.endpoint_for(host)) as conn:
            found = probe_remote(conn, host.name)
    save(found)
    return found


# --------------------------------------------------------------------------- the cache


def details_path(host: str) -> Path:
    """Where the full probe lies, beside the planning summary ``hosts.probe_path`` names."""
    return hosts.probe_path(host).with_name(f"{host}.details.json")


def save(found: HostProbe) -> Path:
    """Cache a probe: the summary planning reads (``hosts.write_probe``) and the full details."""
    if found.gpus:
        summary = hosts.Probe(profile=found.profile, device_name=found.gpus[0].name,
                              memory_bytes=found.gpus[0].memory_total_bytes, gpus=len(found.gpus),
                              probed_at=found.probed_at)
    else:
        summary = hosts.Probe(profile="cpu", device_name=f"{found.cpus} CPUs ({found.arch})",
                              memory_bytes=max(found.memory_bytes, 1), gpus=1, probed_at=found.probed_at)
    hosts.write_probe(found.host, summary)
    path = details_path(found.host)
    path.write_text(json.dumps(asdict(found), indent=2) + "\n")
    return path


def read_cached(host: str) -> HostProbe | None:
    """The full cached probe of a host, or None when it was never probed or the cache is unreadable."""
    try:
        data = json.loads(details_path(host).read_text())
        data["gpus"] = tuple(GPU(**g) for g in data["gpus"])
        return HostProbe(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
