"""The host inventory (``hosts.yaml``) and what hardware each host has.

``local`` always exists. Other hosts are reached over SSH. A host's hardware is
a catalog profile named in the inventory, detected on this machine (``local``
with ``profile: auto``), or read from the probe cache a remote probe wrote.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.catalog import Profile, load_catalog, suggest
from runner.errors import UserError, UserErrors
from runner.units import parse_bytes
from runner.yamldoc import Doc, load_file, load_text

Bytes = Annotated[int, BeforeValidator(parse_bytes)]
HOSTS_ENV = "RUNNER_HOSTS"
LOCAL = "local"


class Host(BaseModel):
    """One machine a job can run on, as written in the inventory."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    kind: Literal["local", "ssh"] = "ssh"
    address: str | None = None  # a hostname, an IP, or an alias from ~/.ssh/config; default: the name
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    key: str | None = None  # private key file; default: whatever ssh picks (~/.ssh/config, loaded keys)
    profile: str = "auto"  # a catalog id, or auto: detected (local) or probed (ssh)
    gpus: int | None = Field(default=None, ge=1)  # default: detected (local auto) or 1
    price_usd_per_hour: float | None = Field(default=None, ge=0)  # default: the profile's
    memory_bytes: Bytes | None = Field(default=None, alias="memory", gt=0)  # per GPU, or RAM/unified memory
    # ssh hosts: the trainer in a container of the host's Docker Engine, or as processes of `python`
    # (an interpreter with runner's train extra installed) on a host without Docker
    backend: Literal["docker", "native"] = "docker"
    python: str | None = None  # native: default python3

    @model_validator(mode="after")
    def _coherent(self) -> Host:
        if self.name == LOCAL and self.kind != "local":
            raise ValueError("the host named local is this machine; its kind is local")
        if self.kind == "local" and self.name != LOCAL:
            raise ValueError("only the host named local has kind local; other hosts are ssh")
        if self.kind == "local" and (self.address or self.user or self.key):
            raise ValueError("local needs no address, user or key")
        if self.kind == "local" and (self.backend != "docker" or self.python):
            raise ValueError("backend and python are for ssh hosts; local picks its backend from its profile")
        if self.python and self.backend != "native":
            raise ValueError("python: is the interpreter of a host with backend: native")
        return self

    @field_validator("python")
    @classmethod
    def _runnable_python(cls, value: str | None) -> str | None:
        # it reaches the host quoted, so no shell expands ~ or resolves it against a directory
        if value is not None and "/" in value and not value.startswith("/"):
            raise ValueError(f"{value!r}: give an absolute path, or a command name on the host's PATH")
        return value

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        known = load_catalog().profiles
        if value != "auto" and value not in known:
            raise ValueError(f"unknown profile {value!r}; {suggest(value, ['auto', *known])}")
        return value

    @property
    def ssh_target(self) -> str:
        """What to hand to ssh: ``user@address`` (or the alias alone)."""
        address = self.address or self.name
        return f"{self.user}@{address}" if self.user else address


@dataclass(frozen=True)
class Inventory:
    """The hosts known to this project, ``local`` first."""

    hosts: dict[str, Host]
    file: str | None  # the inventory file read, None when only local exists

    @property
    def names(self) -> list[str]:
        return list(self.hosts)

    def get(self, name: str) -> Host:
        if name in self.hosts:
            return self.hosts[name]
        where = self.file or "no inventory file; only local exists"
        raise UserError(f"unknown host {name!r} ({where})", field="host", hint=suggest(name, self.names))


def inventory_path(explicit: str | Path | None = None, cwd: Path | None = None) -> Path | None:
    """Where the inventory is: --hosts-file, else $RUNNER_HOSTS, else ./hosts.yaml, else the config dir."""
    chosen = explicit or os.environ.get(HOSTS_ENV)
    if chosen:
        return Path(chosen).expanduser()
    here = (cwd or Path.cwd()) / "hosts.yaml"
    if here.is_file():
        return here
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    user_file = config_home / "runner" / "hosts.yaml"
    return user_file if user_file.is_file() else None


def load_inventory(explicit: str | Path | None = None, cwd: Path | None = None) -> Inventory:
    """Read the inventory found by ``inventory_path``; ``local`` is added when absent."""
    path = inventory_path(explicit, cwd)
    if path is None:
        return Inventory({LOCAL: Host(name=LOCAL, kind="local")}, None)
    return inventory_from_doc(load_file(path))


