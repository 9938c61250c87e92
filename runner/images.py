"""Trainer images: which family a profile uses, its content-derived tag, and building it once.

The families live in ``images/catalog.yaml``. A tag is the family plus a short
hash of everything that goes into the image (the Dockerfile, pyproject.toml,
the ``runner`` package and the build arguments), so an unchanged tree reuses the
image it built before and any source edit gets a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import runner
from runner.catalog import Profile, suggest
from runner.errors import EXIT_FAILED, UserError
from runner.yamldoc import load_file

IMAGE_REPOSITORY = "runner-trainer"
BASE_IMAGE_ENV = "RUNNER_BASE_IMAGE"  # build every family on this base instead (offline tests)
OFFLINE_ENV = "RUNNER_IMAGE_OFFLINE"  # 1: pip installs only from the wheels in .cache/wheels
INDEX_URL_ENV = "RUNNER_PIP_INDEX_URL"  # a package index (mirror) for the dependency layer
WHEELS_DIR = ".cache/wheels"  # inside the build context; the Dockerfile's WHEELS default
HASHED_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".txt"}


class ImageFamily(BaseModel):
    """One trainer image family: its base, where torch comes from, and what it can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    base_image: str
    torch: Literal["base image", "index"]
    torch_index_url: str | None = None
    extra_packages: list[str] = []
    gpu: Literal["nvidia", "none"]
    precisions: list[Literal["fp32", "fp16", "bf16", "fp8"]] = Field(min_length=1)
    profiles: list[str] = []


class ImageCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    families: dict[str, ImageFamily]

    def get(self, name: str) -> ImageFamily:
        if name in self.families:
            return self.families[name]
        raise UserError(f"unknown image family {name!r}", hint=suggest(name, list(self.families)))


@dataclass(frozen=True)
class ImageRef:
    """A concrete image: the family, the build arguments and the tag they hash to."""

    family: str
    build_args: dict[str, str] = field(hash=False)
    tag: str
    context: Path


class BuildFailed(UserError):
    """The trainer image did not build; the message names the build log."""


def project_root() -> Path:
    """The source tree the image is built from: the checkout this package was imported from."""
    return Path(runner.__file__).resolve().parent.parent


def catalog_path(root: Path | None = None) -> Path:
    return (root or project_root()) / "images" / "catalog.yaml"


@lru_cache(maxsize=4)
def load_images(path: Path | None = None) -> ImageCatalog:
    """Load and validate ``images/catalog.yaml``."""
    doc = load_file(path or catalog_path())
    raw = doc.data.get("families") if isinstance(doc.data, dict) else None
    if not isinstance(raw, dict):
        raise doc.error(("families",), "the image catalog needs a families: mapping")
    try:
        return ImageCatalog.model_validate({"families": {k: {"name": k, **v} for k, v in raw.items()}})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise doc.error(("families", *first["loc"][1:]), first["msg"]) from None


def family_for(profile: Profile, images: ImageCatalog | None = None) -> ImageFamily | None:
    """The image family a hardware profile runs in; None for profiles that run natively (Apple)."""
    if profile.image == "native":
        return None
    return (images or load_images()).get(profile.image)


def build_args(family: ImageFamily, env: dict[str, str] | None = None) -> dict[str, str]:
    """The Dockerfile's build arguments for a family, with the environment's overrides applied."""
    env = dict(os.environ if env is None else env)
    args = {"BASE_IMAGE": env.get(BASE_IMAGE_ENV) or family.base_image, "WHEELS": WHEELS_DIR}
    if family.torch == "index" and family.torch_index_url:
        args["TORCH_INDEX_URL"] = family.torch_index_url
    if family.extra_packages:
        args["EXTRA_PACKAGES"] = " ".join(family.extra_packages)
    if env.get(OFFLINE_ENV, "") not in ("", "0"):
        args["OFFLINE"] = "1"
    if env.get(INDEX_URL_ENV):
        args["INDEX_URL"] = env[INDEX_URL_ENV]
    return args


def hashed_files(root: Path) -> list[Path]:
    """What goes into the image and so into its tag: Dockerfile, pyproject.toml, the runner package."""
    files = [root / "Dockerfile", root / "pyproject.toml"]
    files += sorted(p for p in (root / "runner").rglob("*")
                    if p.is_file() and p.suffix in HASHED_SUFFIXES and "__pycache__" not in p.parts)
    return files


def source_hash(root: Path, args: dict[str, str]) -> str:
    """A short hash of the image's inputs: file paths and contents, and the build arguments."""
    digest = hashlib.sha256()
    for path in hashed_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for key in sorted(args):
        digest.update(f"{key}={args[key]}\0".encode())
    return digest.hexdigest()[:12]


def image_for(family: ImageFamily, root: Path | None = None, env: dict[str, str] | None = None) -> ImageRef:
    """The image to run a family in, tagged ``runner-trainer:<family>-<hash>``."""
    root = root or project_root()
    if not (root / "Dockerfile").is_file():
        raise UserError(f"no Dockerfile in {root}; the trainer image is built from a source checkout",
                        hint="install the runner from a git checkout (pip install -e .), or use --backend native")
    args = build_args(family, env)
    return ImageRef(family.name, args, f"{IMAGE_REPOSITORY}:{family.name}-{source_hash(root, args)}", root)


def ensure_image(client, ref: ImageRef, log_path: Path) -> bool:
    """Build ``ref`` unless an image with its tag exists; True when it was built now.

    The build's output is streamed to ``log_path``. A file lock keeps two runners
    from building the same tag at once.
    """
    import docker.errors

    log_path.parent.mkdir(parents=True, exist_ok=True)
    (ref.context / WHEELS_DIR).mkdir(parents=True, exist_ok=True)
    with open(log_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.images.get(ref.tag)
            return False
        except docker.errors.ImageNotFound:
            pass
        with open(log_path, "w") as log:
            log.write(f"building {ref.tag} from {ref.context} with {ref.build_args}\n")
            errors: list[str] = []
            try:
                for chunk in client.api.build(path=str(ref.context), dockerfile="Dockerfile", tag=ref.tag,
                                              buildargs=ref.build_args, rm=True, forcerm=True, decode=True,
                                              labels={"runner.image-family": ref.family}):
                    if "stream" in chunk:
                        log.write(chunk["stream"])
                        log.flush()
                    if "error" in chunk:
                        errors.append(chunk["error"].strip())
                        log.write(chunk["error"])
            except docker.errors.APIError as exc:
                errors.append(str(exc))
                log.write(f"{exc}\n")
        if errors:
            raise BuildFailed(f"building {ref.tag} failed: {errors[-1]}", hint=f"the build log is {log_path}",
                              exit_code=EXIT_FAILED)
        return True
