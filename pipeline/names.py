"""Group values as names. A group value is any text ("North/East", "a b", "Ä"), but it names
model files, Model Registry entries and MLflow tag keys, which take only [A-Za-z0-9_.-]. One
mapping, `safe_key`, serves all of them, and `check_groups` refuses the values it cannot
keep apart."""
from __future__ import annotations

import hashlib
import re

from pipeline.errors import DataError

RESERVED = ("global", "all")     # run labels of a model over every series / every group
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_key(value: str) -> str:
    """`value` itself when it is a safe name (at most 80 of [A-Za-z0-9_.-], not starting with
    '.' or '-'); else its first 60 characters with `_` for each unsafe one (and for leading
    dots and dashes), then `-` and 8 hex digits of its SHA-1 — so "a b", "a/b" and "a_b"
    stay three names."""
    value = str(value)
    if _SAFE.fullmatch(value):
        return value
    digest = hashlib.sha1(value.encode()).hexdigest()[:8]
    head = re.sub(r"^[.\-]+", "_", _UNSAFE.sub("_", value[:60]))    # no hidden or option-like name
    return f"{head}-{digest}"


def model_file(model: str, job: str) -> str:
    """File name of job `job`'s model (`job`: "global" or a group value)."""
    return f"{model}-{safe_key(job)}.pt"


def check_groups(values, column: str) -> None:
    """Refuse group values that would be mistaken for another: the reserved run labels
    "global" and "all", and values whose names are equal but for letter case (model files of
    both would be one file on a case-insensitive file system, as on macOS and Windows)."""
    values = sorted({str(v) for v in values})
    reserved = [v for v in values if v in RESERVED]
    if reserved:
        raise DataError(f"group column {column!r} has the value {reserved[0]!r}, which the "
                        f"pipeline reserves for its run labels ({' and '.join(RESERVED)} name "
                        "a model over every series and a run of every group); rename it in "
                        "the input")
    seen: dict[str, str] = {}
    for v in values:
        key = safe_key(v)
        other = seen.setdefault(key.lower(), v)
        if other != v:
            raise DataError(f"group column {column!r} has the values {other!r} and {v!r}, "
                            f"whose model files and registered models would both be named "
                            f"{key!r} (letter case aside, as on macOS and Windows file "
                            "systems); rename one of them in the input")
