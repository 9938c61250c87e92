"""The hardware catalog: typed facts about each GPU or machine the planner knows.

The numbers live in ``runner/data/catalog.yaml`` with their sources; this
module only loads and validates them.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from runner.errors import UserError
from runner.units import parse_bytes
from runner.yamldoc import load_file

CATALOG_PATH = Path(__file__).parent / "data" / "catalog.yaml"

Precision = Literal["fp32", "tf32", "fp16", "bf16", "fp8"]
TrainPrecision = Literal["fp32", "fp16", "bf16", "fp8"]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Arch = Literal["volta", "ampere", "ada", "hopper", "apple", "cpu"]


class Profile(BaseModel):
    """One kind of machine: memory, peak speed per precision, and what it costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    device: Literal["cuda", "mps", "cpu"]
    arch: Arch
    memory_bytes: Bytes = Field(alias="memory", gt=0)
    usable_share: float = Field(gt=0, le=1)
    runtime_bytes: Bytes = Field(alias="runtime_memory", ge=0)
    bandwidth_gbps: float = Field(gt=0)
    tflops: dict[Precision, float]
    precisions: list[TrainPrecision] = Field(min_length=1)
    efficiency: dict[Precision, float]
    image: Literal["cuda-ampere", "cuda-hopper", "cpu", "native"]
    price_usd_per_hour: float = Field(ge=0)
    match: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        for precision in self.precisions:
            if precision not in self.tflops or precision not in self.efficiency:
                raise ValueError(f"precision {precision} needs a tflops and an efficiency entry")
        if "bf16" in self.precisions and self.arch in ("volta", "apple", "cpu"):
            raise ValueError(f"{self.arch} has no bf16")
        if "fp8" in self.precisions and self.arch not in ("ada", "hopper"):
            raise ValueError("fp8 needs Ada or Hopper")
        for share in self.efficiency.values():
            if not 0 < share <= 1:
                raise ValueError("efficiency is a share of peak, in (0, 1]")
        return self

    @property
    def default_precision(self) -> TrainPrecision:
        """What ``precision: auto`` becomes: bf16 on Ampere+, fp16 on older CUDA, fp32 on MPS and CPU."""
        return self.precisions[0]

    def peak_flops(self, precision: str) -> float:
        """Peak dense FLOP/s for a training precision (fp32 matmuls count at the fp32 rate)."""
        return self.tflops[precision] * 1e12  # type: ignore[index]

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_share)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: dict[str, Profile]

    def get(self, profile_id: str) -> Profile:
        """The profile with this id; a UserError with a did-you-mean otherwise."""
        if profile_id in self.profiles:
            return self.profiles[profile_id]
        raise UserError(f"unknown hardware profile {profile_id!r}", hint=suggest(profile_id, list(self.profiles)))

    def match_device(self, device_name: str, memory_bytes: int | None = None) -> Profile | None:
        """The profile for a device name as NVML, nvidia-smi or sysctl reports it.

        Several profiles can share a name (A100 40GB and 80GB); the one with the
        closest memory wins.
        """
        found = [p for p in self.profiles.values()
                 if any(re.search(pattern, device_name.strip(), re.I) for pattern in p.match)]
        if not found:
            return None
        if memory_bytes is None:
            return found[0]
        return min(found, key=lambda p: abs(p.memory_bytes - memory_bytes))


def suggest(word: str, choices: list[str]) -> str:
    """A did-you-mean hint, or the list of choices when nothing is close."""
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"did you mean {near[0]!r}?" if near else "known: " + ", ".join(choices)


@lru_cache(maxsize=4)
def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    """Load and validate the catalog file (cached: it is read-only data)."""
    doc = load_file(path)
    raw = doc.data.get("profiles") if isinstance(doc.data, dict) else None
    if not isinstance(raw, dict):
        raise doc.error(("profiles",), "the catalog needs a profiles: mapping")
    try:
        return Catalog.model_validate({"profiles": {k: {"id": k, **v} for k, v in raw.items()}})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise doc.error(tuple(first["loc"]), first["msg"]) from None


def profile(profile_id: str) -> Profile:
    """Shorthand for ``load_catalog().get(profile_id)``."""
    return load_catalog().get(profile_id)
