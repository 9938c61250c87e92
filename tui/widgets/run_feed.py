"""Follow one run's directory: new log lines and metrics events, read in a worker and posted in batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LOG_FILE = "logs/train.log"
METRICS_FILE = "metrics.jsonl"
POLL_S = 0.1
LOG_TAIL_BYTES = 256 * 1024  # the end of a long log is enough to start with


@dataclass
class FileTail:
    """Reads what was appended to a file since the last read, in whole lines."""

    path: Path
    start_bytes: int | None = None  # begin this far before the end; None: from the start
    offset: int = 0
    partial: bytes = b""
    started: bool = False

    def read_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                if not self.started and self.start_bytes is not None:
                    self.offset = max(0, f.seek(0, 2) - self.start_bytes)
                self.started = True
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [line.decode(errors="replace").rstrip("\r") for line in lines]


def parse_events(lines: list[str]) -> list[dict]:
    """The trainer's metrics events in these lines; a torn or foreign line is skipped."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
