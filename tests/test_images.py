"""Image families and their content-derived tags."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from runner import images
from runner.catalog import load_catalog

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what goes into the image, plus files that do not."""
    root = tmp_path / "src"
    shutil.copytree(REPO / "runner", root / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Dockerfile", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("def test_x(): pass\n")
    return root


def tag(root: Path, env: dict[str, str] | None = None) -> str:
    return images.image_for(images.load_images().get("cpu"), root, env or {}).tag


def test_the_tag_is_stable_for_an_unchanged_tree(tree: Path):
    first = tag(tree)
    assert first.startswith("runner-trainer:cpu-") and first == tag(tree)


def test_the_tag_changes_when_a_source_file_changes(tree: Path):
    before = tag(tree)
    path = tree / "runner" / "store.py"
    path.write_text(path.read_text() + "\n# edited\n")
    assert tag(tree) != before


def test_the_tag_changes_with_the_dockerfile_the_pyproject_and_a_new_module(tree: Path):
    seen = {tag(tree)}
    for name in ("Dockerfile", "pyproject.toml"):
        (tree / name).write_text((tree / name).read_text() + "\n# edited\n")
        seen.add(tag(tree))
    (tree / "runner" / "new_module.py").write_text("X = 1\n")
    seen.add(tag(tree))
    assert len(seen) == 4


def test_the_tag_ignores_tests_docs_and_bytecode(tree: Path):
    before = tag(tree)
    (tree / "README.md").write_text("changed\n")
    (tree / "tests" / "test_x.py").write_text("changed\n")
    (tree / "runner" / "__pycache__").mkdir(exist_ok=True)
    (tree / "runner" / "__pycache__" / "store.cpython-311.pyc").write_bytes(b"\0")
    assert tag(tree) == before


def test_a_base_image_override_is_part_of_the_tag(tree: Path):
    plain = tag(tree)
    offline = images.image_for(images.load_images().get("cpu"), tree,
                               {images.BASE_IMAGE_ENV: "runner-python:bookworm", images.OFFLINE_ENV: "1"})
    assert offline.tag != plain
    assert offline.build_args["BASE_IMAGE"] == "runner-python:bookworm"
    assert offline.build_args["OFFLINE"] == "1"


def test_every_hardware_profile_uses_a_family_that_lists_it():
    families = images.load_images().families
    assert set(families) == {"cuda-ampere", "cuda-hopper", "cpu"}
    for profile in load_catalog().profiles.values():
        family = images.family_for(profile)
        if profile.image == "native":
            assert family is None
        else:
            assert profile.id in family.profiles, (profile.id, family.name)


def test_every_profile_runs_in_a_family_whose_torch_build_has_kernels_for_its_architecture():
    for profile in load_catalog().profiles.values():
        family = images.family_for(profile)
        if family is not None:
            assert profile.arch in family.arches, (profile.id, family.name)


def torch_floors() -> list[Requirement]:
    """Every torch requirement the image's training stack states: pyproject's, and those of the installed
    libraries, including those behind their `torch` extra (which `pip install transformers` never checks)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["optional-dependencies"]["train"]]
    for dependency in [r.name for r in found if r.name != "torch"]:
        found += [Requirement(r) for r in importlib.metadata.requires(dependency) or []]
    return [r for r in found if r.name == "torch" and (r.marker is None or r.marker.evaluate({"extra": "torch"}))]


def test_the_cuda_images_torch_is_one_the_trainers_libraries_accept():
    floors = torch_floors()
    assert any(r.specifier.contains("2.6") and not r.specifier.contains("2.5.1") for r in floors)  # transformers 5
    for family in images.load_images().families.values():
        if family.torch == "base image":
            torch = Version(re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime",
                                         family.base_image).group(1))
            assert all(r.specifier.contains(torch) for r in floors), (family.name, torch)


def test_hopper_gets_fp8_through_torchao_and_cpu_torch_from_the_cpu_index():
    catalog = images.load_images()
    hopper, cpu = catalog.get("cuda-hopper"), catalog.get("cpu")
    assert "fp8" in hopper.precisions and any("torchao" in p for p in hopper.extra_packages)
    assert "fp8" not in catalog.get("cuda-ampere").precisions
    args = images.build_args(cpu, {})
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "OFFLINE" not in args


def test_a_tree_without_a_dockerfile_is_refused(tmp_path: Path):
    with pytest.raises(images.UserError, match="no Dockerfile"):
        tag(tmp_path)


def test_the_wheels_fetched_for_an_image_pin_the_torch_of_this_environment():
    requirements = images.image_requirements(REPO)
    import torch

    assert requirements[0] == f"torch=={torch.__version__}"
    assert "transformers>=4.45" in requirements and "pydantic>=2.6" in requirements


@pytest.mark.docker
def test_a_base_image_given_by_the_user_that_cannot_be_had_fails_the_build_with_the_way_out(docker_engine,
                                                                                            tmp_path: Path):
    ref = images.image_for(images.load_images().get("cpu"), REPO,
                           {images.BASE_IMAGE_ENV: "runner-test/absent-base:none"})
    with pytest.raises(images.BuildFailed) as failed:
        images.ensure_image(docker_engine, ref, tmp_path / "build.log")
    assert "runner-test/absent-base:none is not here and cannot be pulled" in failed.value.message
    assert images.BASE_IMAGE_ENV in failed.value.hint


@pytest.mark.docker
@pytest.mark.slow
def test_a_family_whose_base_cannot_be_pulled_is_built_on_its_offline_base(docker_engine, trainer_image,
                                                                          tmp_path: Path):
    root = tmp_path / "src"
    shutil.copytree(REPO / "runner", root / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Dockerfile", "pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(REPO / name, root / name)
    # The wheels the session's image was built from, linked rather than copied (hundreds of MB).
    shutil.copytree(REPO / images.WHEELS_DIR, root / images.WHEELS_DIR, copy_function=os.link)
    catalog = (REPO / "images" / "catalog.yaml").read_text()
    (root / "images").mkdir()
    (root / "images" / "catalog.yaml").write_text(
        catalog.replace("base_image: python:3.11-slim-bookworm", "base_image: runner-test/unpullable:none"))
    family = images.load_images(images.catalog_path(root)).get("cpu")
    ref = images.image_for(family, root, {})
    assert ref.build_args["BASE_IMAGE"] == "runner-test/unpullable:none"
    said: list[str] = []
    try:
        assert images.ensure_image(docker_engine, ref, tmp_path / "build.log", said.append)
        labels = docker_engine.images.get(ref.tag).labels
        assert labels["runner.base-image"] == family.offline_base_image == "runner-python:bookworm"
        assert any("runner-test/unpullable:none cannot be pulled" in line for line in said), said
        # The image keeps the tag its sources hash to: the next run finds it and builds nothing.
        assert not images.ensure_image(docker_engine, ref, tmp_path / "build.log")
    finally:
        docker_engine.images.remove(ref.tag, force=True)
