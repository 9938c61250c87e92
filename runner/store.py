"""The run store: every run, its state history and its measured results, in SQLite.

Where things live (the runner's data directory):

- ``$RUNNER_HOME`` when set, else ``$XDG_DATA_HOME/runner``, else ``~/.local/share/runner``;
- the database is ``runs.db`` there (``--store PATH`` picks another file);
- each run's directory is ``runs/<run id>/`` beside the database.

A run's state only changes through ``Store.transition``, which checks the move
against ``ALLOWED`` and writes the new state and a ``transitions`` row with its
reason in one transaction. The database runs in WAL mode so ``runner runs`` can
read while a ``runner run --wait`` writes.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from runner.errors import UserError

HOME_ENV = "RUNNER_HOME"

State = Literal["queued", "starting", "running", "stopping", "succeeded", "failed", "cancelled", "lost"]
STATES: tuple[State, ...] = ("queued", "starting", "running", "stopping", "succeeded", "failed", "cancelled", "lost")
ACTIVE: frozenset[str] = frozenset({"queued", "starting", "running", "stopping"})
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "lost"})

# Every move a run may make. A finished run that did not succeed may be queued again (resume).
ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"starting", "failed", "cancelled"}),
    "starting": frozenset({"running", "stopping", "succeeded", "failed", "cancelled", "lost"}),
    "running": frozenset({"stopping", "succeeded", "failed", "cancelled", "lost"}),
    "stopping": frozenset({"succeeded", "failed", "cancelled", "lost"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "lost": frozenset({"queued"}),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    job_file TEXT NOT NULL,
    experiment TEXT NOT NULL,
    resolved_json TEXT NOT NULL,          -- the ResolvedRun with this machine's paths
    host TEXT NOT NULL,
    profile TEXT NOT NULL,
    backend TEXT NOT NULL,                -- docker | native
    image TEXT,                           -- the trainer image tag (docker)
    handle TEXT,                          -- container id (docker) or pid (native) of the current attempt
    launcher_pid INTEGER,                 -- the runner process that is launching it (until it runs)
    state TEXT NOT NULL,
    reason TEXT NOT NULL,                 -- why it is in its state
    attempt INTEGER NOT NULL DEFAULT 1,
    run_dir TEXT NOT NULL,
    price_usd_per_hour REAL NOT NULL DEFAULT 0,
    max_cost_usd REAL,
    max_hours REAL,
    predicted_tokens_per_s REAL,
    predicted_seconds REAL,
    predicted_cost_usd REAL,
    tokens_per_s REAL,
    tokens INTEGER,
    steps INTEGER,
    wall_s REAL NOT NULL DEFAULT 0,       -- summed over finished attempts
    cost_usd REAL NOT NULL DEFAULT 0,
    peak_bytes INTEGER,
    mfu REAL,
    final_eval_loss REAL,
    best_eval_loss REAL,
    exit_reason TEXT,                     -- the trainer's (budget_reached, early_stop, ...)
    exit_code INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,                      -- when the current attempt started running
    ended_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_run ON transitions(run_id, seq);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state);
"""


@dataclass(frozen=True)
class Run:
    """One row of the ``runs`` table."""

    id: str
    job_file: str
    experiment: str
    resolved_json: str
    host: str
    profile: str
    backend: str
    image: str | None
    handle: str | None
    launcher_pid: int | None
    state: State
    reason: str
    attempt: int
    run_dir: str
    price_usd_per_hour: float
    max_cost_usd: float | None
    max_hours: float | None
    predicted_tokens_per_s: float | None
    predicted_seconds: float | None
    predicted_cost_usd: float | None
    tokens_per_s: float | None
    tokens: int | None
    steps: int | None
    wall_s: float
    cost_usd: float
    peak_bytes: int | None
    mfu: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    exit_reason: str | None
    exit_code: int | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    updated_at: float

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def elapsed_s(self, now: float | None = None) -> float:
        """Wall time over all attempts, counting the current one up to ``now``."""
        current = 0.0
        if self.state in ("running", "stopping") and self.started_at is not None:
            current = max(0.0, (now or time.time()) - self.started_at)
        return self.wall_s + current

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "resolved_json"}


RUN_COLUMNS = tuple(f.name for f in fields(Run))


@dataclass(frozen=True)
class Transition:
    """One state change of a run, with why it happened."""

    run_id: str
    attempt: int
    from_state: str | None
    to_state: str
    at: float
    reason: str


class IllegalTransition(Exception):
    """A state change that ``ALLOWED`` forbids (a bug or a race; the run is left as it was)."""


