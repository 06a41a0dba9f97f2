"""Frequencies and the calendar grid (DESIGN.md §3).

A `Freq` maps timestamps to integer *ordinals* on its grid and back, so a series is held as its
first ordinal plus positions: step i of a series is ordinal `start + i * step`. The ordinals
are computed on the calendar, never by nanosecond arithmetic across calendar units:

    unit   ordinal                                        step       frequencies
    ns     nanoseconds since the epoch (UTC)              n ns       1h, 15min, 30s (sub-daily)
    D      days since 1970-01-01 of the local date        n days     1d, 2d; 1w (7 days, anchored
                                                                     on a weekday)
    B      business days (Mon-Fri) since Mon 1969-12-29   n          1bd (weekends skipped)
    M      months since 1970-01 of the local date         n months   1mo, 1q (3), 1y (12); the
                                                                     month's first or last day
    int    the integer itself                             n          integer steps (M3 "other")

Daily and longer frequencies are civil dates in the input's time zone: a daily series stamped at
local midnight in Europe/Berlin crosses DST without a gap; sub-daily ones are instants (UTC).
Calendar features are computed from ordinals (NumPy or torch alike, on the GPU too), once per
grid step a loader's windows reach (`pipeline.data.calendar_table`): hour, dayofweek,
dayofmonth, weekofyear, month, quarter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

NS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "min": 60 * 10**9,
      "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
DAY_NS = NS["d"]
PERIODS = {"hour": 24, "dayofweek": 7, "dayofmonth": 31, "weekofyear": 53, "month": 12,
           "quarter": 4}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_B_BASE = -3          # Monday 1969-12-29, day -3: business-day ordinal 0
_UNITS = {"t": "min", "hr": "h", "sec": "s", "day": "d", "week": "w", "mi": "min",
          "month": "mo", "m": "m", "quarter": "q", "year": "y", "a": "y", "b": "bd"}


@dataclass(frozen=True)
class Freq:
    """A grid: `unit` (ns | D | B | M | int) and `step` in that unit, plus what places it on the
    calendar: `weekday` (D unit with 7-day steps: 0 = Monday), `month_end` (M unit: the last day
    of the month, else the first), `time_ns` (D/B/M: the time of day of the stamps), `tz` (the
    input's zone, None for naive) and `kind` (how the input held time: datetime | date | int)."""
    unit: str
    step: int
    weekday: int | None = None           # None: not anchored (or, parsed, from the data)
    month_end: bool | None = False       # None (parsed): from the data
    time_ns: int = 0
    tz: str | None = None
    kind: str = "datetime"

    # -------------------------------------------------------------- naming

    @property
    def name(self) -> str:
        """The `data.freq` spelling: 1h, 1d, 1w-mon, 1bd, 1mo-end, 1q-jan, 1y, 1."""
        if self.unit == "ns":
            return format_ns(self.step)
        if self.unit == "int":
            return str(self.step)
        if self.unit == "B":
            return f"{self.step}bd"
        if self.unit == "D":
            if self.weekday is not None and self.step % 7 == 0:
                return f"{self.step // 7}w-{WEEKDAYS[self.weekday]}"
            return f"{self.step}d"
        end = "-end" if self.month_end else ""
        if self.step % 12 == 0:
            return f"{self.step // 12}y{end}"
        if self.step % 3 == 0:
            return f"{self.step // 3}q{end}"
        return f"{self.step}mo{end}"

    def default_season(self, lengths: np.ndarray | None = None) -> int:
        """m of MASE and seasonal naive, and the season the CNN should see: a day of steps for
        sub-daily data, 7 daily, 5 business-daily, 52 weekly (when the median series holds at
        least two years, else 1), 12 monthly, 4 quarterly, 1 yearly and integer steps."""
        if self.unit == "ns":
            return max(1, DAY_NS // self.step) if self.step < DAY_NS else (
                7 if self.step < NS["w"] else 1)
        if self.unit == "B":
            return 5 if self.step == 1 else 1
        if self.unit == "D":
            if self.step == 1:
                return 7
            if self.step == 7:
                long = lengths is not None and len(lengths) and np.median(lengths) >= 104
                return 52 if long else 1
            return 1
        if self.unit == "M":
            return {1: 12, 3: 4}.get(self.step, 1)
        return 1

    def auto_features(self) -> list[str]:
        """Calendar features that vary at this frequency."""
        if self.unit == "ns":
            return ["hour", "dayofweek"] if self.step < DAY_NS else ["dayofweek", "dayofmonth",
                                                                     "month"]
        if self.unit == "B":
            return ["dayofweek", "month"]
        if self.unit == "D":
            return ["weekofyear"] if self.step == 7 else ["dayofweek", "dayofmonth", "month"]
        if self.unit == "M":
            return {1: ["month"], 3: ["quarter"]}.get(self.step, [])
        return []

    # -------------------------------------------------------------- ordinals <-> days

    def days(self, ordinals):
        """Local civil day numbers of ordinals of a D, B or M grid (NumPy or torch)."""
        if self.unit == "D":
            return ordinals
        if self.unit == "B":
            return _B_BASE + 7 * (ordinals // 5) + ordinals % 5
        if self.unit == "M":
            y, m = ordinals // 12 + 1970, ordinals % 12 + 1
            if self.month_end:
                return days_from_civil(y + (m == 12), m % 12 + 1, 1) - 1
            return days_from_civil(y, m, 1)
        raise ValueError(f"{self.name} has no civil days")

    def calendar_values(self, ordinals, names: list[str]) -> list:
        """Integer calendar fields of ordinals (NumPy or torch int64), one per name."""
        if self.unit == "int":
            if names:
                raise ValueError("integer steps have no calendar features; set data.calendar: []")
            return []
        if self.unit == "ns":
            days, hour = ordinals // DAY_NS, (ordinals // NS["h"]) % 24
        else:
            days, hour = self.days(ordinals), ordinals * 0 + self.time_ns // NS["h"]
        out = []
        for name in names:
            if name == "hour":
                out.append(hour)
            elif name == "dayofweek":
                out.append((days + 3) % 7)              # 1970-01-01 was a Thursday; Monday = 0
            elif name == "dayofmonth":
                out.append(civil_from_days(days)[2] - 1)
            elif name == "month":
                out.append(civil_from_days(days)[1] - 1)
            elif name == "quarter":
                out.append((civil_from_days(days)[1] - 1) // 3)
            elif name == "weekofyear":
                out.append(iso_week(days) - 1)
            else:
                raise ValueError(f"unknown calendar feature {name!r}")
        return out


def to_datetime64(ordinals, freq: Freq) -> np.ndarray:
    """Ordinals as naive datetime64[ns]: the local wall clock for calendar grids, UTC for
    sub-daily instants; integer steps stay integers. (For plots, labels and comparisons;
    outputs keep the input's type and zone: `pipeline.data.grid.to_arrow`.)"""
    ordinals = np.asarray(ordinals, np.int64)
    if freq.unit == "int":
        return ordinals
    if freq.unit == "ns":
        return ordinals.astype("datetime64[ns]")
    return (freq.days(ordinals) * DAY_NS + freq.time_ns).astype("datetime64[ns]")


def label(ordinal: int, freq: Freq) -> str:
    """A partition value for an ordinal: 20240630T230000 (local for calendar grids), or the
    integer step."""
    if freq.unit == "int":
        return str(int(ordinal))
    t = to_datetime64(np.array([ordinal]), freq)[0]
    return t.astype("datetime64[s]").item().strftime("%Y%m%dT%H%M%S")


def format_ns(step: int) -> str:
    for unit in ("w", "d", "h", "min", "s", "ms", "us", "ns"):
        if step % NS[unit] == 0:
            return f"{step // NS[unit]}{unit}"
    return f"{step}ns"  # pragma: no cover


def parse_freq(text: str) -> Freq:
    """'1h', '15min', '1d', '1w', '1w-mon', '1bd', '1mo', '1mo-end', '1q', '1q-end', '1y',
    '1' (integer steps) -> a Freq (its anchors, when not named, come from the data)."""
    m = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]*)\s*((?:-[A-Za-z]+)*)\s*", str(text))
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"frequency {text!r} is not like '1h', '1d', '1w-mon', '1bd', '1mo', "
                         "'1q', '1y' or '1'")
    n = int(m.group(1) or 1)
    unit = _UNITS.get(m.group(2).lower(), m.group(2).lower())
    anchors = [a for a in m.group(3).lower().split("-") if a]
    if n <= 0:
        raise ValueError(f"frequency {text!r}: the multiple must be positive")
    if unit == "":
        return _no_anchor(Freq("int", n, kind="int"), anchors, text)
    if unit in ("mo", "q", "y"):
        step = n * {"mo": 1, "q": 3, "y": 12}[unit]
        bad = [a for a in anchors if a not in ("start", "end")]
        if bad:
            raise ValueError(f"frequency {text!r}: anchor {bad[0]!r} is not 'start' or 'end'")
        return Freq("M", step, month_end=True if "end" in anchors else
                    False if "start" in anchors else None)
    if unit == "bd":
        return _no_anchor(Freq("B", n), anchors, text)
    if unit == "w":
        bad = [a for a in anchors if a[:3] not in WEEKDAYS]
        if bad:
            raise ValueError(f"frequency {text!r}: {bad[0]!r} is not a weekday (mon … sun)")
        return Freq("D", 7 * n, weekday=WEEKDAYS.index(anchors[0][:3]) if anchors else None)
    if unit == "d":
        return _no_anchor(Freq("D", n), anchors, text)
    if unit not in NS:
        raise ValueError(f"frequency {text!r}: unit must be one of ns, us, ms, s, min, h, d, w, "
                         "bd, mo, q, y (or none, for integer steps)")
    return _no_anchor(Freq("ns", n * NS[unit]), anchors, text)


