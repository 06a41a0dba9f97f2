"""What identifies a run's inputs and code: a content hash of the input files and the git
commit of the pipeline's source."""
from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path


def data_hash(paths: Iterable[str | os.PathLike], chunk: int = 1 << 20) -> str:
    """sha256 over each file's relative name, size, first and last MiB (files found under
    folders, sorted). Fast on large inputs; an edit that keeps the size and touches only the
    middle of a file larger than 2 MiB is not seen (a deliberate trade-off)."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(chunk))
                if size > 2 * chunk:
                    fh.seek(size - chunk)
                    h.update(fh.read(chunk))
                elif size > chunk:
                    h.update(fh.read())
    return h.hexdigest()


def git_commit() -> str | None:
    """HEAD of the repository holding this package, or None outside git."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
