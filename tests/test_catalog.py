"""The hardware catalog: every profile the planner needs, consistent, with its sources cited."""

import re

import pytest

from runner.catalog import CATALOG_PATH, load_catalog
from runner.errors import UserError

PROFILES = ["cpu", "apple-m1", "apple-m1-pro", "apple-m1-max", "apple-m2", "apple-m2-max", "apple-m3",
            "apple-m3-max", "rtx-3090", "rtx-4090", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb",
            "l4", "l40s", "v100-32gb"]


def test_every_required_profile_is_in_the_catalog():
    assert set(PROFILES) <= set(load_catalog().profiles)


@pytest.mark.parametrize("profile_id, precision, tflops", [
    ("h100-80gb", "bf16", 989.4), ("a100-80gb", "bf16", 312), ("a100-40gb", "fp16", 312),
    ("rtx-4090", "bf16", 165.2), ("rtx-4090", "fp16", 165.2), ("rtx-3090", "bf16", 71), ("v100-32gb", "fp16", 125),
])
def test_peak_dense_tflops_match_the_datasheets(profile_id, precision, tflops):
    assert load_catalog().get(profile_id).tflops[precision] == tflops


def test_precision_rules_follow_the_hardware():
    catalog = load_catalog().profiles
    for p in catalog.values():
        if p.arch in ("volta", "apple", "cpu"):
            assert "bf16" not in p.precisions, p.id
        if "fp8" in p.precisions:
            assert p.arch in ("ada", "hopper"), p.id
    assert catalog["a100-80gb"].default_precision == "bf16"
    assert catalog["v100-32gb"].default_precision == "fp16"
    assert catalog["apple-m1-max"].default_precision == "fp32"
    assert catalog["cpu"].default_precision == "fp32"


def test_apple_runs_native_and_gpus_run_in_their_image_family():
    catalog = load_catalog().profiles
    assert {p.image for p in catalog.values() if p.device == "mps"} == {"native"}
    assert catalog["h100-80gb"].image == "cuda-hopper"
    assert catalog["rtx-4090"].image == "cuda-ampere"
    assert catalog["cpu"].image == "cpu"


def test_every_number_in_the_catalog_cites_a_source():
    lines = CATALOG_PATH.read_text().splitlines()
    start = lines.index("profiles:")
    cited = re.compile(r"#.*(\[\w+\]|same|conservative|estimate|planned|runs|ships|shows)")
    for line in lines[start:]:
        key = line.strip().split(":")[0]
        if key in ("memory", "usable_share", "runtime_memory", "bandwidth_gbps", "tflops", "efficiency",
                   "price_usd_per_hour"):
            assert cited.search(line), f"no source on: {line.strip()}"


def test_device_names_map_to_profiles_and_memory_breaks_ties():
    catalog = load_catalog()
    assert catalog.match_device("NVIDIA GeForce RTX 4090").id == "rtx-4090"
    assert catalog.match_device("NVIDIA A100-SXM4-40GB", 40 * 2**30).id == "a100-40gb"
    assert catalog.match_device("NVIDIA A100 80GB PCIe", 80 * 2**30).id == "a100-80gb"
    assert catalog.match_device("NVIDIA H100 80GB HBM3").id == "h100-80gb"
    assert catalog.match_device("NVIDIA L4").id == "l4"
    assert catalog.match_device("NVIDIA L40S").id == "l40s"
    assert catalog.match_device("Tesla V100-SXM2-32GB").id == "v100-32gb"
    assert catalog.match_device("Apple M1 Max").id == "apple-m1-max"
    assert catalog.match_device("Apple M1").id == "apple-m1"
    assert catalog.match_device("Some Other GPU") is None


def test_unknown_profile_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'rtx-4090'"):
        load_catalog().get("rtx4090")
