"""SSH: quoting, resolving hosts from ssh_config, and real logins against sshd test hosts."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import ssh

# --------------------------------------------------------------------------- quoting

NASTY = ["; rm -rf ~", "$(touch pwned)", "`touch pwned`", "it's", 'say "hi"', "a\nb", "  spaced  out ",
         "*", "~", "$HOME", "&& echo x", "|", ">", "", "-n", "\\", "!", "#comment"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")), max_size=6))
def test_remote_cmd_arguments_reach_a_posix_shell_verbatim(args):
    out = subprocess.run(["sh", "-c", ssh.remote_cmd(["printf", "%s\\0", "start", *args])], capture_output=True,
                         check=True).stdout
    assert out.decode("utf-8", "surrogateescape").split("\0")[1:-1] == args


def test_remote_cmd_refuses_nul_bytes_and_non_strings():
    with pytest.raises(ValueError):
        ssh.remote_cmd(["echo", "a\0b"])
    with pytest.raises(TypeError):
        ssh.remote_cmd(["echo", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ssh.remote_cmd([])


# --------------------------------------------------------------------------- resolving


def test_an_alias_resolves_through_ssh_config_with_a_proxyjump_chain(tmp_path):
    config = tmp_path / "config"
    config.write_text(
        "Host gpu\n  HostName 10.0.0.5\n  User ubuntu\n  Port 2222\n  IdentityFile ~/.ssh/gpu_key\n"
        "  ProxyJump bastion,ops@inner:2200\n"
        "Host bastion\n  HostName bastion.example.net\n  User jump\n"
        "Host *\n  IdentitiesOnly yes\n")
    ep = ssh.resolve("gpu", config_path=config)
    assert (ep.hostname, ep.port, ep.user, ep.identities_only) == ("10.0.0.5", 2222, "ubuntu", True)
    assert ep.key_paths[0].endswith("/.ssh/gpu_key") and not ep.key_paths[0].startswith("~")
    assert [(j.hostname, j.user, j.port) for j in ep.jump] == [("bastion.example.net", "jump", 22),
                                                               ("inner", "ops", 2200)]
    assert ep.known_hosts_name == "[10.0.0.5]:2222"


def test_inventory_fields_win_over_ssh_config_but_a_default_port_does_not(tmp_path):
    from runner.hosts import Host

    config = tmp_path / "config"
    config.write_text("Host box\n  HostName 10.0.0.9\n  User alice\n  Port 2022\n")
    ep = ssh.endpoint_for(Host(name="box4090", address="box", user="bob", key="/keys/k"), config_path=config)
    assert (ep.name, ep.hostname, ep.user, ep.port, ep.key_paths) == ("box4090", "10.0.0.9", "bob", 2022, ("/keys/k",))
    ep = ssh.endpoint_for(Host(name="box4090", address="box", port=22), config_path=config)
    assert ep.port == 22 and ep.known_hosts_name == "10.0.0.9"


def test_a_plain_address_needs_no_ssh_config(tmp_path):
    ep = ssh.resolve("203.0.113.7", user="root", config_path=tmp_path / "missing")
    assert (ep.hostname, ep.port, ep.user, ep.jump) == ("203.0.113.7", 22, "root", ())