def inventory_from_doc(doc: Doc) -> Inventory:
    data = doc.data
    if not isinstance(data, dict) or set(data) - {"hosts"}:
        extra = sorted(set(data) - {"hosts"}) if isinstance(data, dict) else []
        path = (extra[0],) if extra else ()
        raise UserErrors([doc.error(path, "a host inventory is a mapping with one key, hosts:",
                                    key=bool(extra), hint="hosts: {NAME: {kind: ssh, address: ..., profile: ...}}")])
    entries = data.get("hosts") or {}
    if not isinstance(entries, dict):
        raise UserErrors([doc.error(("hosts",), "hosts: must map host names to their settings")])
    hosts: dict[str, Host] = {}
    errors: list[UserError] = []
    for name, fields in entries.items():
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            errors.append(doc.error(("hosts", name), "a host's settings must be a mapping"))
            continue
        given = dict(fields)
        if name == LOCAL:
            given.setdefault("kind", "local")
        try:
            hosts[name] = Host.model_validate({**given, "name": name})
        except ValidationError as exc:
            errors.extend(_convert(exc, doc, name))
    if errors:
        raise UserErrors(errors)
    local = hosts.pop(LOCAL, Host(name=LOCAL, kind="local"))
    return Inventory({LOCAL: local, **hosts}, doc.file)


