"""Sync: path safety and manifests (properties), and pulling real run directories over SSH."""

from __future__ import annotations

import hashlib
import json
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import UserError
from runner.sync import Manifest, ManifestEntry, UnsafePath, parse_manifest, safe_relpath

# --------------------------------------------------------------------------- path safety

segment = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                  min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and not s.startswith("~"))
safe_paths = st.lists(segment, min_size=1, max_size=5).map("/".join)


@given(st.text(max_size=40))
def test_safe_relpath_never_lets_a_path_leave_its_directory(path):
    try:
        clean = safe_relpath(path)
    except UnsafePath:
        return
    joined = posixpath.normpath(posixpath.join("/run", clean))
    assert joined.startswith("/run/")
    assert ".." not in clean.split("/")
    assert not clean.startswith("/")


@given(safe_paths)
def test_safe_relpath_keeps_plain_relative_paths(path):
    assert safe_relpath(path) == path


@given(st.lists(segment, max_size=3), st.lists(segment, max_size=3))
def test_safe_relpath_refuses_any_dotdot_component(before, after):
    with pytest.raises(UnsafePath):
        safe_relpath("/".join([*before, "..", *after]))


@given(safe_paths)
def test_safe_relpath_refuses_absolute_and_home_paths(path):
    for bad in ("/" + path, "~/" + path, "//" + path):
        with pytest.raises(UnsafePath):
            safe_relpath(bad)


@pytest.mark.parametrize("path", ["", ".", "./", "a\\..\\b", "a\x00b", "a\nb", "../x", "a/../../x"])
def test_safe_relpath_refuses_odd_paths(path):
    with pytest.raises(UnsafePath):
        safe_relpath(path)


# --------------------------------------------------------------------------- manifests

digests = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
entries = st.lists(st.tuples(safe_paths.filter(lambda p: p != "manifest.json"),
                             st.integers(0, 2**40), digests),
                   max_size=8, unique_by=lambda e: e[0])


@given(entries)
def test_manifest_round_trips(items):
    text = json.dumps({"step": 7, "files": [{"path": p, "size": n, "sha256": d} for p, n, d in items]})
    assert parse_manifest(text) == Manifest(tuple(ManifestEntry(p, n, d) for p, n, d in items))


@given(entries.filter(bool), st.sampled_from(["../evil", "/etc/passwd", "a/../../b", "~/x", "ok/../.."]))
def test_manifest_naming_a_path_outside_is_refused(items, bad):
    files = [{"path": p, "size": n, "sha256": d} for p, n, d in items]
    files[0]["path"] = bad
    with pytest.raises(UserError, match="refused"):
        parse_manifest(json.dumps({"files": files}), where="checkpoints/step-1/manifest.json")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=12)


@settings(max_examples=300)
@given(st.one_of(json_values, st.fixed_dictionaries({"files": st.lists(
    st.dictionaries(st.sampled_from(["path", "size", "sha256", "x"]), json_values, max_size=4), max_size=3)})))
def test_manifest_parser_accepts_or_explains_any_json(value):
    try:
        manifest = parse_manifest(json.dumps(value))
    except UserError as exc:
        assert exc.file == "manifest.json"
        return
    for entry in manifest.entries:
        assert safe_relpath(entry.path) == entry.path
        assert entry.size_bytes >= 0 and len(entry.sha256) == 64


@pytest.mark.parametrize("text", ["not json", b"\xff\xfe", "[]", '{"files": {}}',
                                  '{"files": [{"path": "a", "size": -1, "sha256": "' + "0" * 64 + '"}]}',
                                  '{"files": [{"path": "a", "size": 1, "sha256": "xyz"}]}',
                                  '{"files": [{"path": "a", "size": true, "sha256": "' + "0" * 64 + '"}]}'])
def test_malformed_manifests_are_refused_with_the_file_named(text):
    with pytest.raises(UserError) as caught:
        parse_manifest(text, where="checkpoints/step-1/manifest.json")
    assert caught.value.file == "checkpoints/step-1/manifest.json"


# --------------------------------------------------------------------------- pulling from real sshd test hosts

import os  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from runner import ssh, sync  # noqa: E402
from sshhosts import known_hosts_line  # noqa: E402


