"""`data.hierarchy` in the run (issue #30): the aggregated series in the arrays, every level
forecast and reconciled, the aggregates written to their own partitions, coherent with the
bottom's forecast, and the backtest scored per level."""
import numpy as np
import pytest

from pipeline import config as C
from pipeline.data.series import SeriesArrays
from pipeline.errors import DataError
from pipeline.stages.levels import LEVEL, extend


def _arrays():
    """Three series on an hourly grid, two in store a (one starting later, one with a masked
    step), one in store b."""
    a = SeriesArrays.from_list([[1, 2, 3, 4], [10, 20], [5, 5, 5]], ids=["x", "y", "z"],
                               start=[0, 2 * 3600 * 10**9, 0],
                               mask=[[1, 1, 1, 1], [1, 0], [1, 1, 1]])
    a.groups = np.array(["a", "a", "b"], dtype=object)
    a.static = {"size": np.array([1.0, 3.0, 5.0])}
    return a


def test_extend_appends_each_level_as_the_sum_of_its_children():
    cfg = C.load(None, ["data.group_col=store", "data.hierarchy=[[], [store]]",
                        "windows.lookback=1", "windows.horizon=1"])
    arrays, levels = extend(_arrays(), cfg)
    assert arrays.ids.tolist() == ["x", "y", "z", "total", "store=a", "store=b"]
    assert arrays.series(4).tolist() == [1, 2, 13, 24]        # x + y where y exists
    assert arrays.mask[arrays.indptr[4]:arrays.indptr[5]].tolist() == [1, 1, 1, 0]
    assert arrays.series(3).tolist() == [6, 7, 18, 24]
    assert arrays.groups[3:].tolist() == ["total", "a", "b"]
    assert arrays.static[LEVEL].tolist() == ["unique_id"] * 3 + ["total", "store", "store"]
    assert arrays.static["size"][3:].tolist() == [3.0, 2.0, 5.0]   # the children's mean
    assert levels.S.shape == (6, 3) and list(levels.tags) == ["total", "store", "unique_id"]
    assert levels.rows.tolist() == [3, 4, 5, 0, 1, 2]


def test_extend_refuses_a_child_under_two_parents():
    cfg = C.load(None, ["data.group_col=store", "data.static_cols=[region]",
                        "data.hierarchy=[[region], [region, store]]"])
    arrays = _arrays()
    arrays.static = {"region": np.array(["N", "S", "N"], dtype=object)}
    with pytest.raises(DataError, match="store='a' is under two parents, region='N' "
                                        r"\(series 'x'\) and region='S' \(series 'y'\)"):
        extend(arrays, cfg)
