"""Progress of the long steps (reading files, training, waiting on Ray tasks) on stderr: a tqdm
bar on a terminal; off a terminal (cron, CI, Ray job logs) plain lines, at least one every
`every` seconds while the step runs, so no step stays silent for long."""
from __future__ import annotations

import sys
import time

try:                  # optional: the training loop runs where only torch is installed
    from tqdm import tqdm
except ImportError:   # pragma: no cover - plain lines then, on a terminal too
    tqdm = None

EVERY = 10.0          # seconds between plain lines off a terminal


class Display:
    """Progress of one step: `update(n, status)` advances it, `close()` ends it."""

    def __init__(self, label: str, total: int | None = None, unit: str = "", *,
                 stream=None, every: float = EVERY, enabled: bool = True) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done, self.status = 0, ""
        self.t0 = self.last = time.monotonic()
        tty = enabled and tqdm is not None and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=label, unit=f" {unit}" if unit else "it",
                        file=self.stream, leave=False, dynamic_ncols=True) if tty else None

    def update(self, n: int = 1, status: str = "") -> None:
        self.done += n
        self.status = status or self.status
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if status:
                self.bar.set_postfix_str(status, refresh=False)
        elif time.monotonic() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        """One plain line: what is done, how long it took, what is left."""
        elapsed = time.monotonic() - self.t0
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and self.done:
            left = f", about {elapsed * (self.total - self.done) / self.done:,.0f} s left"
        self.stream.write(f"{self.label}  {self.done}{of} {self.unit}  {self.status}  "
                          f"({elapsed:,.0f} s{left})\n".replace("   ", " "))
        self.stream.flush()
        self.last = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Progress:
    """A training job's progress (`pipeline.train.fit`): a line per epoch off a terminal, and
    between epochs a line at most every `EVERY` seconds of steps; a bar on a terminal."""

    def __init__(self, epochs: int, enabled: bool = True, stream=None, steps: int = 0,
                 label: str = "epoch") -> None:
        self.epochs, self.enabled = epochs, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        self.label = label
        self.steps = Display(label, steps or None, "steps", stream=self.stream,
                             enabled=enabled and steps > 0)
        self.epoch = 0

    def step(self, loss: float | None = None) -> None:
        """A training step done (with its loss, when known)."""
        status = f"epoch {self.epoch + 1}/{self.epochs}" + (
            f" loss {loss:.4f}" if loss is not None else "")
        self.steps.update(1, status)

    def update(self, row: dict) -> None:
        self.epoch = row["epoch"] + 1
        if not self.enabled:
            return
        text = (f"epoch {row['epoch'] + 1}/{self.epochs}  train {row['train_loss']:.4f}  "
                f"val {row['val_loss']:.4f}  {row['samples_per_s']:,.0f} samples/s")
        self.stream.write(f"\r{text}\033[K" if self.tty else text + "\n")
        self.stream.flush()
        self.steps.last = time.monotonic()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")

    def close(self) -> None:
        self.steps.close()
        if self.enabled and self.tty:
            self.stream.write("\n")
