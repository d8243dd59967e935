"""Progress for people (a tqdm bar on stderr) or programs (one JSON object per line on stdout).

The JSON lines are the protocol the Slicer panel reads: each object has a "stage" and, where it
makes sense, a "progress" between 0 and 1; ``{"stage": "message", "text": ...}`` carries text.
"""

from __future__ import annotations

import json
import sys

MODES = ("bar", "json", "none")


class Reporter:
    """``mode``: "bar", "json" or "none" (no progress; messages, warnings and result tables are
    still printed, on stderr); a disabled reporter (DDP ranks > 0) says nothing."""

    def __init__(self, mode: str = "bar", enabled: bool = True):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.mode, self.enabled, self.bar = mode, enabled, None

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.mode == "json":
            self.emit({"stage": "message", "text": text})
        elif self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def emit(self, record: dict) -> None:
        if self.enabled and self.mode == "json":
            print(json.dumps(record), flush=True)

    def stage(self, stage: str, done: float, total: float, **extra) -> None:
        self.emit({"stage": stage, "progress": round(done / max(total, 1), 4), **extra})

    def start_bar(self, start: int, total: int, desc: str, unit: str) -> None:
        if self.enabled and self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def set_bar(self, position: int, **postfix) -> None:
        """Move the bar to ``position`` (it never moves back) and show ``postfix`` beside it."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            if position > self.bar.n:
                self.bar.update(position - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