def _convert(exc: ValidationError, doc: Doc, name: str) -> list[UserError]:
    errors = []
    fields = [f.alias or k for k, f in Host.model_fields.items() if k != "name"]
    for err in exc.errors(include_url=False):
        loc = ("hosts", name, *err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            errors.append(doc.error(loc, f"unknown field {key!r}", key=True, hint=suggest(key, fields)))
        elif err["loc"] == ("name",):
            errors.append(doc.error(("hosts", name), f"bad host name {name!r}: use letters, digits, . _ -", key=True))
        elif not err["loc"]:  # a rule across fields: point at kind when written, else the host
            errors.append(doc.error(("hosts", name, "kind"), message))
        else:
            if err["type"].startswith("literal_error"):
                message = f"{message}, got {err.get('input')!r}"
            errors.append(doc.error(loc, message))
    return errors


def add_host(host: Host, explicit: str | Path | None = None) -> Path:
    """Append a host to the inventory, keeping the file's comments and layout; returns the file written.

    With no inventory yet, one is started in the config dir. The new text is read
    back through the same checks as ``load_inventory`` before it replaces the file.
    """
    path = inventory_path(explicit)
    if path is None:
        path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "runner" / "hosts.yaml"
    text = path.read_text() if path.is_file() else ""
    names = load_inventory(path).names if text.strip() else [LOCAL]
    if host.name in names:
        raise UserError(f"{host.name} is already in the inventory", file=str(path), field="name")
    indent = re.search(r"^hosts:[ \t]*\n(?:[ \t]*(?:#.*)?\n)*([ \t]+)\S", text, re.M)
    step = indent.group(1) if indent else "  "
    fields = host.model_dump(by_alias=True, exclude_defaults=True, exclude={"name"})
    entry = f"{step}{host.name}:" + ("" if fields else " {}") + "\n"
    entry += "".join(f"{step * 2}{key}: {json.dumps(value)}\n" for key, value in fields.items())
    base = text if text.strip() else "hosts:\n"
    new_text = base + ("" if base.endswith("\n") else "\n") + entry
    try:
        added = inventory_from_doc(load_text(new_text, str(path))).hosts.get(host.name)
    except (UserError, UserErrors):
        added = None
    if added != host:
        raise UserError("cannot append a host to this file's layout; add it by hand", file=str(path),
                        hint=f"under hosts:, add {host.name}: with {', '.join(fields) or 'no fields'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new_text)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Hardware:
    """What a host really has: the profile to plan with, memory per device, count and price."""

    host: str
    profile: Profile
    memory_bytes: int  # per GPU (unified memory on Apple, RAM on CPU)
    gpus: int
    price_usd_per_hour: float
    source: str  # how we know: "hosts.yaml", "detected: NVIDIA GeForce RTX 4090 (NVML)", ...

    @property
    def capacity_bytes(self) -> int:
        """Memory one training process may use on one device."""
        return int(self.memory_bytes * self.profile.usable_share)


class NotProbed(UserError):
    """An SSH host with ``profile: auto`` that has not been probed yet."""


def hardware(host: Host) -> Hardware:
    """Resolve a host's hardware: its profile, detection for local, or the probe cache."""
    catalog = load_catalog()
    if host.profile != "auto":
        prof = catalog.get(host.profile)
        return Hardware(host.name, prof, host.memory_bytes or prof.memory_bytes, host.gpus or 1,
                        _price(host, prof), f"profile {prof.id} from the inventory")
    if host.kind == "local":
        found = detect_local()
        prof = catalog.get(found.profile)
        return Hardware(host.name, prof, host.memory_bytes or found.memory_bytes, host.gpus or found.gpus,
                        _price(host, prof), f"detected {found.device_name} ({found.method})")
    probe = read_probe(host.name)
    if probe is None:
        raise NotProbed(f"host {host.name!r} has profile auto and has not been probed", field=host.name,
                        hint=f"run `runner hosts probe {host.name}`, or set its profile in hosts.yaml")
    prof = catalog.get(probe.profile)
    return Hardware(host.name, prof, host.memory_bytes or probe.memory_bytes, host.gpus or probe.gpus,
                    _price(host, prof), f"probed {probe.device_name} at {probe.probed_at}")


def _price(host: Host, prof: Profile) -> float:
    if host.price_usd_per_hour is not None:
        return host.price_usd_per_hour
    return prof.price_usd_per_hour * (host.gpus or 1)


# --- probe cache: written by `runner hosts probe`, read when planning ----------------------

class Probe(BaseModel):
    """What a probe of a remote host found, cached so planning needs no SSH round trip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    device_name: str
    memory_bytes: int = Field(gt=0)
    gpus: int = Field(ge=1)
    probed_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def probe_path(host_name: str) -> Path:
    """``$XDG_CACHE_HOME/runner/probes/<host>.json`` (``~/.cache`` when unset)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "runner" / "probes" / f"{host_name}.json"


def read_probe(host_name: str) -> Probe | None:
    """The cached probe of a host, or None when it was never probed or the cache is unreadable."""
    path = probe_path(host_name)
    try:
        return Probe.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError):
        return None  # a stale or corrupt cache means: probe again


def write_probe(host_name: str, probe: Probe) -> Path:
    path = probe_path(host_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(probe.model_dump_json(indent=2) + "\n")
    return path


# --- local detection ------------------------------------------------------------------------

@dataclass(frozen=True)
class Detected:
    """This machine's accelerator as found by NVML, nvidia-smi, sysctl or /proc."""

    profile: str
    device_name: str
    memory_bytes: int
    gpus: int
    method: str


@lru_cache(maxsize=1)
def detect_local() -> Detected:
    """Find this machine's hardware: NVIDIA GPUs, then Apple Silicon, then the CPU."""
    for found in (_nvml(), _nvidia_smi(), _apple()):
        if found is not None:
            return found
    return Detected("cpu", _cpu_name(), _ram_bytes(), 1, "/proc/meminfo" if Path("/proc/meminfo").exists() else "sysconf")


def gpu_profile(device_name: str, memory_bytes: int, gpus: int, method: str) -> Detected:
    """Map a detected NVIDIA GPU to a catalog profile; unknown GPUs plan as the closest-memory A100."""
    catalog = load_catalog()
    found = catalog.match_device(device_name, memory_bytes)
    if found is None:
        # An unknown NVIDIA card: plan as an Ampere profile with its real memory, and say so.
        found = catalog.get("a100-40gb" if memory_bytes < 60 * 2**30 else "a100-80gb")
        method += f", unknown to the catalog: planned as {found.id}"
    return Detected(found.id, device_name, memory_bytes, gpus, method)


def _nvml() -> Detected | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver or no GPU
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return gpu_profile(name, memory, count, "NVML")
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> Detected | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = parse_nvidia_smi(out)
    if not gpus:
        return None
    name, memory = gpus[0]
    return gpu_profile(name, memory, len(gpus), "nvidia-smi")


def parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` (MiB)."""
    found = []
    for line in text.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name and mib.strip().isdigit():
            found.append((name.strip(), int(mib.strip()) * 2**20))
    return found


def _apple() -> Detected | None:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    try:
        brand = _sysctl("machdep.cpu.brand_string")
        memory = int(_sysctl("hw.memsize"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return apple_profile(brand, memory)


def apple_profile(brand: str, memory_bytes: int) -> Detected:
    """Map a chip name (``Apple M1 Max``) to a profile; unknown chips plan as the plain M1."""
    found = load_catalog().match_device(brand)
    method = "sysctl" if found else "sysctl, unknown to the catalog: planned as apple-m1"
    return Detected(found.id if found else "apple-m1", brand, memory_bytes, 1, method)


def _sysctl(key: str) -> str:
    return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5,
                          check=True).stdout.strip()


def _cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine() or "CPU")


def _ram_bytes() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    if match:
        return int(match.group(1)) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
