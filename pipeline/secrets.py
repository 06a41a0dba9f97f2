"""Secrets never leave the process: `redact` is the one function applied to every URI or text
that is printed, logged as a param or tag, written into an artifact or an output, or raised in
an error message."""
from __future__ import annotations

import re

# the user-info of a URI: everything between "://" and the last "@" of its authority, so a
# password holding "@" ("postgresql://u:p@ss@db/x") is removed whole, not cut at its first "@"
_USERINFO = re.compile(r"(?<=://)[^\s/?#\"'<>]*@")
# query parameters that carry credentials: ?token=…, &X-Amz-Signature=…, &password=…
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:[\w.-]*(?:token|secret|passw(?:or)?d|pwd|signature|sig|credential|"
    r"api[_-]?key|access[_-]?key|auth)[\w.-]*)=)[^&#\s\"']*")


def redact(text: str | None) -> str:
    """`text` with the user-info of every URI in it removed and the values of credential-like
    query parameters replaced by `***`."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub("", text or ""))
