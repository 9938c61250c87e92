"""Runs on SSH hosts end to end: real sshd test hosts, the real Docker Engine behind them, the CLI as a user drives it.

The test hosts share this machine's filesystem and Docker Engine, so a remote
run directory (the test user's ``~/.runner/runs/ID``) is bind-mounted by the
same engine that runs local containers; the link and sshd between here and the
host are real, and are cut and restarted under running jobs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import docker.errors
import pytest

from conftest import OFFLINE_IMAGE_ENV, TEST_SESSION
from runner import dispatch, images, probe, ssh, sync
from runner.backends.ssh import SSHBackend, build_on_host, ensure_remote_image, remote_has_image, send_image
from runner.cli import main
from runner.errors import EXIT_REFUSED, UserError
from runner.store import Store
from sshhosts import known_hosts_line

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
# The tiny model on small steps (256 tokens), logging every step and checkpointing every 5. LONG trains
# until it is cancelled, SHORT for 60 steps, TINY for 5.
EVERY_STEP = ["--set", "train.batch_size=4", "--set", "data.seq_len=64", "--set", "train.log_every_steps=1",
              "--set", "checkpoint.every_steps=5", "--set", "checkpoint.keep_last=3", "--set", "eval.on_start=false",
              "--set", "eval.every_steps=1000", "--set", "eval.max_batches=1"]
LONG = ["--set", "budget.tokens=5M", *EVERY_STEP]
SHORT = ["--set", "budget.tokens=15360", *EVERY_STEP]
TINY = ["--set", "budget.tokens=1280", *EVERY_STEP]


@pytest.fixture
def hosts(tmp_home, ssh_hosts, monkeypatch):
    """Both test hosts in a fresh hosts.yaml and trusted; quick syncs; images built offline."""
    inventory = tmp_home / "hosts.yaml"
    lines = ["hosts:"]
    for host in ssh_hosts:
        lines += [f"  {host.name}:", f"    address: {host.address}", f"    user: {host.user}",
                  f"    key: {host.client_key_path}", "    profile: cpu"]
    inventory.write_text("\n".join(lines) + "\n")
    trust_all(ssh_hosts)
    for name, value in {"RUNNER_HOSTS": str(inventory), "RUNNER_SYNC_EVERY_S": "2", **OFFLINE_IMAGE_ENV}.items():
        monkeypatch.setenv(name, value)
    forget_connections()
    yield {h.name: h for h in ssh_hosts}
    forget_connections()


@pytest.fixture
def remote(hosts, trainer_image, docker_engine):
    """The test hosts, with the trainer image of this tree in the engine they share.

    A failed test's runs are stopped at once rather than at the end of the session.
    """
    yield hosts
    store = Store.open()
    for run in store.runs(states={"starting", "running", "stopping"}):
        for container in docker_engine.containers.list(all=True, filters={"label": f"runner.run_id={run.id}"}):
            container.remove(force=True)
    store.close()


def trust_all(hosts) -> None:
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text("".join(known_hosts_line(h) + "\n" for h in hosts))


def forget_connections() -> None:
    """What a restarted runner knows: nothing but the store and the inventory."""
    backend = dispatch._BACKENDS.pop("ssh", None)
    if backend is not None:
        backend.close()


@pytest.fixture
def store(tmp_home):
    opened = Store.open()
    yield opened
    opened.close()


def remote_dir(host, run_id: str) -> Path:
    return host.home / ".runner" / "runs" / run_id


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_checkpoints_home(local: Path, remote: Path) -> None:
    """Every checkpoint the host still has is home, each file matching its manifest's sha256."""
    remote_ckpts = {p.parent.name for p in remote.glob("checkpoints/step-*/manifest.json")}
    local_ckpts = {p.parent.name for p in local.glob("checkpoints/step-*/manifest.json")}
    assert remote_ckpts and remote_ckpts <= local_ckpts
    for name in local_ckpts:
        for entry in sync.parse_manifest((local / "checkpoints" / name / "manifest.json").read_bytes()).entries:
            assert sha256(local / "checkpoints" / name / entry.path) == entry.sha256, (name, entry.path)


