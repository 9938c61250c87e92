"""Stop requests: SIGTERM and SIGINT set a flag that the loop checks between steps.

The runner stops a job (a money or time cap, a user's stop) with SIGTERM, and a
preempted cloud host sends one too; the loop finishes its step, writes a
checkpoint and a summary, and exits 0 so the run can be resumed.
"""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Set by SIGTERM/SIGINT; a second SIGINT interrupts at once (an impatient Ctrl-C)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.signal_name is not None
