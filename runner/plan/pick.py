"""Which of a job's plans to recommend: the cheapest and the fastest among those that pass."""

from __future__ import annotations

from runner.plan import Plan


def cheapest_and_fastest(plans: list[Plan]) -> tuple[Plan | None, Plan | None]:
    """The passing plan that costs least (ties: quicker), and the quickest (ties: cheaper); None if none pass."""
    passing = [p for p in plans if p.passes]
    cheapest = min(passing, key=lambda p: (p.cost_usd, p.seconds), default=None)
    fastest = min(passing, key=lambda p: (p.seconds, p.cost_usd), default=None)
    return cheapest, fastest
