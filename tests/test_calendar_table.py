"""Calendar features from the table (`pipeline.data.calendar_table`) equal, bit for bit, the
features computed from each window's ordinals, on every frequency and a DST-crossing zone."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.data.calendar import NS, PERIODS, Freq, days_from_civil, parse_freq
from pipeline.data.calendar_table import CalendarTable
from pipeline.data.loader import WindowLoader
from pipeline.data.series import SeriesArrays

NAMES = ["hour", "dayofweek", "dayofmonth", "weekofyear", "month", "quarter"]
L, H = 12, 5


def reference(freq: Freq, names: list[str], ordinals: torch.Tensor) -> torch.Tensor:
    """The features as the loader computed them per batch before the table."""
    cols = []
    for name, val in zip(names, freq.calendar_values(ordinals, names), strict=True):
        angle = val.float() * (2 * np.pi / PERIODS[name])
        cols += [torch.sin(angle), torch.cos(angle)]
    return torch.stack(cols, -1)


def grid(freq: Freq) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of six series: overlapping, disjoint, one a phase apart (sub-daily),
    around the 2024 DST changes in Europe (2024-03-31, 2024-10-27)."""
    day = int(days_from_civil(2024, 3, 25))
    if freq.unit == "ns":
        first = day * NS["d"]
        off = NS["m"] * 7 if freq.step > NS["m"] * 7 else 0          # another phase
        start = [first, first + 3 * freq.step, first + off, first + 400 * freq.step,
                 first - 50 * freq.step, first + 5000 * freq.step]
    elif freq.unit == "D":
        first = day - (day + 3 - (freq.weekday or 0)) % 7 if freq.weekday is not None else day
        start = [first + i * freq.step for i in (0, 3, 1, 400, -50, 220)]
    elif freq.unit == "B":
        start = [30_000 + i for i in (0, 3, 1, 400, -50, 220)]
    else:
        start = [(2024 - 1970) * 12 + i * freq.step for i in (0, 3, 1, 40, -50, 8)]
    return np.array(start, np.int64), np.array([30, 30, 8, 25, 60, 3], np.int64)


FREQS = ["1h", "15min", "1d", "1w-mon", "1bd", "1mo", "1mo-end", "1q", "1y"]


@pytest.mark.parametrize("text,tz", [(f, None) for f in FREQS]
                         + [("1h", "Europe/Berlin"), ("1d", "Europe/Berlin")])
def test_table_features_equal_the_per_window_features(text, tz):
    freq = parse_freq(text)
    freq = dataclasses.replace(freq, tz=tz, month_end=bool(freq.month_end))
    start, lengths = grid(freq)
    table = CalendarTable(freq, NAMES, start, lengths, pad=L, horizon=H,
                          device=torch.device("cpu"))
    for s in range(len(start)):
        pos = torch.arange(-L, lengths[s] + H)                       # every position it reaches
        want = reference(freq, NAMES, torch.from_numpy(start[s:s + 1]) + pos * freq.step)
        got = table.gather(torch.tensor([s]), pos[None])[0]
        assert torch.equal(got, want), (text, s)
    assert len(table.table) < sum(lengths + L + H)                   # overlaps stored once


def loader_for(freq_text: str, names: list[str]) -> tuple[WindowLoader, SeriesArrays]:
    freq = parse_freq(freq_text)
    freq = dataclasses.replace(freq, month_end=bool(freq.month_end))
    start, lengths = grid(freq)
    rng = np.random.default_rng(0)
    arrays = SeriesArrays.from_list([rng.normal(size=n) for n in lengths], start=list(start),
                                    freq=freq)
    return WindowLoader(arrays, L, H, np.zeros(6), np.ones(6), calendar=names), arrays


@pytest.mark.parametrize("text", ["1h", "1mo", "1w-mon"])
def test_loader_batches_from_the_table_equal_per_window_features(text):
    loader, arrays = loader_for(text, NAMES)
    inner = torch.tensor([0, 1, 3, 4]), torch.tensor([-L, 3, 8, 0])  # padded and inner windows
    ahead = torch.tensor([0, 2, 4, 5]), torch.tensor([30 - L, 8 - L, 60 - L, 3 - L])  # forecast
    for (series, start), with_target in ((inner, True), (inner, False), (ahead, False)):
        a = loader.gather(series, start, with_target, in_table=True)
        b = loader.gather(series, start, with_target, in_table=False)
        assert torch.equal(a.x, b.x) and torch.equal(a.xf, b.xf)
        ordinals = torch.from_numpy(arrays.start)[series, None] + \
            (start[:, None] + torch.arange(L + H)) * arrays.freq.step
        want = reference(arrays.freq, NAMES, ordinals)
        assert torch.equal(a.x[..., 1:], want[:, :L]) and torch.equal(a.xf, want[:, L:])


def test_windows_outside_the_table_fall_back_to_the_ordinals():
    loader, arrays = loader_for("1d", ["dayofweek"])
    far = loader.gather(torch.tensor([2]), torch.tensor([50]), False)  # past length + horizon
    ordinals = arrays.start[2] + (50 + np.arange(L + H)) * arrays.freq.step
    want = reference(arrays.freq, ["dayofweek"], torch.from_numpy(ordinals))
    assert torch.equal(far.x[0, :, 1:], want[:L]) and torch.equal(far.xf[0], want[L:])


def test_a_longer_lookback_rebuilds_the_table():
    loader, _ = loader_for("1h", ["hour"])
    longer = loader.with_lookback(3 * L)
    assert longer.cal.pad == 3 * L and loader.cal.pad == L
    assert loader.with_lookback(L // 2).cal is loader.cal              # shorter: shared
    a = longer.gather(torch.tensor([4]), torch.tensor([-3 * L]), in_table=True)
    b = longer.gather(torch.tensor([4]), torch.tensor([-3 * L]), in_table=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.xf, b.xf)
