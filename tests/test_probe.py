"""Probing: parsing what hosts report, the GPU-to-profile mapping, and probes of real hosts."""

from __future__ import annotations

import pytest

from runner import images, probe

A100_HOST = """@@os
PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
@@kernel
Linux 5.15.0-105-generic
@@arch
x86_64
@@gpus
NVIDIA A100-SXM4-80GB, 81920 MiB, 1024 MiB, 535.104.05
NVIDIA A100-SXM4-80GB, 81920 MiB, 0 MiB, 535.104.05
@@cuda
12.2
@@docker
24.0.7
@@runtimes
{"io.containerd.runc.v2":{"path":"runc"},"nvidia":{"path":"nvidia-container-runtime"}}
/usr/bin/nvidia-container-runtime
@@disk
/dev/nvme0n1p1 1000000000 400000000 600000000 40% /
@@python
3.10.12
@@cpus
32
@@memory
MemTotal:       263856440 kB
@@end
"""


def test_an_a100_host_probe_is_read_into_its_parts_and_profile():
    found = probe.parse_probe(A100_HOST, host="a100", probed_at="2026-11-24T00:00:00+00:00")
    assert found.os_name == "Ubuntu 22.04.4 LTS" and found.kernel.startswith("Linux 5.15")
    assert len(found.gpus) == 2
    assert found.gpus[0] == probe.GPU("NVIDIA A100-SXM4-80GB", 81920 * 2**20, 1024 * 2**20, "535.104.05")
    assert (found.cuda_version, found.docker_version, found.nvidia_runtime) == ("12.2", "24.0.7", True)
    assert found.disk_free_bytes == 600000000 * 1024
    assert (found.python_version, found.cpus, found.memory_bytes) == ("3.10.12", 32, 263856440 * 1024)
    assert found.profile == "a100-80gb"


@pytest.mark.parametrize(("name", "mib", "profile_id"), [
    ("NVIDIA GeForce RTX 4090", 24564, "rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 40960, "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80gb"),
])
def test_gpu_names_map_to_catalog_profiles(name, mib, profile_id):
    assert probe.profile_for_gpu(name, mib * 2**20) == profile_id


def test_a_host_without_tools_probes_as_cpu_with_nothing_invented():
    found = probe.parse_probe("@@os\n@@gpus\n@@docker\n@@runtimes\n@@disk\n@@python\n@@end\n", host="bare")
    assert (found.gpus, found.docker_version, found.nvidia_runtime, found.python_version) == ((), None, False, None)
    assert found.profile == "cpu"


def test_a_cuda_12_driver_runs_both_cuda_images_through_minor_version_compatibility():
    found = probe.parse_probe(A100_HOST, host="a100")  # driver 535, CUDA 12.2 at most
    families = images.load_images()
    assert probe.blockers(found, families.get("cuda-ampere")) == []  # CUDA 12.6
    assert probe.blockers(found, families.get("cuda-hopper")) == []  # CUDA 12.8
    assert probe.blockers(found, None) == []  # a native host: no image


def test_an_old_driver_a_missing_toolkit_or_engine_keeps_the_image_from_running_and_says_what_to_install():
    old = probe.parse_probe(A100_HOST.replace("535.104.05", "520.61.05").replace("@@cuda\n12.2", "@@cuda\n11.8"),
                            host="a100")
    ampere = images.load_images().get("cuda-ampere")
    assert probe.blockers(old, ampere) == [
        "driver 520.61.05 runs CUDA 11.8 at most; the cuda-ampere image runs CUDA 12.6, which needs driver "
        "525.60.13 or newer"]
    bare = probe.parse_probe("@@gpus\nNVIDIA GeForce RTX 4090, 24564 MiB, 0 MiB, 550.54.14\n@@cuda\n12.4\n"
                             "@@docker\n@@runtimes\n@@end\n", host="box")
    assert probe.blockers(bare, ampere) == [
        "no Docker Engine answers this user (install one, or add the user to the docker group)",
        "the NVIDIA Container Toolkit is not installed: containers cannot reach the GPUs"]
    for cuda, needs in (("13.0", "driver 580.65.06 or newer"), ("14.0", "a driver for CUDA 14")):
        newer = ampere.model_copy(update={"base_image": f"pytorch/pytorch:9.0.0-cuda{cuda}-cudnn9-runtime"})
        assert probe.blockers(probe.parse_probe(A100_HOST, host="a100"), newer)[0].endswith(f"which needs {needs}")
    cpu_box = probe.parse_probe("@@os\n@@gpus\n@@docker\n27.1\n@@end\n", host="box")
    assert probe.blockers(cpu_box, images.load_images().get("cpu")) == []


def test_a_probe_cut_short_is_refused():
    with pytest.raises(probe.UserError, match="cut short"):
        probe.parse_probe(A100_HOST.replace("@@end\n", ""), host="a100")


def test_this_machine_probes_with_the_same_script_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    found = probe.probe_local()
    assert found.os_name != "unknown" and found.disk_free_bytes > 0 and found.python_version
    probe.save(found)
    assert probe.read_cached("local") == found
    from runner.hosts import read_probe

    assert read_probe("local").profile == found.profile


@pytest.mark.ssh
def test_a_test_host_probes_over_ssh_with_os_disk_python_and_no_gpus(ssh_hosts, tmp_path, monkeypatch):
    from sshhosts import known_hosts_line

    from runner import ssh

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    host = ssh_hosts[1]
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True)
    known.write_text(known_hosts_line(host) + "\n")
    ep = ssh.Endpoint(name="box", hostname=host.address, port=host.port, user=host.user,
                      key_paths=(str(host.client_key_path),))
    with ssh.connect(ep) as conn:
        found = probe.probe_remote(conn, "box")
    assert found.os_name.startswith("Debian") and found.kernel.startswith("Linux")
    assert found.disk_free_bytes > 0 and found.python_version and found.python_version.startswith("3.")
    assert found.gpus == () and found.cuda_version is None and found.profile == "cpu"
