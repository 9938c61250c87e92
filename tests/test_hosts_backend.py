"""An SSH host's backend: docker by default, or native with the interpreter that runs the trainer there."""

from __future__ import annotations

import pytest

from runner.errors import UserErrors
from runner.hosts import inventory_from_doc
from runner.yamldoc import load_text


def inventory(text: str):
    return inventory_from_doc(load_text(text, "hosts.yaml"))


def test_an_ssh_host_runs_in_docker_unless_it_says_native_with_its_python():
    hosts = inventory("hosts:\n  gpu: {address: g}\n  box: {backend: native, python: /opt/venv/bin/python}\n").hosts
    assert (hosts["gpu"].backend, hosts["gpu"].python) == ("docker", None)
    assert (hosts["box"].backend, hosts["box"].python) == ("native", "/opt/venv/bin/python")


@pytest.mark.parametrize("text, message", [
    ("hosts:\n  box: {backend: native, python: ~/venv/bin/python}\n",
     "hosts.yaml:2:34: hosts.box.python: '~/venv/bin/python': give an absolute path, or a command name"),
    ("hosts:\n  box: {python: /usr/bin/python3}\n", "hosts.box.kind: python: is the interpreter of a host with "
                                                    "backend: native"),
    ("hosts:\n  local: {backend: native}\n", "hosts.local.kind: backend and python are for ssh hosts"),
])
def test_the_inventory_refuses_a_python_that_cannot_run_as_written_naming_the_field(text, message):
    with pytest.raises(UserErrors) as caught:
        inventory(text)
    assert message in caught.value.errors[0].render()
