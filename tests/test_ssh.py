"""SSH: quoting, resolving hosts from ssh_config, and real logins against sshd test hosts."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import ssh
from sshhosts import known_hosts_line

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


# --------------------------------------------------------------------------- real sshd test hosts


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """This process's view of ~/.ssh, the runner's config dir and the agent, all empty."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    # Notice a cut link within seconds, not the production 20 s.
    monkeypatch.setattr(ssh, "DEAD_LINK_S", 4.0)
    monkeypatch.setattr(ssh, "KEEPALIVE_S", 2.0)
    (tmp_path / "home").mkdir()
    return tmp_path


def endpoint(host) -> ssh.Endpoint:
    return ssh.Endpoint(name="box", hostname=host.address, port=host.port, user=host.user,
                        key_paths=(str(host.client_key_path),), identities_only=True)


def trust(host) -> None:
    path = ssh.runner_known_hosts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(known_hosts_line(host) + "\n")


def key_fingerprint(public_key_line: str) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.mark.ssh
def test_login_checks_the_real_host_key_and_runs_as_the_test_user(ssh_hosts, isolated):
    host = ssh_hosts[0]
    trust(host)
    with ssh.connect(endpoint(host)) as conn:
        result = ssh.run(conn, ["id", "-un"])
        assert (result.exit_code, result.text().strip()) == (0, host.user)
        assert ssh.home(conn) == str(host.home)


@pytest.mark.ssh
def test_an_unknown_host_key_is_refused_with_its_type_and_fingerprint(ssh_hosts, isolated):
    host = ssh_hosts[0]
    with pytest.raises(ssh.HostKeyError) as refused:
        ssh.connect(endpoint(host))
    text = refused.value.render()
    assert key_fingerprint(host.host_public_key) in text
    assert host.host_public_key.split()[0] in text
    assert "runner hosts trust box" in text


@pytest.mark.ssh
def test_trust_shows_the_key_records_it_and_then_login_succeeds(ssh_hosts, isolated):
    host = ssh_hosts[1]
    shown = []
    hk = ssh.trust_host(endpoint(host), confirm=lambda k: shown.append(k) or True)
    assert shown == [hk] and hk.status == "unknown"
    assert hk.fingerprint == key_fingerprint(host.host_public_key)
    assert f"[{host.address}]:{host.port}" in ssh.runner_known_hosts_path().read_text() or host.port == 22
    with ssh.connect(endpoint(host)) as conn:
        assert ssh.run(conn, ["true"]).ok
    assert ssh.fetch_host_key(endpoint(host)).status == "known"


@pytest.mark.ssh
def test_declining_to_trust_records_nothing(ssh_hosts, isolated):
    ssh.trust_host(endpoint(ssh_hosts[0]), confirm=lambda k: False)
    assert not ssh.runner_known_hosts_path().exists()


@pytest.mark.ssh
def test_a_changed_host_key_is_refused_as_a_possible_attack_with_both_fingerprints(ssh_hosts, isolated):
    host = ssh_hosts[1]
    trust(host)
    old = key_fingerprint(host.host_public_key)
    host.rotate_host_key()
    new = key_fingerprint(host.host_public_key)
    assert old != new
    with pytest.raises(ssh.HostKeyError) as refused:
        ssh.connect(endpoint(host))
    text = refused.value.render()
    assert "CHANGED" in text and "man-in-the-middle" in text and old in text and new in text


@pytest.mark.ssh
def test_shell_metacharacters_in_arguments_arrive_verbatim_and_nothing_runs(ssh_hosts, isolated):
    host = ssh_hosts[0]
    trust(host)
    with ssh.connect(endpoint(host)) as conn:
        result = ssh.run(conn, ["printf", "%s\\0", *NASTY])
        assert result.ok, result.stderr
        assert result.stdout.decode().split("\0")[:-1] == NASTY
        # The remote side sees each one as a single argv entry, too.
        count = ssh.run(conn, ["sh", "-c", 'echo "$#"', "sh", *NASTY])
        assert count.text().strip() == str(len(NASTY))
        listing = ssh.run(conn, ["ls", "-A", str(host.home)]).text().split()
        assert "pwned" not in listing
        assert ssh.run(conn, ["test", "-e", "pwned"]).exit_code == 1


