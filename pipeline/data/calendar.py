"""Time grid helpers: frequency strings, and calendar features computed from int64 timestamps.

Timestamps are int64 nanoseconds since the epoch (naive wall-clock time). Calendar features are
never stored: a batch computes them from `start_ns + position * freq_ns`, so they cost no memory.
"""
from __future__ import annotations

import re

import numpy as np

NS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "min": 60 * 10**9,
      "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
DAY_NS = NS["d"]
PERIODS = {"hour": 24, "dayofweek": 7, "dayofmonth": 31, "month": 12}


def parse_freq(text: str) -> int:
    """'1h', '15m', '30min', '1d', 'H', 'D' → nanoseconds. Calendar-length units (months, years)
    are refused: the grid must be a fixed duration."""
    m = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]+)\s*", str(text))
    if not m:
        raise ValueError(f"frequency {text!r} is not like '1h', '15m' or '1d'")
    n, unit = int(m.group(1) or 1), m.group(2).lower()
    unit = {"t": "min", "hr": "h", "sec": "s", "day": "d", "week": "w", "mi": "min"}.get(unit, unit)
    if unit not in NS or n <= 0:
        raise ValueError(f"frequency {text!r}: unit must be one of ns, us, ms, s, m/min, h, d, w "
                         "(months and years are not fixed durations)")
    return n * NS[unit]


def format_freq(freq_ns: int) -> str:
    for unit in ("w", "d", "h", "m", "s", "ms", "us", "ns"):
        if freq_ns % NS[unit] == 0:
            return f"{freq_ns // NS[unit]}{unit}"
    return f"{freq_ns}ns"  # pragma: no cover


def auto_features(freq_ns: int) -> list[str]:
    """Calendar features that vary at this frequency."""
    if freq_ns < DAY_NS:
        return ["hour", "dayofweek"]
    if freq_ns < NS["w"]:
        return ["dayofweek", "dayofmonth", "month"]
    return ["month"]


def resolve_features(setting: list[str] | str, freq_ns: int) -> list[str]:
    """`data.calendar`: "auto" (the features that vary at this frequency) or a list."""
    return auto_features(freq_ns) if setting == "auto" else list(setting)


def _civil(days):
    """Days since 1970-01-01 → (day of month 1..31, month 1..12); H. Hinnant's algorithm.
    Works on numpy or torch integer arrays alike."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 - 12 * (mp >= 10)
    return day, month


def calendar_values(t_ns, names: list[str]) -> list:
    """Integer calendar fields of timestamps `t_ns` (numpy or torch int64), one per name."""
    days = t_ns // DAY_NS
    out = []
    for name in names:
        if name == "hour":
            out.append((t_ns // NS["h"]) % 24)
        elif name == "dayofweek":
            out.append((days + 3) % 7)  # 1970-01-01 was a Thursday; Monday = 0
        elif name == "dayofmonth":
            out.append(_civil(days)[0] - 1)
        elif name == "month":
            out.append(_civil(days)[1] - 1)
        else:
            raise ValueError(f"unknown calendar feature {name!r}")
    return out


def cyclic_encode(t_ns: np.ndarray, names: list[str]) -> np.ndarray:
    """[...] int64 timestamps → [..., 2 * len(names)] float32 (sin, cos) per feature."""
    cols = []
    for name, v in zip(names, calendar_values(t_ns, names), strict=True):
        angle = 2 * np.pi * v.astype(np.float64) / PERIODS[name]
        cols += [np.sin(angle), np.cos(angle)]
    if not cols:
        return np.zeros((*np.shape(t_ns), 0), dtype=np.float32)
    return np.stack(cols, axis=-1).astype(np.float32)
