"""The command line that starts the trainer: one process, or torchrun with one process per GPU and node.

PyTorch's own launcher (``torch.distributed.run``, which is torchrun) starts the
training processes, gives each its rank, and tears all of them down when one
fails. On one host it uses a standalone rendezvous on a free local port. Over
several hosts each runs one torchrun, all pointed at a static rendezvous on the
first host: its torchrun is node 0, so rank 0, which writes the metrics and
checkpoints, runs on the host whose run directory the runner follows.
"""

from __future__ import annotations

from dataclasses import dataclass

RENDEZVOUS_PORT = 29400  # torchrun's customary port
# torchrun waits this long for its processes to checkpoint and exit after a SIGTERM before it kills
# them (its own default is 30 s); older torchruns ignore the variable and use their default.
SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


@dataclass(frozen=True)
class Rendezvous:
    """Where the torchruns of a multi-host run meet, and which of them this one is."""

    address: str  # the first host's address, as the other hosts reach it
    nodes: int
    node_rank: int  # 0 on the first host
    port: int = RENDEZVOUS_PORT


def trainer_argv(python: str, resolved_path: str, run_dir: str, *, gpus: int = 1,
                 rendezvous: Rendezvous | None = None) -> list[str]:
    """The argv that trains ``resolved_path`` into ``run_dir`` with ``gpus`` processes on this host."""
    trainer = ["-m", "runner.trainer", resolved_path, "--out", run_dir]
    if gpus == 1 and rendezvous is None:
        return [python, *trainer]
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    if rendezvous is None:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={rendezvous.nodes}", f"--node-rank={rendezvous.node_rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={rendezvous.address}:{rendezvous.port}"]
    return argv + trainer


def node_argvs(python: str, resolved_path: str, run_dir: str, *, gpus: int, addresses: list[str],
               port: int = RENDEZVOUS_PORT) -> list[list[str]]:
    """One torchrun argv per host of a multi-host run, in ``addresses`` order (the first hosts the rendezvous)."""
    return [trainer_argv(python, resolved_path, run_dir, gpus=gpus,
                         rendezvous=Rendezvous(addresses[0], len(addresses), rank, port))
            for rank in range(len(addresses))]


def launch_env(grace_s: float) -> dict[str, str]:
    """Environment for the launcher: how long a stopped run may take to checkpoint."""
    return {SHUTDOWN_ENV: str(max(1, int(grace_s)))}