@pytest.fixture
def remote(ssh_hosts, tmp_path, monkeypatch):
    """A logged-in connection to a test host and an empty run directory in its home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setattr(ssh, "DEAD_LINK_S", 4.0)
    monkeypatch.setattr(ssh, "KEEPALIVE_S", 2.0)
    host = ssh_hosts[0]
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True)
    known.write_text(known_hosts_line(host) + "\n")
    ep = ssh.Endpoint(name="box", hostname=host.address, port=host.port, user=host.user,
                      key_paths=(str(host.client_key_path),), identities_only=True)
    with ssh.connect(ep) as conn:
        run_dir = f"{ssh.home(conn)}/runs/{tmp_path.name}"
        ssh.run(conn, ["rm", "-rf", "--", run_dir])
        ssh.makedirs(conn.sftp(), run_dir)
        yield host, conn, run_dir
        ssh.run(conn, ["rm", "-rf", "--", run_dir])


def put(conn, path: str, data: bytes) -> None:
    ssh.makedirs(conn.sftp(), path.rsplit("/", 1)[0])
    with conn.sftp().open(path, "wb") as f:
        f.write(data)


def write_checkpoint(conn, run_dir: str, step: int, files: dict[str, bytes], manifest_files=None) -> str:
    ckpt = f"{run_dir}/checkpoints/step-{step:07d}"
    for name, data in files.items():
        put(conn, f"{ckpt}/{name}", data)
    listed = manifest_files if manifest_files is not None else [
        {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]
    put(conn, f"{ckpt}/manifest.json", json.dumps({"step": step, "files": listed}).encode())
    return ckpt


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def remote_tree(conn, run_dir: str) -> dict[str, str]:
    out = ssh.run(conn, ["sh", "-c", 'cd "$1" && find . -type f -exec sha256sum {} +', "sh", run_dir]).text()
    return {line.split(None, 1)[1][2:]: line.split()[0] for line in out.splitlines()}


@pytest.mark.ssh
def test_pull_brings_every_file_home_then_nothing_then_only_the_new_checkpoint(remote, tmp_path):
    _, conn, run_dir = remote
    put(conn, f"{run_dir}/resolved.json", b'{"host": "box"}')
    put(conn, f"{run_dir}/logs/train.log", b"step 1 loss 9.1\n" * 1000)
    put(conn, f"{run_dir}/metrics.jsonl", b'{"step": 1, "loss": 9.1}\n' * 500)
    write_checkpoint(conn, run_dir, 100, {"model.safetensors": os.urandom(3 * 2**20), "optim/state.pt": os.urandom(2**20)})
    local = tmp_path / "run"

    first = sync.pull(conn, run_dir, local)
    assert first.ok and first.complete_checkpoints == ("checkpoints/step-0000100",)
    assert tree(local) == remote_tree(conn, run_dir)
    assert not list(local.rglob("*.partial"))

    second = sync.pull(conn, run_dir, local)
    assert (second.moved, second.bytes_moved) == ((), 0)

    new = os.urandom(2 * 2**20)
    write_checkpoint(conn, run_dir, 200, {"model.safetensors": new})
    third = sync.pull(conn, run_dir, local)
    assert set(third.moved) == {"checkpoints/step-0000200/model.safetensors", "checkpoints/step-0000200/manifest.json"}
    assert third.bytes_moved < len(new) + 1000
    assert tree(local) == remote_tree(conn, run_dir)


@pytest.mark.ssh
def test_a_checkpoint_without_its_manifest_waits_and_is_not_complete(remote, tmp_path):
    _, conn, run_dir = remote
    put(conn, f"{run_dir}/checkpoints/step-0000300/model.safetensors", os.urandom(1000))
    report = sync.pull(conn, run_dir, tmp_path / "run")
    assert report.pending == ("checkpoints/step-0000300/model.safetensors",)
    assert report.complete_checkpoints == () and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.ssh
def test_a_checkpoint_pruned_between_listing_and_reading_is_skipped(remote, tmp_path, monkeypatch):
    _, conn, run_dir = remote
    old = write_checkpoint(conn, run_dir, 100, {"model.safetensors": os.urandom(1000)})
    write_checkpoint(conn, run_dir, 200, {"model.safetensors": os.urandom(1000)})
    listed = sync._list_remote

    def list_then_prune(*args, **kwargs):  # the trainer's keep-last removes step 100 right after the listing
        files = listed(*args, **kwargs)
        ssh.run(conn, ["rm", "-rf", "--", old])
        return files

    monkeypatch.setattr(sync, "_list_remote", list_then_prune)
    report = sync.pull(conn, run_dir, tmp_path / "run")
    assert report.complete_checkpoints == ("checkpoints/step-0000200",)
    assert not (tmp_path / "run" / "checkpoints" / "step-0000100").exists()


@pytest.mark.ssh
def test_a_leftover_partial_file_is_resumed_from_its_size(remote, tmp_path):
    _, conn, run_dir = remote
    data = os.urandom(4 * 2**20)
    write_checkpoint(conn, run_dir, 100, {"model.safetensors": data})
    local = tmp_path / "run"
    partial = local / "checkpoints/step-0000100/.model.safetensors.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[: 3 * 2**20])
    report = sync.pull(conn, run_dir, local)
    assert report.ok and report.bytes_moved < 2**20 + 1000
    assert (local / "checkpoints/step-0000100/model.safetensors").read_bytes() == data
    assert not partial.exists()


@pytest.mark.ssh
def test_a_corrupt_partial_file_fails_the_checksum_and_is_never_put_in_place(remote, tmp_path):
    _, conn, run_dir = remote
    data = os.urandom(2**20)
    write_checkpoint(conn, run_dir, 100, {"model.safetensors": data})
    local = tmp_path / "run"
    partial = local / "checkpoints/step-0000100/.model.safetensors.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)
    first = sync.pull(conn, run_dir, local)
    assert [r.path for r in first.refused] == ["checkpoints/step-0000100/model.safetensors"]
    assert not (local / "checkpoints/step-0000100/model.safetensors").exists()
    assert not (local / "checkpoints/step-0000100/manifest.json").exists()
    second = sync.pull(conn, run_dir, local)
    assert second.ok and (local / "checkpoints/step-0000100/model.safetensors").read_bytes() == data


@pytest.mark.ssh
def test_transfers_cut_by_a_dropped_link_resume_and_complete(remote, tmp_path):
    host, conn, run_dir = remote
    data = os.urandom(48 * 2**20)
    others = {"optimizer.pt": os.urandom(12 * 2**20), "rng.pt": os.urandom(4 * 2**20)}  # streamed beside it
    write_checkpoint(conn, run_dir, 100, {"model.safetensors": data, **others})
    local = tmp_path / "run"
    partial = local / "checkpoints/step-0000100/.model.safetensors.partial"

    def cut_when_started() -> None:
        while not (partial.exists() and partial.stat().st_size > 0):
            threading.Event().wait(0.01)
        host.link_down()
        threading.Event().wait(8)  # longer than a dead link is tolerated: the connection must be rebuilt
        host.link_up()

    reconnects = []
    reconnect = conn.reconnect

    def counted() -> None:
        reconnects.append(1)
        reconnect()

    conn.reconnect = counted
    cutter = threading.Thread(target=cut_when_started)
    cutter.start()
    report = sync.pull(conn, run_dir, local)
    cutter.join()
    assert report.ok and reconnects
    assert tree(local) == remote_tree(conn, run_dir)
    assert not list(local.rglob("*.partial"))


@pytest.mark.ssh
def test_a_growing_log_is_fetched_by_byte_offset_with_nothing_lost_or_repeated(remote, tmp_path):
    _, conn, run_dir = remote
    log = f"{run_dir}/logs/train.log"
    local = tmp_path / "run"
    lines = [f"step {i} loss {10 - i / 100:.3f}\n".encode() for i in range(300)]
    put(conn, log, b"".join(lines[:100]))
    sync.pull(conn, run_dir, local)
    with conn.sftp().open(log, "ab") as f:
        f.write(b"".join(lines[100:250]) + b"step 250 lo")  # the writer is mid-line
    report = sync.pull(conn, run_dir, local)
    assert report.bytes_moved == len(b"".join(lines[100:250]) + b"step 250 lo")
    with conn.sftp().open(log, "ab") as f:
        f.write(b"".join(lines[250:])[len(b"step 250 lo"):])
    sync.pull(conn, run_dir, local)
    assert (local / "logs/train.log").read_bytes() == b"".join(lines)


@pytest.mark.ssh
def test_a_log_rewritten_from_scratch_is_fetched_whole(remote, tmp_path):
    _, conn, run_dir = remote
    local = tmp_path / "run"
    put(conn, f"{run_dir}/metrics.jsonl", b'{"step": 1}\n' * 10)
    sync.pull(conn, run_dir, local)
    put(conn, f"{run_dir}/metrics.jsonl", b'{"step": 9}\n' * 20)
    sync.pull(conn, run_dir, local)
    assert (local / "metrics.jsonl").read_bytes() == b'{"step": 9}\n' * 20


@pytest.mark.ssh
def test_a_log_rewritten_to_the_same_size_is_fetched_again(remote, tmp_path):
    _, conn, run_dir = remote
    local = tmp_path / "run"
    put(conn, f"{run_dir}/logs/train.log", b"a" * 10_000)
    sync.pull(conn, run_dir, local)
    put(conn, f"{run_dir}/logs/train.log", b"b" * 10_000)
    later = conn.sftp().stat(f"{run_dir}/logs/train.log").st_mtime + 10  # a new mtime, as a later write has
    conn.sftp().utime(f"{run_dir}/logs/train.log", (later, later))
    report = sync.pull(conn, run_dir, local)
    assert report.moved == ("logs/train.log",)
    assert (local / "logs/train.log").read_bytes() == b"b" * 10_000


@pytest.mark.ssh
def test_escaping_manifest_paths_and_remote_symlinks_are_refused_and_nothing_outside_is_touched(remote, tmp_path):
    _, conn, run_dir = remote
    sftp = conn.sftp()
    sha = hashlib.sha256(b"x").hexdigest()
    write_checkpoint(conn, run_dir, 1, {}, [{"path": "../../../../escaped.txt", "size": 1, "sha256": sha}])
    write_checkpoint(conn, run_dir, 2, {}, [{"path": "/tmp/escaped.txt", "size": 1, "sha256": sha}])
    ckpt3 = write_checkpoint(conn, run_dir, 3, {}, [{"path": "model.bin", "size": 1, "sha256": sha}])
    sftp.symlink("/etc/passwd", f"{ckpt3}/model.bin")
    ckpt4 = write_checkpoint(conn, run_dir, 4, {}, [{"path": "inner/model.bin", "size": 1, "sha256": sha}])
    sftp.symlink("/etc", f"{ckpt4}/inner")
    sftp.symlink("/", f"{run_dir}/root")
    sftp.symlink("../../..", f"{run_dir}/logs-up")
    put(conn, f"{run_dir}/ok.log", b"fine\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    local = outside / "run"
    before = tree(outside)

    report = sync.pull(conn, run_dir, local)

    refused = {r.path: r.reason for r in report.refused}
    assert "checkpoints/step-0000001/manifest.json" in refused and ".." in refused["checkpoints/step-0000001/manifest.json"]
    assert "absolute" in refused["checkpoints/step-0000002/manifest.json"]
    assert "symlink" in refused["checkpoints/step-0000003/model.bin"]
    assert "checkpoints/step-0000004/inner" in refused and "checkpoints/step-0000004/inner/model.bin" in refused
    assert "symlink" in refused["root"] and "symlink" in refused["logs-up"]
    assert report.complete_checkpoints == ()
    after = tree(outside)
    assert {k: v for k, v in after.items() if not k.startswith("run/")} == before
    assert set(after) - set(before) == {"run/ok.log"}


@pytest.mark.ssh
def test_a_local_symlink_in_the_run_directory_is_not_followed(remote, tmp_path):
    _, conn, run_dir = remote
    put(conn, f"{run_dir}/logs/train.log", b"hello\n")
    local = tmp_path / "run"
    local.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (local / "logs").symlink_to(elsewhere)
    report = sync.pull(conn, run_dir, local)
    assert [r.path for r in report.refused] == ["logs/train.log"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.ssh
def test_a_data_file_is_sent_to_the_content_addressed_cache_once(remote, tmp_path):
    _, conn, _ = remote
    data = tmp_path / "train; rm -rf ~.jsonl"
    data.write_bytes(os.urandom(300_000))
    first = sync.push_data(conn, data)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert first.sent and first.remote_path == f"{ssh.home(conn)}/.cache/runner/data/{digest}/{data.name}"
    check = ssh.run(conn, ["sha256sum", "--", first.remote_path]).text()
    assert check.split()[0] == digest
    assert not sync.push_data(conn, data).sent