def data_dir(env: dict[str, str] | None = None) -> Path:
    """The runner's data directory: $RUNNER_HOME, else $XDG_DATA_HOME/runner, else ~/.local/share/runner."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "runner"


def default_store_path(env: dict[str, str] | None = None) -> Path:
    return data_dir(env) / "runs.db"


def new_run_id(now: float | None = None) -> str:
    """A short id that sorts by creation time: ``YYMMDD-HHMMSS-xxxx`` (UTC, 4 random hex)."""
    stamp = datetime.fromtimestamp(now or time.time(), timezone.utc).strftime("%y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


class Store:
    """The SQLite run store. Open with ``Store.open()``; every method is its own transaction."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    @classmethod
    def open(cls, path: str | Path | None = None) -> Store:
        return cls(Path(path).expanduser() if path else default_store_path())

    @property
    def runs_dir(self) -> Path:
        """Run directories live beside the database."""
        return self.path.parent / "runs"

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-check-write cannot interleave.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def create(self, *, job_file: str, experiment: str, resolved_json: str, host: str, profile: str,
               backend: str, run_dir: Path | None = None, reason: str = "submitted",
               **measured: Any) -> Run:
        """Insert a new run in state ``queued``; its directory defaults to ``runs/<id>``."""
        now = time.time()
        run_id = new_run_id(now)
        values = dict(id=run_id, job_file=job_file, experiment=experiment, resolved_json=resolved_json,
                      host=host, profile=profile, backend=backend, state="queued", reason=reason,
                      run_dir=str(run_dir or self.runs_dir / run_id), created_at=now, updated_at=now,
                      launcher_pid=os.getpid(), **measured)
        _check_columns(values)
        with self._write() as db:
            db.execute(f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                       tuple(values.values()))
            db.execute("INSERT INTO transitions (run_id, attempt, from_state, to_state, at, reason) "
                       "VALUES (?, 1, NULL, 'queued', ?, ?)", (run_id, now, reason))
        return self.get(run_id)

    def transition(self, run_id: str, to_state: State, reason: str, *, expect: set[str] | None = None,
                   **changes: Any) -> Run:
        """Move a run to ``to_state`` and apply ``changes``, atomically; IllegalTransition if not allowed.

        ``expect`` narrows the states the run may be in (for a caller that read it earlier).
        Entering ``running`` stamps ``started_at``; leaving ``running``/``stopping`` adds
        the attempt's wall time and cost; ``queued`` after a finish starts a new attempt.
        """
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise IllegalTransition(f"no run {run_id}")
            current = row["state"]
            if to_state not in ALLOWED[current] or (expect is not None and current not in expect):
                raise IllegalTransition(f"run {run_id} cannot go from {current} to {to_state}")
            values: dict[str, Any] = {"state": to_state, "reason": reason, "updated_at": now, **changes}
            attempt = row["attempt"]
            if current in TERMINAL and to_state == "queued":
                attempt += 1
                values.update(attempt=attempt, handle=None, exit_code=None, exit_reason=None, ended_at=None,
                              started_at=None, launcher_pid=os.getpid())
            if to_state == "running" and current != "running":
                values.setdefault("started_at", now)
                values["launcher_pid"] = None
            if to_state in TERMINAL:
                values.setdefault("ended_at", now)
                values["launcher_pid"] = None
                if current in ("running", "stopping") and row["started_at"] is not None:
                    attempt_s = max(0.0, values["ended_at"] - row["started_at"])
                    values["wall_s"] = row["wall_s"] + attempt_s
                    values["cost_usd"] = row["cost_usd"] + attempt_s / 3600 * row["price_usd_per_hour"]
            _check_columns(values)
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                       (*values.values(), run_id))
            db.execute("INSERT INTO transitions (run_id, attempt, from_state, to_state, at, reason) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (run_id, attempt, current, to_state, now, reason))
        return self.get(run_id)

    def update(self, run_id: str, **changes: Any) -> Run:
        """Record facts about a run that do not change its state (handle, image, measurements)."""
        values = {**changes, "updated_at": time.time()}
        _check_columns(values)
        if "state" in values:
            raise IllegalTransition("state changes go through transition()")
        with self._write() as db:
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                       (*values.values(), run_id))
        return self.get(run_id)

    def get(self, run_id: str) -> Run:
        """A run by its id or a unique prefix of it; UserError when none or several match."""
        rows = self._db.execute("SELECT * FROM runs WHERE id = ? UNION ALL SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' "
                                "AND id != ? ORDER BY id LIMIT 6", (run_id, _like_prefix(run_id), run_id)).fetchall()
        exact = [r for r in rows if r["id"] == run_id]
        if exact:
            return _run(exact[0])
        if len(rows) == 1:
            return _run(rows[0])
        if not rows:
            raise UserError(f"no run {run_id!r} in {self.path}", field="run", hint="`runner runs` lists them")
        raise UserError(f"{run_id!r} matches several runs: {', '.join(r['id'] for r in rows[:5])}", field="run",
                        hint="give more of the id")

    def runs(self, *, states: set[str] | None = None, limit: int | None = None) -> list[Run]:
        """Runs, newest first."""
        query, params = "SELECT * FROM runs", []
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            params += sorted(states)
        query += " ORDER BY id DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        return [_run(r) for r in self._db.execute(query, params).fetchall()]

    def transitions(self, run_id: str) -> list[Transition]:
        rows = self._db.execute("SELECT run_id, attempt, from_state, to_state, at, reason FROM transitions "
                                "WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
        return [Transition(**dict(r)) for r in rows]


def _run(row: sqlite3.Row) -> Run:
    return Run(**{k: row[k] for k in RUN_COLUMNS})


def _check_columns(values: dict[str, Any]) -> None:
    unknown = set(values) - set(RUN_COLUMNS)
    if unknown:
        raise ValueError(f"not run columns: {sorted(unknown)}")


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
