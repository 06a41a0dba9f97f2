"""Secrets never leave the process: `redact` is applied to every URI or text that is printed,
logged as a param or tag, or written into an artifact."""
from __future__ import annotations

import re


def redact(text: str | None) -> str:
    """`text` with the `user:password@` of every URI in it removed."""
    return re.sub(r"(?<=://)[^/@\s]*@", "", text or "")