@pytest.mark.ssh
def test_a_command_past_its_timeout_is_stopped_with_a_clear_error(ssh_hosts, isolated):
    host = ssh_hosts[0]
    trust(host)
    with ssh.connect(endpoint(host)) as conn:
        with pytest.raises(ssh.CommandTimeout):
            ssh.run(conn, ["sleep", "30"], timeout_s=1)
        assert ssh.run(conn, ["echo", "still here"]).text() == "still here\n"


@pytest.mark.ssh
def test_the_connection_comes_back_after_the_link_drops_and_returns(ssh_hosts, isolated):
    import threading

    host = ssh_hosts[0]
    trust(host)
    with ssh.connect(endpoint(host)) as conn:
        assert ssh.run(conn, ["true"]).ok
        host.link_down()
        restore = threading.Timer(6.0, host.link_up)
        restore.start()
        try:
            result = conn.retrying(lambda c: ssh.run(c, ["echo", "back"], timeout_s=10))
        finally:
            restore.join()
        assert result.text() == "back\n"


@pytest.mark.ssh
def test_the_connection_comes_back_after_sshd_restarts(ssh_hosts, isolated):
    host = ssh_hosts[1]
    trust(host)
    with ssh.connect(endpoint(host)) as conn:
        assert ssh.run(conn, ["true"]).ok
        host.restart_sshd()
        assert conn.retrying(lambda c: ssh.run(c, ["echo", "again"])).text() == "again\n"


@pytest.mark.ssh
def test_a_walk_passes_over_a_directory_removed_while_it_walks(ssh_hosts, isolated):
    # A sync lists a run directory while the trainer's keep-last removes an old checkpoint.
    host = ssh_hosts[0]
    trust(host)
    top = host.home / "walked"
    for name in ("step-1", "step-2"):
        (top / "checkpoints" / name).mkdir(parents=True)
        (top / "checkpoints" / name / "model.safetensors").write_text("weights")
    try:
        with ssh.connect(endpoint(host)) as conn:
            walk = ssh.walk(conn.sftp(), str(top))
            seen = []
            for rel, _ in walk:  # until both checkpoints are listed, before either is descended into
                seen.append(rel)
                if {"checkpoints/step-1", "checkpoints/step-2"} <= set(seen):
                    break
            shutil.rmtree(top / "checkpoints" / "step-1")
            seen += [rel for rel, _ in walk]
            with pytest.raises(FileNotFoundError):
                list(ssh.walk(conn.sftp(), str(top / "gone")))
    finally:
        shutil.rmtree(top)
    assert "checkpoints/step-2/model.safetensors" in seen
    assert "checkpoints/step-1/model.safetensors" not in seen


@pytest.mark.ssh
def test_a_host_that_stays_down_is_reported_without_a_traceback(ssh_hosts, isolated):
    host = ssh_hosts[0]
    trust(host)
    conn = ssh.Connection(endpoint(host), connect_timeout_s=1.0, reconnect_within_s=2.0)
    host.link_down()
    try:
        with pytest.raises(ssh.ConnectionLost) as lost:
            conn.transport()
    finally:
        host.link_up()
    assert "box" in lost.value.render() and "unreachable" in lost.value.render()


@pytest.mark.ssh
def test_proxyjump_reaches_the_host_through_a_channel_of_the_jump_host(ssh_hosts, isolated):
    host = ssh_hosts[0]
    trust(host)
    target = endpoint(host)
    via = dataclasses.replace(target, jump=(endpoint(host),))
    with ssh.connect(via) as conn:
        assert ssh.run(conn, ["echo", "through the jump"]).text() == "through the jump\n"


@pytest.mark.ssh
def test_an_ssh_config_alias_is_enough_to_log_in(ssh_hosts, isolated):
    host = ssh_hosts[1]
    trust(host)
    config = isolated / "home" / ".ssh" / "config"
    config.parent.mkdir()
    config.write_text(f"Host testbox\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
                      f"  IdentityFile {host.client_key_path}\n")
    with ssh.connect(ssh.resolve("testbox")) as conn:
        assert ssh.run(conn, ["whoami"]).text().strip() == host.user
