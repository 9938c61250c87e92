"""Watches one trainer process: its output into ``logs/train.log``, its exit code into a file.

``python -m runner.backends.supervisor RUN_DIR -- COMMAND...`` is what the native
backend starts in a new session, and what a container on an SSH host runs. It
outlives the ``runner`` that launched it, so a detached run still gets its log
written (with secrets redacted) and its exit code recorded for ``runner status``
to read. SIGTERM reaches the trainer, which checkpoints; the supervisor itself
waits for the trainer to end and exits with its code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from runner.backends import LOG_FILE, redact, secret_values

EXIT_CODE_FILE = "logs/exit_code"
MODULE = "runner.backends.supervisor"


def supervise(run_dir: Path, command: list[str], log_file: str = LOG_FILE) -> int:
    """Run the trainer, write its output (to ``log_file`` in ``run_dir``) and exit code; return the code."""
    children: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        # In a container only this process gets `docker stop`'s SIGTERM; the trainer must see it to
        # checkpoint. (The native backend signals the whole session: a repeat is the same request.)
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)  # handled, not ignored: exec resets it
    log_path = run_dir / log_file
    log_path.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / EXIT_CODE_FILE).unlink(missing_ok=True)
    secrets = secret_values(dict(os.environ))
    with open(log_path, "ab") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        children.append(child)
        assert child.stdout is not None
        for line in iter(child.stdout.readline, b""):
            log.write(redact(line, secrets))
            log.flush()
        code = child.wait()
    tmp = run_dir / (EXIT_CODE_FILE + ".tmp")
    tmp.write_text(f"{code}\n")
    tmp.replace(run_dir / EXIT_CODE_FILE)
    return code if code >= 0 else 128 - code


def supervisor_argv(python: str, run_dir: str, command: list[str], log_file: str = LOG_FILE) -> list[str]:
    """The command line that runs ``command`` under the supervisor with ``python``; ``main`` reads it."""
    log = ["--log", log_file] if log_file != LOG_FILE else []
    return [python, "-m", MODULE, run_dir, *log, "--", *command]


def main(argv: list[str]) -> int:
    # --log: another node of a multi-host run writes logs/node-K.log, not the run's log
    log_file = LOG_FILE
    if len(argv) >= 3 and argv[1] == "--log":
        log_file, argv = argv[2], [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m runner.backends.supervisor RUN_DIR [--log FILE] -- COMMAND...", file=sys.stderr)
        return 2
    return supervise(Path(argv[0]), argv[2:], log_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