def _no_anchor(freq: Freq, anchors: list[str], text: str) -> Freq:
    if anchors:
        raise ValueError(f"frequency {text!r} takes no anchor")
    return freq


# ------------------------------------------------------------------ civil dates (Hinnant)

def civil_from_days(days):
    """Days since 1970-01-01 -> (year, month 1..12, day 1..31), NumPy or torch alike."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 - 12 * (mp >= 10)
    year = yoe + era * 400 + (month <= 2)
    return year, month, day


def days_from_civil(y, m, d):
    """(year, month, day) -> days since 1970-01-01, NumPy or torch alike."""
    y = y - (m <= 2) * 1                 # (torch refuses `-` on a bool tensor)
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def iso_week(days):
    """ISO 8601 week number (1..53) of day numbers: the week of its Thursday."""
    thursday = days - (days + 3) % 7 + 3
    year = civil_from_days(thursday)[0]
    return (thursday - days_from_civil(year, year * 0 + 1, year * 0 + 1)) // 7 + 1


def cyclic_encode(values: np.ndarray, names: list[str]) -> np.ndarray:
    """Integer calendar fields [..., K] → [..., 2K] float32 (sin, cos) per feature."""
    cols = []
    for j, name in enumerate(names):
        angle = 2 * np.pi * values[..., j].astype(np.float64) / PERIODS[name]
        cols += [np.sin(angle), np.cos(angle)]
    return np.stack(cols, axis=-1).astype(np.float32) if cols else np.zeros(
        (*values.shape[:-1], 0), np.float32)


def resolve_features(setting: list[str] | str, freq: Freq) -> list[str]:
    """`data.calendar`: "auto" (the features that vary at this frequency) or a list."""
    return freq.auto_features() if setting == "auto" else list(setting)
