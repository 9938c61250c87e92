"""Sync speed: bring a 1 GiB run directory home from an SSH test host, beside `rsync -a` over ssh.

Creates one SSH test host (network namespace, veth link, real sshd; needs root),
writes a run directory on it (three checkpoints of large files with manifests,
many small log files), then, in each round, syncs it home with `runner.sync.pull`
and with `rsync -a -e ssh` on the same link (which goes first alternates by
round), and again after one new checkpoint appears. Prints a Markdown table
with throughput and the CPU time each tool spent on this side (the runner's
process; rsync's receiver and ssh client). Usage:

    .venv/bin/python bench/sync_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from sshhosts import create_host, known_hosts_line  # noqa: E402

from runner import ssh, sync  # noqa: E402

MIB = 2**20
# One checkpoint: 256 MiB of weights and 64 MiB of optimizer state; 2,000 logs of 32 KiB.
MAKE_RUN = r"""
import hashlib, json, os, sys
run = sys.argv[1]
def checkpoint(step):
    d = f"{run}/checkpoints/step-{step:07d}"
    os.makedirs(d, exist_ok=True)
    files = []
    for name, size in (("model.safetensors", 256 << 20), ("optimizer.pt", 64 << 20), ("state.json", 2000)):
        data = os.urandom(size)
        open(f"{d}/{name}", "wb").write(data)
        files.append({"path": name, "size": size, "sha256": hashlib.sha256(data).hexdigest()})
    open(f"{d}/manifest.json", "w").write(json.dumps({"step": step, "files": files}))
if sys.argv[2] == "full":
    for step in (1000, 2000, 3000):
        checkpoint(step)
    os.makedirs(f"{run}/logs", exist_ok=True)
    for i in range(2000):
        line = f"worker {i} step 1 loss 9.9 tokens/s 12345\n".encode()
        open(f"{run}/logs/worker-{i:04d}.log", "wb").write(line * (32768 // len(line)))
    open(f"{run}/metrics.jsonl", "w").write('{"step": 1, "loss": 9.9}\n' * 10000)
else:
    checkpoint(int(sys.argv[2]))
"""


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rsync(host, known_hosts: Path, remote_dir: str, local: Path) -> float:
    shell = " ".join(["ssh", "-i", str(host.client_key_path), "-o", f"UserKnownHostsFile={known_hosts}",
                      "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
    started = time.monotonic()
    subprocess.run(["rsync", "-a", "-e", shell, f"{host.user}@{host.address}:{remote_dir}/", f"{local}/"],
                   check=True)
    return time.monotonic() - started


def ours(conn: ssh.Connection, remote_dir: str, local: Path) -> tuple[float, sync.SyncReport]:
    started = time.monotonic()
    report = sync.pull(conn, remote_dir, local)
    if not report.ok:
        raise SystemExit(f"sync refused files: {report.refused}")
    return time.monotonic() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is not installed: apt-get install -y rsync")
    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    # The runner's known_hosts and ~/.ssh are this benchmark's own, not the user's.
    os.environ.update(HOME=str(scratch / "home"), XDG_CONFIG_HOME=str(scratch / "config"))
    os.environ.pop("SSH_AUTH_SOCK", None)
    host = create_host("bench")
    try:
        known = ssh.runner_known_hosts_path()
        known.parent.mkdir(parents=True)
        known.write_text(known_hosts_line(host) + "\n")
        remote_dir = f"{host.home}/runs/bench"
        script = host.workdir / "make_run.py"
        script.write_text(MAKE_RUN)
        script.chmod(0o644)
        made = host.run_as_user(f"python3 {script} {remote_dir} full")
        if made.returncode != 0:
            raise SystemExit(made.stderr)
        ep = ssh.Endpoint("bench", host.address, host.port, host.user, (str(host.client_key_path),), True)
        results: dict[str, list[float]] = {"runner full": [], "rsync full": [], "runner new ckpt": [],
                                           "rsync new ckpt": [], "runner cpu": [], "rsync cpu": []}
        moved_new: tuple[str, ...] = ()
        with ssh.connect(ep) as conn:
            print(f"cipher {conn.transport().remote_cipher}; rsync uses ssh's default", file=sys.stderr)
            for round_no in range(args.rounds):
                for tool in ("runner", "rsync")[::1 if round_no % 2 == 0 else -1]:
                    local = scratch / f"{tool}-{round_no}"
                    cpu_s = time.process_time() + children_cpu_s()
                    wall_s = ours(conn, remote_dir, local)[0] if tool == "runner" else rsync(
                        host, known, remote_dir, local)
                    cpu_s = time.process_time() + children_cpu_s() - cpu_s
                    results[f"{tool} full"].append(tree_bytes(local) / MIB / wall_s)
                    results[f"{tool} cpu"].append(cpu_s * 1000 / (tree_bytes(local) / MIB))
                    print(f"round {round_no + 1} {tool}: {results[f'{tool} full'][-1]:.0f} MiB/s, "
                          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
                full_bytes = tree_bytes(scratch / f"runner-{round_no}")
                step = 4000 + round_no * 1000
                made = host.run_as_user(f"python3 {script} {remote_dir} {step}")
                if made.returncode != 0:
                    raise SystemExit(made.stderr)
                wall_s, report = ours(conn, remote_dir, scratch / f"runner-{round_no}")
                results["runner new ckpt"].append(wall_s)
                moved_new = report.moved
                results["rsync new ckpt"].append(rsync(host, known, remote_dir, scratch / f"rsync-{round_no}"))
                if set(moved_new) != {f"checkpoints/step-{step:07d}/{n}" for n in
                                      ("model.safetensors", "optimizer.pt", "state.json", "manifest.json")}:
                    raise SystemExit(f"incremental sync moved more than the new checkpoint: {moved_new}")
                host.run_as_user(f"rm -rf {remote_dir}/checkpoints/step-{step:07d}")  # the next round starts alike
                shutil.rmtree(scratch / f"runner-{round_no}")
                shutil.rmtree(scratch / f"rsync-{round_no}")
        full = statistics.median(results["runner full"]) / statistics.median(results["rsync full"])
        print(f"run directory: {full_bytes / MIB:.0f} MiB (3 checkpoints of 320 MiB, 2,000 logs of 32 KiB), "
              f"new checkpoint 320 MiB; median of {args.rounds} rounds")
        print()
        print("| sync | runner | rsync -a over ssh | runner / rsync |")
        print("|---|---|---|---|")
        print(f"| full, MiB/s | {statistics.median(results['runner full']):.0f} | "
              f"{statistics.median(results['rsync full']):.0f} | {full:.0%} |")
        print(f"| full, CPU ms per MiB on this side | {statistics.median(results['runner cpu']):.1f} | "
              f"{statistics.median(results['rsync cpu']):.1f} | |")
        print(f"| after one new checkpoint, s | {statistics.median(results['runner new ckpt']):.2f} | "
              f"{statistics.median(results['rsync new ckpt']):.2f} | |")
        print()
        print(f"incremental sync moved only: {', '.join(sorted(moved_new))}")
    finally:
        try:
            host.teardown()
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
