"""Group values become file, registry and tag names through one injective mapping."""
import pytest

from pipeline.errors import DataError
from pipeline.names import check_groups, model_file, safe_key


def test_safe_values_are_kept_and_others_get_a_digest():
    assert safe_key("store_A") == "store_A" and safe_key("v1.2-x") == "v1.2-x"
    assert safe_key("a b") == "a_b-7dbde935"
    assert safe_key("North/East") == "North_East-d839ae0a"
    assert safe_key(".hidden") == "_hidden-" + safe_key(".hidden")[-8:]
    assert safe_key(42) == "42"
    assert model_file("cnn_direct", "a/b") == f"cnn_direct-{safe_key('a/b')}.pt"


@pytest.mark.parametrize("values", [["a b", "a_b", "a/b", "a:b"], ["x" * 81, "x" * 82],
                                    ["..", "."], ["Ä", "Ö", "_"]])
def test_distinct_values_get_distinct_safe_names(values):
    keys = [safe_key(v) for v in values]
    assert len(set(keys)) == len(values)
    for k in keys:
        assert len(k) <= 80 and k[0] not in ".-" and all(c.isalnum() or c in "_.-" for c in k)
        assert k.isascii()


def test_check_groups_accepts_ordinary_values_and_names_the_bad_ones():
    check_groups(["A", "b", "North/East", "all stores", "Global"], "store")
    with pytest.raises(DataError, match="'all', which the pipeline reserves"):
        check_groups(["A", "all"], "store")
    check_groups(["A b", "a b"], "store")        # unsafe: each has its own digest
    with pytest.raises(DataError, match="'Ab' and 'ab', whose model files .* named 'ab'"):
        check_groups(["Ab", "ab"], "store")
