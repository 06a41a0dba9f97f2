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
    """A training job's progress (`pipeline.training.loop.fit`): off a terminal a line per epoch
    and, within an epoch, a line at most every `every` seconds with the step, the running train loss
    and the time left (at the full number of epochs: an early stop ends sooner); on a terminal one
    bar over every step with the same figures. `follow(step, loss)`: told of every step too,
    displayed or not (a Ray task's reporter to the driver)."""

    def __init__(self, epochs: int, enabled: bool = True, stream=None, steps: int = 0,
                 every: float = EVERY, follow=None) -> None:
        self.epochs, self.steps, self.enabled, self.every = epochs, steps, enabled, every
        self.follow = follow
        self.stream = stream or sys.stderr
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=epochs * steps or None, desc="training", unit=" steps",
                        file=self.stream, leave=False, dynamic_ncols=True) \
            if self.tty and tqdm is not None else None
        self.epoch, self.done = 0, 0
        self.t0 = self.last = time.monotonic()

    def step(self, step: int, loss=None) -> None:
        """Step `step` of the current epoch done; `loss()` the running train loss (called
        only when something is printed: it may sync the device)."""
        self.done = self.epoch * self.steps + step
        if self.follow is not None:
            self.follow(step, loss)
        if not self.enabled:
            return
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            if now - self.last >= 1.0:
                self.bar.set_postfix_str(self.status(step, loss), refresh=False)
                self.last = now
        elif now - self.last >= self.every:
            self.stream.write(self.status(step, loss) + "\n")
            self.stream.flush()
            self.last = now

    def status(self, step: int, loss=None) -> str:
        """`epoch e/E step s/S loss x (t s, about T s left)`."""
        of = f"/{self.steps}" if self.steps else ""
        text = f"epoch {self.epoch + 1}/{self.epochs} step {step}{of}"
        if loss is not None:
            text += f" loss {loss():.4f}"
        elapsed = time.monotonic() - self.t0
        total = self.epochs * self.steps
        left = f", about {elapsed * (total - self.done) / self.done:,.0f} s left" \
            if total and self.done else ""
        return f"{text}  ({elapsed:,.0f} s{left})"

    def update(self, row: dict) -> None:
        """An epoch's row (`epoch`, `train_loss`, `val_loss`, `samples_per_s`)."""
        self.epoch = row["epoch"] + 1
        self.done = self.epoch * self.steps
        if not self.enabled:
            return
        text = (f"epoch {row['epoch'] + 1}/{self.epochs}  train {row['train_loss']:.4f}  "
                f"val {row['val_loss']:.4f}  {row['samples_per_s']:,.0f} samples/s")
        self.note(text)
        self.last = time.monotonic()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
