"""Adding a host to the inventory: appended in the file's own layout, checked before the file is replaced."""

from __future__ import annotations

import pytest

from runner.errors import UserError
from runner.hosts import Host, add_host, load_inventory


def test_add_host_appends_in_the_files_indentation_and_keeps_its_comments(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text("# lab machines\nhosts:\n    # under the desk\n    box:\n        profile: rtx-4090\n")
    add_host(Host(name="a100", address="10.0.0.7", user="ml", port=2222, profile="a100-80gb",
                  price_usd_per_hour=1.5), path)
    text = path.read_text()
    assert text.startswith("# lab machines\nhosts:\n    # under the desk\n    box:\n")
    assert "\n    a100:\n        address: \"10.0.0.7\"\n" in text
    added = load_inventory(path).hosts["a100"]
    assert (added.user, added.port, added.price_usd_per_hour) == ("ml", 2222, 1.5)


def test_add_host_refuses_a_name_already_taken_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n  box: {}\n")
    for name in ("box", "local"):
        with pytest.raises(UserError, match=f"{name} is already in the inventory"):
            add_host(Host(name=name) if name != "local" else Host(name="local", kind="local"), path)
    assert path.read_text() == "hosts:\n  box: {}\n"


def test_add_host_refuses_a_layout_it_cannot_append_to(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts: {box: {address: 10.0.0.1}}\n")
    with pytest.raises(UserError, match="add it by hand"):
        add_host(Host(name="gpu2"), path)
    assert path.read_text() == "hosts: {box: {address: 10.0.0.1}}\n"


def test_add_host_starts_an_inventory_in_the_config_dir_when_there_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNNER_HOSTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    path = add_host(Host(name="gpu1", profile="l4"))
    assert path == tmp_path / "config" / "runner" / "hosts.yaml"
    assert load_inventory().names == ["local", "gpu1"]
