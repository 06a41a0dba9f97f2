"""What a Ray Tune search leaves on disk besides Ray's own state: its journal of finished
trials, and whether Ray's saved state can be read (`pipeline.execution.ray_tune` resumes from
one or the other). No Ray here: plain files.

Ray Tune rewrites its `experiment_state-*.json` in place, so a kill at that moment leaves it
empty or cut short; the journal (`trials.jsonl`) gets one line per finished trial, written
whole with one `write` and flushed to disk, so a kill loses at most the line being written.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass, field

JOURNAL = "trials.jsonl"            # the search's own record of its finished trials


@dataclass
class TrialRecord:
    trial_id: str
    point: dict
    status: str                 # finished | stopped (by the scheduler or the budget) | failed
    score: float = math.nan     # the final score; a stopped trial's last validation score
    epochs: int = 0
    error: str = ""
    group: str | None = None
    history: list[dict] = field(default_factory=list)   # (epoch, val_loss, train_loss) rows


def unreadable_state(path: str) -> str | None:
    """Why Ray Tune's newest saved state under `path` cannot be read, or None when it can
    (or when there is none: Ray's own check says whether to restore)."""
    files = sorted(glob.glob(os.path.join(glob.escape(path), "experiment_state-*.json")))
    if not files:
        return None
    try:
        with open(files[-1]) as f:
            state = json.load(f)
        if not isinstance(state, dict) or "trial_data" not in state:
            return f"{os.path.basename(files[-1])} has no trial data"
    except (OSError, ValueError) as e:
        return f"{os.path.basename(files[-1])}: {type(e).__name__}"
    return None


def journal_append(path: str, record: TrialRecord) -> None:
    """One line per finished trial, written whole and flushed to disk before the next."""
    os.makedirs(path, exist_ok=True)
    line = json.dumps(dataclasses.asdict(record), default=str) + "\n"
    fd = os.open(os.path.join(path, JOURNAL), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_read(path: str) -> list[TrialRecord]:
    """The finished (and early-stopped) trials of the journal; a line cut short by a kill is
    skipped. Failed trials are not kept: they run again, as in Ray's resume."""
    out, seen, fields = [], set(), {f.name for f in dataclasses.fields(TrialRecord)}
    try:
        with open(os.path.join(path, JOURNAL)) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
            r = TrialRecord(**{k: v for k, v in row.items() if k in fields})
        except (ValueError, TypeError):
            continue
        if r.status in ("finished", "stopped") and r.trial_id not in seen:
            seen.add(r.trial_id)
            out.append(r)
    return out
