"""A child process that reports progress as JSON lines and can be cancelled (plain Python, no Qt).

The protocol (GuidedSegLib's CLI and Training/train.py with ``--progress json``): one JSON object
per line on stdout, each with ``"stage"`` and usually ``"progress"`` (0..1); other stdout lines are
log text. A failure exits non-zero with a one-line ``"<prog>: error: <file>: <problem>"`` on
stderr. SIGTERM makes the child stop within about a second, writing no partial output.

Reading never blocks the caller: two threads read stdout and stderr into a queue that
:meth:`ChildProcess.poll` drains, so the panel polls from a Qt timer and Slicer stays responsive.
Cancel terminates the child's whole process group (it may have started workers of its own) and
kills what is left after a short grace period.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ERROR_LINE = re.compile(r"^[\w.\-]+: error: ")


@dataclass(frozen=True)
class Progress:
    """One progress record: its stage, its progress (0..1, or None), and the whole record."""

    stage: str
    progress: float | None
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LogLine:
    """A line that is not a progress record (stdout text, or anything on stderr)."""

    text: str
    stream: str = "stdout"


def parse_line(line: str, stream: str = "stdout") -> Progress | LogLine:
    """A progress record for a JSON object with a "stage"; anything else is log text."""
    text = line.rstrip("\r\n")
    if stream == "stdout" and text.lstrip().startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("stage"), str):
            value = record.get("progress")
            progress = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                progress = min(1.0, max(0.0, float(value)))
            return Progress(record["stage"], progress, record)
    return LogLine(text, stream)


class ChildProcess:
    """Run ``argv`` in its own process group and collect its progress without blocking.

    ``poll()`` returns what arrived since the last call; ``finished`` turns true once the
    process has exited and both streams are read to the end. ``cancel()`` returns at once: it
    sends SIGTERM to the group and, after ``grace_s``, SIGKILL to whatever is still running.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                 grace_s: float = 1.0):
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace_s = grace_s
        self.cancelled = False
        self.last: Progress | None = None
        self.result: dict | None = None  # the "done" record, once it arrived
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.log_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._process: subprocess.Popen | None = None
        self._kill_timer: threading.Timer | None = None

    # ------------------------------------------------------------------------------------------

    def start(self) -> ChildProcess:
        if self._process is not None:
            raise RuntimeError("this process was already started")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: Cancel reaches its children too
        self._process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            self._open_streams += 1
            threading.Thread(target=self._read, args=(stream, name), daemon=True,
                             name=f"GuidedSeg {name} reader").start()
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in stream:
                self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def finished(self) -> bool:
        return self._process is not None and self._open_streams == 0 and self._process.poll() is not None

    @property
    def succeeded(self) -> bool:
        return self.finished and self.returncode == 0 and not self.cancelled

    def poll(self) -> list[Progress | LogLine]:
        """Everything that arrived since the last call (never blocks)."""
        events: list[Progress | LogLine] = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            event = parse_line(line, name)
            if isinstance(event, Progress):
                self.last = event
                if event.stage == "done":
                    self.result = event.record
            elif name == "stderr":
                if event.text.strip():
                    self.stderr_tail.append(event.text)
            elif event.text.strip():
                self.log_tail.append(event.text)
            events.append(event)
        if self.finished and self._kill_timer is not None:
            self._kill_timer.cancel()
        return events

    def wait(self, timeout: float | None = None) -> list[Progress | LogLine]:
        """Block until finished (or ``timeout`` seconds); returns the events read meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events = self.poll()
        while not self.finished and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
            events += self.poll()
        return events

    # ------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the child (and its children) to stop; kill them if they are still there after the
        grace period. Returns at once."""
        if self._process is None or self.cancelled:
            return
        self.cancelled = True
        if self._process.poll() is not None and os.name == "nt":
            return
        self._signal(terminate=True)
        self._kill_timer = threading.Timer(self.grace_s, self._signal, kwargs={"terminate": False})
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def _signal(self, terminate: bool) -> None:
        process = self._process
        if process is None:
            return
        if os.name == "nt":
            if process.poll() is None:  # Windows has no process-group SIGTERM: end the tree
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
            return
        try:  # the group outlives its leader while grandchildren are alive
            os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------------------------------------

    def error_text(self) -> str:
        """One readable line saying why the run failed."""
        if self.cancelled:
            return "cancelled"
        lines = list(self.stderr_tail)
        for line in reversed(lines):
            if ERROR_LINE.match(line.strip()):
                return line.strip()
        for line in reversed(lines):  # a traceback ends with "SomeError: what happened"
            if line.strip():
                return line.strip()
        code = self.returncode
        if code is not None and code < 0:
            return f"{os.path.basename(self.argv[0])} was ended by signal {-code}"
        return f"{os.path.basename(self.argv[0])} exited with code {code} without saying why"
