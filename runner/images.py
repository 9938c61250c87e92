"""Trainer images: which family a profile uses, its content-derived tag, and building it once.

The families live in ``images/catalog.yaml``. A tag is the family plus a short
hash of everything that goes into the image (the Dockerfile, pyproject.toml,
the ``runner`` package and the build arguments), so an unchanged tree reuses the
image it built before and any source edit gets a new one.

Where no registry answers, a family's base image cannot be pulled. A family
with an ``offline_base_image`` (the CPU one: Debian's Python, built locally by
``scripts/ensure-docker.sh``) is then built on that base, offline, from wheels
that this machine's pip fetches into the build context; the image keeps the tag
its sources hash to, so every later run finds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import runner
from runner.catalog import Arch, Profile, suggest
from runner.errors import EXIT_FAILED, UserError
from runner.yamldoc import load_file

IMAGE_REPOSITORY = "runner-trainer"
BASE_IMAGE_ENV = "RUNNER_BASE_IMAGE"  # build every family on this base instead (offline tests)
OFFLINE_ENV = "RUNNER_IMAGE_OFFLINE"  # 1: pip installs only from the wheels in .cache/wheels
INDEX_URL_ENV = "RUNNER_PIP_INDEX_URL"  # a package index (mirror) for the dependency layer
WHEELS_DIR = ".cache/wheels"  # inside the build context; the Dockerfile's WHEELS default
WHEELS_STAMP = ".fetched.sha256"  # in WHEELS_DIR: what the wheels there were fetched for
IMAGE_PYTHON = "3.11"  # the Python of the offline base image, which the fetched wheels must fit
HASHED_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".txt"}


class ImageFamily(BaseModel):
    """One trainer image family: its base, where torch comes from, and what it can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    base_image: str
    torch: Literal["base image", "index"]
    torch_index_url: str | None = None
    offline_base_image: str | None = None  # a locally built base to use where base_image cannot be pulled
    extra_packages: list[str] = []
    gpu: Literal["nvidia", "none"]
    arches: list[Arch] = Field(min_length=1)  # the GPU architectures its torch build has kernels for
    precisions: list[Literal["fp32", "fp16", "bf16", "fp8"]] = Field(min_length=1)
    profiles: list[str] = []

    @property
    def cuda_version(self) -> tuple[int, int] | None:
        """The CUDA its base image's torch was built for, read off the tag (``...-cuda12.6-...``); None for CPU."""
        found = re.search(r"-cuda(\d+)\.(\d+)", self.base_image)
        return (int(found.group(1)), int(found.group(2))) if found else None


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


def torch_requirement() -> str:
    """The torch the image gets when built from fetched wheels: the one this environment runs."""
    try:
        return f"torch=={importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        return "torch"


def image_requirements(root: Path) -> list[str]:
    """What the image's dependency layer installs: torch, the build tools, the runner's dependencies."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [torch_requirement(), "setuptools>=68", "wheel", *project["dependencies"],
            *project["optional-dependencies"]["train"]]


def fetch_wheels(root: Path, log: IO[str]) -> bool:
    """Fetch every wheel the image installs into ``root/.cache/wheels`` with this machine's pip; True if it ran.

    Skipped when the wheels there were fetched for the same requirements. torch
    comes first and alone, so the rest resolves against that wheel (a CPU build
    stays a CPU build) instead of pulling another from an index.
    """
    wheels = root / WHEELS_DIR
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = image_requirements(root)
    digest = hashlib.sha256("\n".join([IMAGE_PYTHON, *requirements]).encode()).hexdigest()
    stamp = wheels / WHEELS_STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return False
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--dest", str(wheels),
           "--find-links", str(wheels), "--only-binary=:all:", "--python-version", IMAGE_PYTHON]
    for command in (pip + ["--no-deps", requirements[0]], pip + requirements):
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise BuildFailed(f"fetching the image's wheels into {wheels} failed",
                              hint=f"pip's output is in {log.name}", exit_code=EXIT_FAILED)
    stamp.write_text(digest)
    return True


def _base_available(client, image: str, log: IO[str], say: Callable[[str], None]) -> bool:
    """Whether the engine has ``image`` or can pull it now."""
    import docker.errors

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        pass
    say(f"pulling the base image {image}")
    log.write(f"pulling {image}\n")
    try:
        client.images.pull(image)
        return True
    except docker.errors.APIError as exc:
        log.write(f"cannot pull {image}: {exc}\n")
        return False


def _offline_args(ref: ImageRef, say: Callable[[str], None]) -> dict[str, str]:
    """The build arguments of ``ref`` on its family's offline base, for when its base cannot be pulled."""
    base = ref.build_args["BASE_IMAGE"]
    family = load_images(catalog_path(ref.context)).get(ref.family)
    fallback = family.offline_base_image if base == family.base_image else None
    if fallback is None:
        raise BuildFailed(f"the base image {base} is not here and cannot be pulled", exit_code=EXIT_FAILED,
                          hint=f"pull or load it with docker, or build on another base: {BASE_IMAGE_ENV}=IMAGE "
                               f"(with {OFFLINE_ENV}=1 to install from wheels this machine fetches)")
    say(f"{base} cannot be pulled (no registry answers?); building on {fallback} with wheels from this "
        f"machine's pip instead")
    return {**ref.build_args, "BASE_IMAGE": fallback, "OFFLINE": "1"}


def ensure_image(client, ref: ImageRef, log_path: Path, say: Callable[[str], None] | None = None) -> bool:
    """Build ``ref`` unless an image with its tag exists; True when it was built now.

    The build's output is streamed to ``log_path``; ``say`` hears what is slow or
    unusual (the build itself, a fallback base). A file lock keeps two runners
    from building the same tag at once.
    """
    import docker.errors

    say = say or (lambda message: None)
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
            args = dict(ref.build_args)
            if not _base_available(client, args["BASE_IMAGE"], log, say):
                args = _offline_args(ref, say)
                if not _base_available(client, args["BASE_IMAGE"], log, say):
                    raise BuildFailed(f"neither {ref.build_args['BASE_IMAGE']} nor {args['BASE_IMAGE']} is here, "
                                      "and neither can be pulled", exit_code=EXIT_FAILED,
                                      hint=f"scripts/ensure-docker.sh builds {args['BASE_IMAGE']} without a registry")
            if args.get("OFFLINE") and fetch_wheels(ref.context, log):
                say(f"fetched the image's wheels into {ref.context / WHEELS_DIR}")
            say(f"building image {ref.tag} on {args['BASE_IMAGE']} (log: {log_path})")
            log.write(f"building {ref.tag} from {ref.context} with {args}\n")
            errors: list[str] = []
            try:
                for chunk in client.api.build(path=str(ref.context), dockerfile="Dockerfile", tag=ref.tag,
                                              buildargs=args, rm=True, forcerm=True, decode=True,
                                              labels={"runner.image-family": ref.family,
                                                      "runner.base-image": args["BASE_IMAGE"]}):
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
