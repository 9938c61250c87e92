"""The supervisor: what a trainer prints reaches the run's log whole, redacted and exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.backends import LOG_FILE
from runner.backends.supervisor import EXIT_CODE_FILE, supervisor_argv

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-0123"

# A trainer that prints many lines, a secret in two writes with a pause between them, a line on
# stderr, and a last line without a newline, then fails.
TRAINER = r"""
import os, sys, time
secret = os.environ["HF_TOKEN"]
for i in range(1, 501):
    print(f"line {i}", flush=True)
sys.stdout.write("token " + secret[:6]); sys.stdout.flush(); time.sleep(0.2)
sys.stdout.write(secret[6:] + " end\n"); sys.stdout.flush()
print("on stderr", file=sys.stderr, flush=True)
sys.stdout.write("tail without a newline"); sys.stdout.flush()
sys.exit(3)
"""


@pytest.mark.parametrize("log_file", [LOG_FILE, "logs/node-1.log"])
def test_the_log_holds_every_line_once_whole_and_redacted_and_the_tail_without_a_newline(tmp_path, log_file):
    argv = supervisor_argv(sys.executable, str(tmp_path), [sys.executable, "-c", TRAINER], log_file)
    ended = subprocess.run(argv, cwd=REPO, env={**os.environ, "HF_TOKEN": SECRET}, capture_output=True, timeout=60)
    assert ended.returncode == 3 and ended.stdout == b"", ended.stderr
    lines = [f"line {i}\n" for i in range(1, 501)]
    assert (tmp_path / log_file).read_text() == "".join(
        [*lines, "token [redacted] end\n", "on stderr\n", "tail without a newline"])
    assert (tmp_path / EXIT_CODE_FILE).read_text() == "3\n"
