"""Progress for people (a tqdm bar on stderr) or programs (one JSON object per line on stdout).

The JSON lines are the protocol the Slicer panel reads: each object has a "stage" and, where it
makes sense, a "progress" between 0 and 1; ``{"stage": "message", "text": ...}`` carries text.
"""

from __future__ import annotations

import json
import sys
import time

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
        """A tqdm bar on a terminal; where stderr goes to a file or a pipe, a line now and then
        instead (tqdm's carriage returns would make a saved log one long line)."""
        if self.enabled and self.mode == "bar":
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
            else:
                self.bar = LineBar(total, start, desc, unit)

    def part(self, stage: str, index: int, count: int, item: str, done: int = 0, steps: int = 0, **extra) -> None:
        """Progress through a pause of the main bar (validating ``count`` cases, say): item
        ``index`` (from 0) of ``count``, ``done`` of its ``steps`` where known. Beside the bar, and
        as a JSON record whose "progress" is the share of this stage done."""
        fraction = (index + (done / steps if steps else 0.0)) / max(count, 1)
        self.emit({"stage": stage, "progress": round(fraction, 4), "case": item, "index": index, "total": count,
                   **({"step": done, "steps": steps} if steps else {}), **extra})
        if self.bar is not None:
            text = f"{index + 1}/{count} {item}" + (f" {done}/{steps}" if steps else "")
            if isinstance(self.bar, LineBar) and done == 0:
                self.bar.last = float("-inf")  # a log says when each case starts
            self.bar.set_postfix({stage: text}, refresh=True)

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


class LineBar:
    """The part of tqdm's interface the reporter uses, printing a plain line on stderr at most
    every ``every`` seconds (and at the end), for logs saved to a file."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, every: float = 30.0):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.postfix: dict = {}
        self.began = self.last = time.monotonic()
        self.start = initial

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **postfix) -> None:
        self.postfix = {**(ordered_dict or {}), **postfix}
        if refresh:
            self._line()

    def update(self, count: int) -> None:
        self.n += count
        self._line(force=self.n >= self.total)

    def write(self, text: str, file=None) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (self.n - self.start) / max(now - self.began, 1e-9)
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s){extra}",
              file=sys.stderr, flush=True)
