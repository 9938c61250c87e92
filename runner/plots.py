"""Loss curves of compared runs: against tokens, wall time and dollars, one line per host.

``curves(records)`` reads each run's ``metrics.jsonl``; ``write_png`` draws the
three panels with matplotlib (Agg, no display needed) and ``draw_terminal``
draws them with plotext for a terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.compare import RunRecord, read_events

AXES = (("tokens", "tokens"), ("wall_s", "wall time (s)"), ("usd", "cost (USD)"))


@dataclass(frozen=True)
class Curve:
    """One host's loss curve, with the same points on three x axes."""

    label: str
    tokens: tuple[float, ...]
    wall_s: tuple[float, ...]
    usd: tuple[float, ...]
    loss: tuple[float, ...]
    kind: str  # "eval loss", or "train loss" for runs without validation data


def curve(record: RunRecord, label: str | None = None) -> Curve | None:
    """A run's eval-loss curve (train loss when it never evaluated); None without metrics.

    Eval events carry tokens but no clock, so their time is interpolated from the
    train events around them.
    """
    if record.run_dir is None:
        return None
    events = read_events(Path(record.run_dir) / "metrics.jsonl")
    train = [(e["tokens"], e["elapsed_s"], e["loss"]) for e in events
             if e.get("event") == "train" and "elapsed_s" in e and "loss" in e]
    evals = [(e["tokens"], e["eval_loss"]) for e in events if e.get("event") == "eval" and e.get("eval_loss") is not None]
    if evals:
        kind, points = "eval loss", [(t, _clock_at(t, train), loss) for t, loss in evals]
    elif train:
        kind, points = "train loss", train
    else:
        return None
    price_per_s = record.price_usd_per_hour / 3600
    return Curve(label or record.host, tuple(p[0] for p in points), tuple(p[1] for p in points),
                 tuple(p[1] * price_per_s for p in points), tuple(p[2] for p in points), kind)


def _clock_at(tokens: float, train: list[tuple[float, float, float]]) -> float:
    """Elapsed seconds when ``tokens`` had been trained, by linear interpolation (0 before the first step)."""
    before = (0.0, 0.0)
    for t, s, _ in train:
        if t >= tokens:
            if t == before[0]:
                return s
            return before[1] + (s - before[1]) * (tokens - before[0]) / (t - before[0])
        before = (t, s)
    return before[1]


def curves(records: Sequence[RunRecord]) -> list[Curve]:
    """One curve per host (its newest run), labelled ``host``, or ``host · job`` across several jobs."""
    several_jobs = len({r.job for r in records}) > 1
    newest: dict[tuple[str, str], RunRecord] = {}
    for r in sorted(records, key=lambda r: r.run_id):
        newest[(r.job, r.host)] = r
    out = []
    for (job, host), record in newest.items():
        found = curve(record, f"{host} · {job}" if several_jobs else host)
        if found is not None:
            out.append(found)
    return out


def write_png(curves_: Sequence[Curve], path: str | Path, *, title: str | None = None) -> Path:
    """Draw loss against tokens, wall time and dollars side by side into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    try:
        for ax, (field, label) in zip(axes, AXES):
            for c in curves_:
                ax.plot(getattr(c, field), c.loss, marker=".", label=c.label)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(curves_[0].kind if curves_ else "loss")
        axes[0].legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def draw_terminal(curves_: Sequence[Curve], *, width: int | None = None) -> str:
    """The three panels as terminal text (plotext), for ``runner compare`` on a terminal."""
    import plotext as plt

    plt.clear_figure()
    # The size goes on the whole figure before it is split: set on a subplot, it
    # would size only that one and the others would not be drawn.
    plt.plotsize(width or plt.terminal_width() or 150, 20)
    plt.theme("clear")  # the terminal's own colours
    plt.subplots(1, 3)
    for i, (field, label) in enumerate(AXES, start=1):
        plt.subplot(1, i)
        plt.xlabel(label)
        for c in curves_:
            plt.plot(list(getattr(c, field)), list(c.loss), label=c.label, marker="braille")
    text = plt.build()
    plt.clear_figure()
    return text
