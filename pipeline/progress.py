"""Progress of a long step: one updating line on a terminal, plain log lines elsewhere (cron,
CI, Ray logs)."""
from __future__ import annotations

import sys


class Progress:
    """One updating line on a terminal; plain log lines otherwise (cron, CI, Ray logs)."""

    def __init__(self, epochs: int, enabled: bool = True, stream=None) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        text = (f"epoch {row['epoch'] + 1}/{self.epochs}  train {row['train_loss']:.4f}  "
                f"val {row['val_loss']:.4f}  {row['samples_per_s']:,.0f} samples/s")
        self.stream.write(f"\r{text}\033[K" if self.tty else text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
