"""The host inventory: lookup order, located errors, local detection and the probe cache."""

from pathlib import Path

import pytest

import runner.hosts as hosts_module
from runner.errors import UserError, UserErrors
from runner.hosts import (Detected, Host, NotProbed, Probe, apple_profile, gpu_profile, hardware, inventory_path,
                          load_inventory, parse_nvidia_smi, probe_path, read_probe, write_probe)

ROOT = Path(__file__).resolve().parents[1]
REAL_DETECT = hosts_module.detect_local


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real inventory, config dir, cache or GPU leaks into these tests."""
    monkeypatch.delenv("RUNNER_HOSTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hosts_module, "detect_local",
                        lambda: Detected("rtx-4090", "NVIDIA GeForce RTX 4090", 24 * 2**30, 1, "test"))


def write(tmp_path, text, name="hosts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_example_inventory_loads_with_local_first():
    inventory = load_inventory(ROOT / "hosts.yaml")
    assert inventory.names[0] == "local"
    assert {"m1max", "rtx4090", "a100-80", "h100"} <= set(inventory.names)
    assert inventory.get("a100-80").ssh_target == "ubuntu@a100.example.net"
    assert inventory.get("rtx4090").ssh_target == "rtx4090"  # an ~/.ssh/config alias


def test_local_always_exists_even_without_an_inventory():
    inventory = load_inventory()
    assert inventory.file is None and inventory.names == ["local"]
    hw = hardware(inventory.get("local"))
    assert hw.profile.id == "rtx-4090" and "detected" in hw.source


def test_an_entry_named_local_overrides_its_price_and_profile(tmp_path):
    inventory = load_inventory(write(tmp_path, "hosts:\n  local: {profile: cpu, price_usd_per_hour: 0.1}\n"))
    hw = hardware(inventory.get("local"))
    assert hw.profile.id == "cpu" and hw.price_usd_per_hour == 0.1


def test_lookup_order_is_flag_then_env_then_cwd_then_config_dir(tmp_path, monkeypatch):
    config = tmp_path / "config" / "runner"
    config.mkdir(parents=True)
    (config / "hosts.yaml").write_text("hosts: {}\n")
    assert inventory_path() == config / "hosts.yaml"
    here = write(tmp_path, "hosts: {}\n")
    assert inventory_path() == here
    monkeypatch.setenv("RUNNER_HOSTS", "/somewhere/env.yaml")
    assert inventory_path() == Path("/somewhere/env.yaml")
    assert inventory_path("flag.yaml") == Path("flag.yaml")


def test_unknown_field_is_located_with_did_you_mean(tmp_path):
    path = write(tmp_path, "hosts:\n  box:\n    adress: box.example\n")
    with pytest.raises(UserErrors) as exc:
        load_inventory(path)
    rendered = exc.value.errors[0].render()
    assert rendered.startswith(f"{path}:3:5: hosts.box.adress: unknown field 'adress'")
    assert "did you mean 'address'?" in rendered


def test_unknown_profile_is_located_with_did_you_mean(tmp_path):
    path = write(tmp_path, "hosts:\n  box:\n    profile: a100-80\n")
    with pytest.raises(UserErrors) as exc:
        load_inventory(path)
    rendered = exc.value.errors[0].render()
    assert f"{path}:3:14: hosts.box.profile: " in rendered and "did you mean 'a100-80gb'?" in rendered


def test_wrong_types_and_kinds_are_refused(tmp_path):
    with pytest.raises(UserErrors, match="hosts.box.port"):
        load_inventory(write(tmp_path, "hosts:\n  box: {port: 99999}\n"))
    with pytest.raises(UserErrors, match="kind is local"):
        load_inventory(write(tmp_path, "hosts:\n  local: {kind: ssh}\n"))


def test_unknown_host_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'local'"):
        load_inventory().get("locl")


def test_memory_override_and_default_price_come_through(tmp_path):
    inventory = load_inventory(write(tmp_path, "hosts:\n  big: {profile: a100-80gb, gpus: 2, memory: 40GiB}\n"))
    hw = hardware(inventory.get("big"))
    assert hw.memory_bytes == 40 * 2**30 and hw.gpus == 2
    assert hw.price_usd_per_hour == pytest.approx(2 * 1.29)
    assert hw.capacity_bytes == int(40 * 2**30 * hw.profile.usable_share)


def test_an_unprobed_auto_host_must_be_probed_first():
    with pytest.raises(NotProbed, match="has not been probed") as exc:
        hardware(Host(name="box", profile="auto"))
    assert "runner hosts probe box" in exc.value.hint


def test_the_probe_cache_lives_under_xdg_cache_and_round_trips(tmp_path):
    assert probe_path("box") == tmp_path / "cache" / "runner" / "probes" / "box.json"
    assert read_probe("box") is None
    write_probe("box", Probe(profile="h100-80gb", device_name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, gpus=8))
    hw = hardware(Host(name="box", profile="auto"))
    assert hw.profile.id == "h100-80gb" and hw.gpus == 8 and "probed" in hw.source


def test_a_corrupt_probe_cache_means_probe_again(tmp_path):
    probe_path("box").parent.mkdir(parents=True)
    probe_path("box").write_text("{not json")
    assert read_probe("box") is None


def test_nvidia_smi_output_is_parsed():
    text = "NVIDIA GeForce RTX 4090, 24564\nNVIDIA GeForce RTX 4090, 24564\n"
    assert parse_nvidia_smi(text) == [("NVIDIA GeForce RTX 4090", 24564 * 2**20)] * 2
    assert parse_nvidia_smi("") == []


def test_detected_gpus_map_to_profiles():
    assert gpu_profile("NVIDIA A100-SXM4-80GB", 80 * 2**30, 8, "NVML").profile == "a100-80gb"
    assert gpu_profile("NVIDIA A100-SXM4-40GB", 40 * 2**30, 1, "NVML").profile == "a100-40gb"
    unknown = gpu_profile("NVIDIA RTX A6000", 48 * 2**30, 1, "NVML")
    assert unknown.profile == "a100-40gb" and "unknown to the catalog" in unknown.method


def test_apple_chips_map_to_profiles_with_their_real_memory():
    found = apple_profile("Apple M1 Max", 32 * 2**30)
    assert found.profile == "apple-m1-max" and found.memory_bytes == 32 * 2**30
    assert apple_profile("Apple M9 Hyper", 8 * 2**30).profile == "apple-m1"


def test_real_local_detection_returns_a_catalog_profile():
    from runner.catalog import load_catalog
    found = REAL_DETECT.__wrapped__()  # bypass the cache: this machine, whatever it is
    assert found.profile in load_catalog().profiles and found.memory_bytes > 0 and found.gpus >= 1
