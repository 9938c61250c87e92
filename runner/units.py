"""Human units parsed once at the boundary: token counts, durations, byte sizes."""

from __future__ import annotations

import math
import re

_TOKEN_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKENS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)(?:e(\d+))?\s*([kKmMbBgGtT]?)\s*$")


def parse_count(value: object) -> int:
    """Parse ``100M``, ``0.1B``, ``12_207``, ``1.5k`` or an int into an integer count.

    Rejects anything ambiguous (``100MM``, ``-5``, ``1.5`` without a suffix that
    makes it whole) with a ValueError whose message says what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError("expected a count like 100M, 0.1B or 5000, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or not value.is_integer():
            raise ValueError(f"expected a whole count, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a count like 100M, 0.1B or 5000, got {type(value).__name__}")
    text = value.replace("_", "").replace(",", "")
    match = _TOKENS_RE.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a count; write e.g. 100M, 0.1B, 2.5k or 5000")
    number, exponent, suffix = match.groups()
    scaled = float(number) * (10 ** int(exponent) if exponent else 1) * _TOKEN_SUFFIX[suffix.lower()]
    rounded = round(scaled)
    if not math.isclose(scaled, rounded, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{value!r} is not a whole number of items")
    return int(rounded)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|hours?|d|days?)?\s*$", re.I)
_DURATION_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "hour": 3600,
                    "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def parse_hours(value: object) -> float:
    """Parse a wall-clock cap: a number of hours, or ``24h``, ``90m``, ``2d``, ``600s``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 24h or 90m, got a boolean")
    if isinstance(value, (int, float)):
        hours = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 24h, 90m, 2d or 1.5")
        number, unit = match.groups()
        hours = float(number) * _DURATION_UNIT_S[(unit or "h").lower()] / 3600
    else:
        raise ValueError(f"expected a duration like 24h, got {type(value).__name__}")
    if hours <= 0 or not math.isfinite(hours):
        raise ValueError(f"must be a positive duration, got {value!r}")
    return hours


_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_BYTES_UNIT = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: object) -> int:
    """Parse ``80GiB``, ``24GB``, ``512MiB`` or a plain integer of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 24GiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 24GiB, got {type(value).__name__}")
    match = _BYTES_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 24GiB, 80GB or 512MiB")
    number, unit = match.groups()
    key = (unit or "b").lower().rstrip("b") or "b"
    return int(float(number) * _BYTES_UNIT[key])


def format_count(n: float) -> str:
    """``100_000_000`` -> ``100M``; keeps three significant digits."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) and not float(n).is_integer() else str(int(n))


def format_bytes(n: float) -> str:
    """``25769803776`` -> ``24.0 GiB``."""
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``42`` -> ``42s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