def assert_same_files(local: Path, remote: Path, *names: str) -> None:
    for name in names:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name


def run_ids(out: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("run ")]


def container_states(docker_engine, run_id: str) -> list[str]:
    return [c.status for c in docker_engine.containers.list(all=True, filters={"label": f"runner.run_id={run_id}"})]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting for {what}"
        time.sleep(0.5)


def train_events(run_dir: Path) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if e.get("event") == "train"]


class Follower(threading.Thread):
    """A runner process following one run (``runner logs -f``): its own store, the log into a buffer."""

    def __init__(self, store_path: Path, run_id: str):
        super().__init__(daemon=True)
        self.store_path, self.run_id, self.out, self.error = store_path, run_id, io.BytesIO(), None

    def run(self) -> None:
        store = Store.open(self.store_path)
        try:
            dispatch.wait(store, self.run_id, out=self.out, poll_s=0.5)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            store.close()


@pytest.mark.ssh
@pytest.mark.docker
def test_two_hosts_at_once_keep_training_through_a_cut_link_and_a_restarted_sshd_and_every_line_comes_home(
        remote, store, docker_engine, capsys):
    host1, host2 = remote["host1"], remote["host2"]
    assert main(["run", str(QUICKSTART), str(QUICKSTART), "--hosts", "host1,host2", "--detach", *LONG]) == 0
    ids = run_ids(capsys.readouterr().out)
    by_host = {store.get(i).host: i for i in ids}
    assert len(ids) == 2 and set(by_host) == {"host1", "host2"}
    assert all((store.get(i).backend, store.get(i).state) == ("ssh", "running") for i in ids)
    forget_connections()  # the launching runner is gone; a new one follows the runs by their ids
    followers = {host: Follower(store.path, run_id) for host, run_id in by_host.items()}
    for follower in followers.values():
        follower.start()

    run1, local1 = by_host["host1"], Path(store.get(by_host["host1"]).run_dir)
    home = lambda: {p.parent.name for p in local1.glob("checkpoints/step-*/manifest.json")}  # noqa: E731
    wait_for(home, 300, "a first checkpoint of host1 at home")
    host2.restart_sshd()
    host1.link_down()
    try:
        before = home()
        far_log = remote_dir(host1, run1) / "logs" / "train.log"
        grew_from = far_log.stat().st_size
        time.sleep(25)  # longer than the socket's dead-link timeout: the follower must reconnect
        assert container_states(docker_engine, run1) == ["running"]  # the job trains on over there
        assert far_log.stat().st_size > grew_from
    finally:
        host1.link_up()
    wait_for(lambda: home() - before, 180, "host1's checkpoints of the cut to come home")
    for run_id in ids:
        assert main(["cancel", run_id, "--grace", "60"]) == 0  # the trainer checkpoints, then exits
    assert "cancelled" in capsys.readouterr().out
    for follower in followers.values():
        follower.join(120)
        assert not follower.is_alive() and follower.error is None, follower.error

    for host, run_id in by_host.items():
        run = store.get(run_id)
        assert run.state == "cancelled" and "cancelled by the user" in run.reason, run.reason
        local, far = Path(run.run_dir), remote_dir(remote[host], run_id)
        # Every log line exactly once: what the follower printed is the remote log, byte for byte.
        assert followers[host].out.getvalue() == (far / "logs" / "train.log").read_bytes()
        assert_same_files(local, far, "logs/train.log", "metrics.jsonl", "summary.json")
        assert_checkpoints_home(local, far)
        summary = json.loads((local / "summary.json").read_text())
        assert summary["exit_reason"] == "cancelled" and summary["checkpoint"].endswith(f"step-{summary['steps']:07d}")
        assert container_states(docker_engine, run_id) == []  # released once its end was recorded
    assert main(["runs", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert {listed[i]["host"] for i in ids} == {"host1", "host2"}


@pytest.mark.ssh
@pytest.mark.docker
def test_a_killed_container_is_lost_then_resumes_on_the_other_host_from_its_newest_checkpoint(
        remote, store, docker_engine, capsys):
    assert main(["run", str(QUICKSTART), "--host", "host1", "--detach", *SHORT]) == 0
    (run_id,) = run_ids(capsys.readouterr().out)
    local = Path(store.get(run_id).run_dir)
    far1 = remote_dir(remote["host1"], run_id)
    # Two checkpoints of 12: far from the end, however fast the machine.
    wait_for(lambda: len(list(far1.glob("checkpoints/step-*/manifest.json"))) >= 2, 300, "two checkpoints on host1")
    for container in docker_engine.containers.list(filters={"label": f"runner.run_id={run_id}"}):
        container.remove(force=True)  # the provider takes the machine back
    run = dispatch.wait(store, run_id)
    assert run.state == "lost" and "vanished from host1" in run.reason, run.reason
    newest = max(p.parent.name for p in local.glob("checkpoints/step-*/manifest.json"))
    assert newest == max(p.parent.name for p in far1.glob("checkpoints/step-*/manifest.json"))
    resumed_from = int(newest.split("-")[1])
    first_attempt = train_events(local)
    blocker = store.create(job_file=str(QUICKSTART), experiment="blocker", resolved_json=run.resolved_json,
                           host="host2", profile="cpu", backend="ssh")
    assert main(["resume", run_id, "--host", "host2"]) == EXIT_REFUSED  # host2's one slot is taken
    assert "runs active on host2 hold 1 of its 1 slots; this run needs 1" in capsys.readouterr().err
    assert not remote_dir(remote["host2"], run_id).exists() and store.get(run_id).state == "lost"  # nothing moved
    store.transition(blocker.id, "cancelled", "its slot is free again")

    assert main(["resume", run_id, "--host", "host2"]) == 0  # follows it to the end
    run = store.get(run_id)
    assert (run.state, run.host, run.attempt) == ("succeeded", "host2", 2), run.reason
    far2 = remote_dir(remote["host2"], run_id)
    assert_same_files(local, far2, "logs/train.log", "metrics.jsonl", "summary.json")
    assert_checkpoints_home(local, far2)
    assert f"--- attempt 2: continues from {newest} on host2 (moved from host1)" in (local / "logs/train.log").read_text()
    assert json.loads((local / "summary.json").read_text())["resumed_from_step"] == resumed_from
    second_attempt = train_events(local)[len(first_attempt):]
    assert [e["step"] for e in second_attempt] == list(range(resumed_from + 1, run.steps + 1))
    # The loss goes on from the checkpoint's, not from an untrained model's.
    start = first_attempt[0]["loss"]
    at_checkpoint = next(e["loss"] for e in first_attempt if e["step"] == resumed_from)
    resumed = sum(e["loss"] for e in second_attempt[:3]) / 3
    assert resumed < start - 0.5 * (start - at_checkpoint), (start, at_checkpoint, resumed)

@pytest.mark.ssh
@pytest.mark.docker
def test_shell_metacharacters_in_a_job_name_and_a_data_path_stay_quoted_and_nothing_outside_the_run_is_touched(
        remote, store, tmp_path, capsys):
    nasty = "a b;$(touch pwned)'x`touch pwned2`.jsonl"
    jobs = tmp_path / "jobs $(touch pwned3)"
    jobs.mkdir()
    (jobs / nasty).write_bytes((ROOT / "data" / "sample" / "news.jsonl").read_bytes())
    text = QUICKSTART.read_text().replace("path: ../data/sample/news.jsonl", f"path: {json.dumps(nasty)}")
    text = text.replace("path: ../data/sample/filings.txt", f"path: {ROOT / 'data' / 'sample' / 'filings.txt'}")
    job = jobs / "nasty.yaml"
    host = remote["host1"]
    before = set(host.home.rglob("*"))
    # A job name is a word: metacharacters there are refused before anything reaches a host.
    job.write_text(text.replace("name: quickstart", "name: \"q;$(touch pwned4)'`id`\""))
    assert main(["run", str(job), "--host", "host1", *TINY]) == 2
    assert f"{job}:5:7: name:" in capsys.readouterr().err
    assert set(host.home.rglob("*")) == before
    # A data path is anything the filesystem allows: it travels quoted.
    job.write_text(text)
    assert main(["run", str(job), "--host", "host1", *TINY]) == 0, capsys.readouterr().err
    (run_id,) = run_ids(capsys.readouterr().out)
    run = store.get(run_id)
    assert run.state == "succeeded", run.reason
    for where in (host.home, tmp_path, Path.cwd(), Path("/")):
        assert not list(where.rglob("pwned*")) if where != Path("/") else not list(where.glob("pwned*"))
    created = {p.relative_to(host.home).as_posix() for p in set(host.home.rglob("*")) - before}
    parents = {".runner", ".runner/runs", ".runner/env", ".cache", ".cache/runner", ".cache/runner/data"}
    inside = (".runner/runs/", ".runner/env/", ".cache/runner/data/")
    assert all(p in parents or p.startswith(inside) for p in created), sorted(created)
    assert not list((host.home / ".runner" / "env").iterdir())  # the environment file lived only for `docker run`
    resolved = json.loads((Path(run.run_dir) / "resolved.json").read_text())
    assert resolved["experiment"]["data"]["sources"][0]["path"].endswith("/" + nasty)
    digest = hashlib.sha256((jobs / nasty).read_bytes()).hexdigest()
    assert (host.home / ".cache" / "runner" / "data" / digest / nasty).is_file()

    # A remote run directory that names paths outside itself, or links out, is refused on the way home.
    far = remote_dir(host, run_id)
    ckpt = max(far.glob("checkpoints/step-*"))
    (ckpt / "manifest.json").write_text(json.dumps({"files": [{"path": "../../../../escape", "size": 1,
                                                               "sha256": "0" * 64}]}))
    (far / "logs" / "link.log").symlink_to("/etc/passwd")
    assert main(["sync", run_id]) == 3
    err = capsys.readouterr().err
    assert "escape" in err and "logs/link.log" in err and "symlink" in err
    assert not (Path(run.run_dir) / "logs" / "link.log").exists()
    assert not list(Path(run.run_dir).parent.parent.rglob("escape"))


@pytest.mark.ssh
def test_an_unknown_or_changed_host_key_is_refused_with_its_fingerprint_until_trust_records_it(
        hosts, monkeypatch, capsys):
    host = hosts["host2"]
    host.rotate_host_key()
    new_fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(
        base64.b64decode(host.host_public_key.split()[1])).digest()).decode().rstrip("=")
    try:
        assert main(["hosts", "probe", "host2"]) != 0
        err = capsys.readouterr().err
        assert "HOST KEY CHANGED" in err and new_fingerprint in err
        monkeypatch.setattr("builtins.input", lambda prompt: "n")
        assert main(["hosts", "trust", "host2"]) == 3
        assert new_fingerprint in capsys.readouterr().out
        assert main(["hosts", "probe", "host2"]) != 0  # still refused: nothing was recorded
        capsys.readouterr()
        monkeypatch.setattr("builtins.input", lambda prompt: "yes")
        assert main(["hosts", "trust", "host2"]) == 0
        assert new_fingerprint in capsys.readouterr().out
        assert main(["hosts", "probe", "host2"]) == 0
        out = capsys.readouterr().out
        assert "docker: " in out and "no engine" not in out and "plans as profile cpu" in out
        assert "image cpu (python:3.11-slim-bookworm): runs here" in out
        assert main(["hosts", "probe", "host2", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert (found["gpus"], found["image"], found["blockers"]) == ([], "cpu", [])
    finally:
        trust_all(hosts.values())


@pytest.mark.ssh
@pytest.mark.docker
def test_an_image_missing_on_the_host_is_streamed_over_ssh_into_docker_load(remote, docker_engine, trainer_image):
    repository, version = "runner-sendtest", TEST_SESSION
    tag = f"{repository}:{version}"
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        archive.addfile(info, io.BytesIO(b"hello\n"))
    docker_engine.api.import_image_from_data(layer.getvalue(), repository=repository, tag=version)
    saved = list(docker_engine.images.get(tag).save(named=True))
    docker_engine.images.remove(tag, force=True)
    host = remote["host1"]
    conn = dispatch.remote_backend().connection(host.name)
    try:
        assert not remote_has_image(conn, tag)
        sent = send_image(conn, tag, iter(saved))
        assert 0 < sent < sum(map(len, saved))  # gzipped on the way
        assert remote_has_image(conn, tag)
        assert docker_engine.images.get(tag).attrs["RepoTags"] == [tag]
    finally:
        docker_engine.images.remove(tag, force=True)
    # The trainer image is there already (the engine is shared): nothing moves.
    ref = replace(images.image_for(images.load_images().get("cpu")), tag=trainer_image)
    assert ensure_remote_image(conn, ref, print) == "present"


@pytest.mark.ssh
@pytest.mark.docker
def test_an_image_can_be_built_on_the_host_from_a_build_context_sent_over_ssh(hosts, docker_engine, tmp_path):
    context = tmp_path / "a context; $(touch pwned)"
    (context / "runner").mkdir(parents=True)
    (context / "runner" / "__init__.py").write_text("VERSION = 'sent'\n")
    (context / "runner" / "__pycache__").mkdir()
    (context / "runner" / "__pycache__" / "stale.pyc").write_bytes(b"not sent")
    (context / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (context / "README.md").write_text("x\n")
    (context / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY runner /opt/runner\n"
                                        "RUN test ! -e /opt/runner/__pycache__ && grep -q sent /opt/runner/__init__.py\n")
    tag = f"runner-buildtest:{TEST_SESSION}"
    ref = images.ImageRef("cpu", {"BASE_IMAGE": "runner-base:bookworm"}, tag, context)
    conn = dispatch.remote_backend().connection("host1")
    try:
        build_on_host(conn, ref, print)
        assert remote_has_image(conn, tag)
        assert docker_engine.images.get(tag).labels["runner.image-family"] == "cpu"
        assert not list((hosts["host1"].home / ".runner" / "build").iterdir())  # the context is cleaned up
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_engine.images.remove(tag, force=True)
    assert not list(tmp_path.rglob("pwned")) and not list(hosts["host1"].home.rglob("pwned"))


@pytest.mark.ssh
def test_a_host_that_stays_unreachable_past_the_grace_loses_its_runs_and_cancel_gives_up_on_it(hosts, store, capsys):
    (prep,) = dispatch.prepare(QUICKSTART, host="host2")
    runs = []
    for _ in range(2):
        run = store.create(job_file=str(QUICKSTART), experiment="quickstart", host="host2", profile="cpu",
                           backend="ssh", resolved_json=prep.resolved.model_dump_json())
        store.transition(run.id, "starting", "launching")
        runs.append(store.transition(run.id, "running", "started", handle="host2/0123456789ab"))
    backend = dispatch.remote_backend()
    backend.unreachable_grace_s, backend.reconnect_within_s = 3.0, 1.0
    backend.close()  # an open connection would outlive sshd
    hosts["host2"].stop_sshd()
    try:
        run = dispatch.wait(store, runs[0].id, poll_s=0.2)
        assert run.state == "lost" and "host host2 unreachable for" in run.reason and "grace of 3s" in run.reason
        forget_connections()  # a runner that has not seen the host go: the run still counts as running
        dispatch.remote_backend().reconnect_within_s = 1.0
        assert main(["cancel", runs[1].id, "--grace", "5"]) == 0
        run = store.get(runs[1].id)
        assert run.state == "lost" and run.reason.startswith("cancelled by the user, but host2 unreachable")
    finally:
        hosts["host2"].start_sshd()


def test_runs_spread_over_hosts_one_per_free_slot_and_refuse_before_starting_when_none_is_left(tmp_home,
                                                                                             monkeypatch):
    inventory = tmp_home / "hosts.yaml"
    inventory.write_text("hosts:\n  a: {address: 192.0.2.1, profile: cpu}\n  b: {address: 192.0.2.2, profile: cpu}\n")
    monkeypatch.setenv("RUNNER_HOSTS", str(inventory))
    store = Store.open()
    placed = dispatch.spread(store, [QUICKSTART, QUICKSTART], ["a", "b"])
    assert [p.host.name for p in placed] == ["a", "b"] and {p.backend for p in placed} == {"ssh"}
    with pytest.raises(UserError, match=r"no free host for quickstart: a \(0 free\), b \(0 free\)"):
        dispatch.spread(store, [QUICKSTART] * 3, ["a", "b"])
    busy = store.create(job_file=str(QUICKSTART), experiment="quickstart", host="a", profile="cpu", backend="ssh",
                        resolved_json=placed[0].resolved.model_dump_json())
    assert [p.host.name for p in dispatch.spread(store, [QUICKSTART], ["a", "b"])] == ["b"]
    store.transition(busy.id, "cancelled", "done")
    assert [p.host.name for p in dispatch.spread(store, [QUICKSTART], ["a", "b"])] == ["a"]
    assert store.runs() == [store.get(busy.id)]  # placing starts nothing


# Two H100s and an RTX 4090 (addresses that never answer: nothing here reaches them).
MOVE_HOSTS = """hosts:
  h100-a: {address: 192.0.2.1, profile: h100-80gb, price_usd_per_hour: 2.49}
  h100-b: {address: 192.0.2.2, profile: h100-80gb, price_usd_per_hour: 2.29}
  rtx4090: {address: 192.0.2.3, profile: rtx-4090, price_usd_per_hour: 0.35}
"""
# batch_size auto picks micro-batch 40 on an H100: about 43.5 GiB.
GPT2_MEDIUM = """name: medium
model: gpt2-355m
data: {sources: [{path: %s}], seq_len: 1024}
train: {batch_size: auto, tokens_per_step: 40960}
budget: {tokens: 100M}
""" % (ROOT / "data" / "sample" / "news.jsonl")


@pytest.fixture
def lost_on_h100(tmp_home, monkeypatch):
    """A run started on h100-a and lost there; the SSH steps of a resume are recorded, not done.

    Yields the store, the run and the list of steps (pull, prepare_resume, launch with their hosts).
    """
    (tmp_home / "hosts.yaml").write_text(MOVE_HOSTS)
    (tmp_home / "medium.yaml").write_text(GPT2_MEDIUM)
    monkeypatch.setenv("RUNNER_HOSTS", str(tmp_home / "hosts.yaml"))
    steps: list[tuple[str, str]] = []
    monkeypatch.setattr(SSHBackend, "pull", lambda self, host, run_id, local_dir: steps.append(("pull", host)))
    monkeypatch.setattr(SSHBackend, "release", lambda self, handle: None)
    monkeypatch.setattr(SSHBackend, "connection", lambda self, host: None)
    monkeypatch.setattr("runner.backends.ssh.remote_has_image", lambda connection, tag: False)
    monkeypatch.setattr(SSHBackend, "prepare_resume",
                        lambda self, host, *args, **kwargs: steps.append(("prepare_resume", host)))
    monkeypatch.setattr(SSHBackend, "launch", lambda self, spec: steps.append(("launch", spec.resolved.host))
                        or f"{spec.resolved.host}/c0ffee")
    forget_connections()
    store = Store.open()
    (prep,) = dispatch.prepare(tmp_home / "medium.yaml", host="h100-a")
    run = dispatch.launch(store, prep, say=lambda _: None)
    run = store.transition(run.id, "lost", "the container vanished from h100-a")
    steps.clear()
    yield store, run, steps
    store.close()
    forget_connections()


def test_a_run_that_needs_43gib_is_not_moved_to_a_24gb_host_and_is_told_where_it_fits(lost_on_h100, capsys):
    store, run, steps = lost_on_h100
    history = store.transitions(run.id)
    assert main(["resume", run.id, "--host", "rtx4090"]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert (f"run {run.id} was resolved for h100-80gb on h100-a (micro-batch 40 x 1 accumulation, bf16, kept on "
            "resume); refused on rtx4090 (rtx-4090): needs 43.5 GiB but rtx4090 has 23.0 GiB usable") in err
    assert f"fix: resume it on h100-b (h100-80gb), where it fits: runner resume {run.id} --host h100-b" in err
    assert "fix: start a new run there instead; batch_size auto picks a micro-batch that fits rtx4090" in err
    assert "or resume it there anyway with --force" in err and "Traceback" not in err
    # Refused before anything was pulled, copied or started: the run is as it was.
    assert steps == [] and store.transitions(run.id) == history and store.get(run.id) == run


def test_the_same_run_moves_to_another_80gb_host(lost_on_h100):
    store, run, steps = lost_on_h100
    moved = dispatch.resume(store, run.id, host="h100-b", say=lambda _: None)
    assert (moved.state, moved.host, moved.attempt) == ("running", "h100-b", 2)
    assert steps == [("pull", "h100-a"), ("prepare_resume", "h100-b"), ("launch", "h100-b")]


def test_force_moves_it_to_the_24gb_host_anyway_and_says_so(lost_on_h100, capsys):
    store, run, steps = lost_on_h100
    assert main(["resume", run.id, "--host", "rtx4090", "--force", "--detach"]) == 0
    assert "needs 43.5 GiB but rtx4090 has 23.0 GiB usable: 20.5 GiB short; resuming it there anyway (--force)" \
        in capsys.readouterr().err
    assert (store.get(run.id).host, steps[-1]) == ("rtx4090", ("launch", "rtx4090"))


def test_a_move_to_a_host_whose_gpu_another_run_holds_is_refused_until_it_ends(lost_on_h100):
    store, run, steps = lost_on_h100
    other = store.create(job_file=run.job_file, experiment="other", resolved_json=run.resolved_json, host="h100-b",
                         profile="h100-80gb", backend="ssh")
    with pytest.raises(UserError) as refused:
        dispatch.resume(store, run.id, host="h100-b")
    assert refused.value.exit_code == EXIT_REFUSED and steps == []
    assert refused.value.message.endswith("runs active on h100-b hold 1 of its 1 GPUs; this run needs 1")
    assert "start a new run" not in refused.value.hint  # h100-b is right for it, once free
    store.transition(other.id, "cancelled", "done")
    assert dispatch.resume(store, run.id, host="h100-b", say=lambda _: None).host == "h100-b"


# h100-b's last probe: a driver for CUDA 11.8, older than the cuda-hopper image's CUDA 12.8 needs.
OLD_DRIVER_PROBE = """@@gpus
NVIDIA H100 80GB HBM3, 81559 MiB, 0 MiB, 520.61.05
@@cuda
11.8
@@docker
24.0.7
@@runtimes
/usr/bin/nvidia-container-runtime
@@end
"""


def test_a_host_whose_probe_found_a_driver_too_old_for_the_image_is_refused_until_probed_again(lost_on_h100,
                                                                                              tmp_home, capsys):
    store, run, steps = lost_on_h100
    probe.save(probe.parse_probe(OLD_DRIVER_PROBE, host="h100-b", probed_at="2026-12-01T00:00:00+00:00"))
    said = ("driver 520.61.05 runs CUDA 11.8 at most; the cuda-hopper image runs CUDA 12.8, which needs driver "
            "525.60.13 or newer (probed 2026-12-01T00:00:00+00:00)")
    assert main(["run", str(tmp_home / "medium.yaml"), "--host", "h100-b", "--detach"]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert f"h100-b cannot run the cuda-hopper image: {said}" in err and "runner hosts probe h100-b" in err
    assert store.runs() == [run]  # nothing started
    # Moving the lost run there is refused for the same reason, before anything is pulled.
    assert main(["resume", run.id, "--host", "h100-b"]) == EXIT_REFUSED
    assert said in capsys.readouterr().err and steps == []
    # A probe that finds a newer driver clears the way.
    probe.save(probe.parse_probe(OLD_DRIVER_PROBE.replace("520.61.05", "550.54.15").replace("11.8", "12.4"),
                                 host="h100-b"))
    assert dispatch.resume(store, run.id, host="h100-b", say=lambda _: None).host == "h100-b"
