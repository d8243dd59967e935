"""The panel's child-process runner, without Slicer: progress lines parse, Cancel ends the whole
process group within a second and leaves no partial output, and a failure reads as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GuidedSeg"))

from GuidedSegPanel import commands
from GuidedSegPanel.process import ChildProcess, LogLine, Progress, parse_line

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and SIGTERM are POSIX")


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_progress_lines_parse_and_other_text_is_log():
    event = parse_line('{"stage": "infer", "progress": 0.42}\n')
    assert event == Progress("infer", 0.42, {"stage": "infer", "progress": 0.42})
    assert parse_line('{"stage": "train", "progress": 1.7}').progress == 1.0  # clamped
    assert parse_line('{"stage": "message", "text": "hi"}').progress is None
    assert parse_line('{"stage": "x", "progress": true}').progress is None
    for text in ("loading weights...", '{"no": "stage"}', '{"stage": 3}', "{not json", ""):
        assert parse_line(text + "\n") == LogLine(text, "stdout")
    # a JSON-looking line on stderr is log text, never progress
    assert isinstance(parse_line('{"stage": "done"}', "stderr"), LogLine)


def test_runner_reports_stages_in_order_and_the_done_record(tmp_path):
    argv = script(tmp_path, "child.py", """
        import json, sys, time
        print("starting up")
        for i, stage in enumerate(["load", "read", "preprocess", "infer", "restore", "write"]):
            print(json.dumps({"stage": stage, "progress": i / 6}), flush=True)
            time.sleep(0.02)
        print("warning: something harmless", file=sys.stderr)
        print(json.dumps({"stage": "done", "progress": 1.0, "outputs": ["/x/out.nrrd"]}), flush=True)
    """)
    child = ChildProcess(argv).start()
    events = child.wait(timeout=20)
    assert child.finished and child.succeeded and child.returncode == 0
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert stages == ["load", "read", "preprocess", "infer", "restore", "write", "done"]
    assert LogLine("starting up") in events and child.stderr_tail[-1] == "warning: something harmless"
    assert child.result == {"stage": "done", "progress": 1.0, "outputs": ["/x/out.nrrd"]}


def test_poll_never_waits_for_the_child(tmp_path):
    argv = script(tmp_path, "slow.py", """
        import time
        time.sleep(30)
    """)
    child = ChildProcess(argv, grace_s=0.2).start()
    try:
        start = time.monotonic()
        for _ in range(20):
            assert child.poll() == []
        assert time.monotonic() - start < 0.1 and not child.finished
    finally:
        child.cancel()
        child.wait(timeout=5)


CANCELLABLE = """
    import json, os, signal, subprocess, sys, time
    out, pidfile = sys.argv[1], sys.argv[2]
    # a worker of its own, as a data loader or torchrun would start
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(pidfile, "w").write(str(worker.pid))
    def stop(signum, frame):
        sys.exit(143)  # nothing written under the real name
    signal.signal(signal.SIGTERM, stop)
    tmp = out + ".partial"
    with open(tmp, "w") as f:
        for i in range(600):
            print(json.dumps({"stage": "infer", "progress": i / 600}), flush=True)
            f.write("x" * 1000)
            time.sleep(0.05)
    os.replace(tmp, out)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its dead parent yet) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return True


@posix_only
def test_cancel_ends_child_and_its_workers_within_a_second_without_output(tmp_path):
    out, pidfile = tmp_path / "label.nrrd", tmp_path / "worker.pid"
    child = ChildProcess(script(tmp_path, "cancellable.py", CANCELLABLE) + [str(out), str(pidfile)]).start()
    deadline = time.monotonic() + 20
    while not any(isinstance(e, Progress) for e in child.poll()):
        assert time.monotonic() < deadline, "child never reported progress"
        time.sleep(0.02)
    worker = int(pidfile.read_text())
    start = time.monotonic()
    child.cancel()
    child.wait(timeout=5)
    assert child.finished and time.monotonic() - start < 1.0
    assert child.returncode == 143 and child.cancelled and not child.succeeded
    assert not out.exists()
    deadline = time.monotonic() + 3
    while _alive(worker) and time.monotonic() < deadline:  # the grace timer kills what ignores SIGTERM
        time.sleep(0.05)
    assert not _alive(worker), "the child's worker survived Cancel"
    assert child.error_text() == "cancelled"


@posix_only
def test_cancel_kills_a_child_that_ignores_sigterm_after_the_grace_period(tmp_path):
    argv = script(tmp_path, "stubborn.py", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('{"stage": "train", "progress": 0.1}', flush=True)
        time.sleep(60)
    """)
    child = ChildProcess(argv, grace_s=0.3).start()
    deadline = time.monotonic() + 20
    while not child.poll():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    start = time.monotonic()
    child.cancel()
    child.wait(timeout=5)
    assert child.finished and time.monotonic() - start < 1.0
    assert child.returncode == -9


def test_a_failure_reads_as_the_programs_error_line(tmp_path):
    argv = script(tmp_path, "failing.py", """
        import sys
        print('{"stage": "load", "progress": 0.0}', flush=True)
        print("some library chatter", file=sys.stderr)
        print("guidedseg: error: /models/broken: is not a GuidedSeg model bundle: no model.json", file=sys.stderr)
        print("", file=sys.stderr)
        sys.exit(2)
    """)
    child = ChildProcess(argv).start()
    child.wait(timeout=20)
    assert child.finished and not child.succeeded and child.returncode == 2
    assert child.error_text() == "guidedseg: error: /models/broken: is not a GuidedSeg model bundle: no model.json"

    crash = ChildProcess(script(tmp_path, "crash.py", "raise RuntimeError('CUDA out of memory')\n")).start()
    crash.wait(timeout=20)
    assert crash.error_text() == "RuntimeError: CUDA out of memory"

    silent = ChildProcess(script(tmp_path, "silent.py", "raise SystemExit(3)\n")).start()
    silent.wait(timeout=20)
    assert "exited with code 3" in silent.error_text()


def test_commands_follow_the_protocol_and_the_child_finds_the_library(tmp_path):
    argv = commands.segment_command("py", "/m/b", "/t/in.nrrd", "/t/out.nrrd", "cuda:1", ensemble=True, lcc=True)
    assert argv == ["py", "-m", "GuidedSegLib.cli", "segment", "--model", "/m/b", "--input", "/t/in.nrrd",
                    "--output", "/t/out.nrrd", "--device", "cuda:1", "--ensemble", "--lcc", "--progress", "json"]
    train = commands.train_command("py", "/s", "/runs/r1", "cps", "cpu")
    assert train[1].endswith(os.path.join("Training", "train.py")) and Path(train[1]).is_file()
    assert train[2:] == ["--store", "/s", "--output", "/runs/r1", "--progress", "json", "--method", "cps",
                         "--device", "cpu"]
    # from an unrelated folder, with an unrelated PYTHONPATH, the child imports GuidedSegLib
    env = commands.child_environment({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/nowhere"})
    done = subprocess.run([sys.executable, "-c", "import GuidedSegLib, os; print(os.environ['PYTHONUNBUFFERED'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


def test_stage_text_says_what_is_happening():
    assert commands.stage_text("infer", {"progress": 0.5}, commands.SEGMENT_STAGES) == "Running the network"
    record = {"stage": "train", "iteration": 120, "loss": 0.41234, "eta_s": 600}
    assert commands.stage_text("train", record, commands.TRAIN_STAGES) == \
        "Training: iteration 120, loss 0.412, 10 min left"
    assert commands.stage_text("new-stage", {}, {}) == "New stage"
    assert commands.stage_text("error", {"message": "/m: no model.json"}, {}) == "Error: /m: no model.json"


def test_device_probe_reads_what_torch_sees(tmp_path):
    child = ChildProcess(commands.device_probe_command(sys.executable), env=commands.child_environment()).start()
    child.wait(timeout=120)
    assert child.succeeded, child.error_text()
    devices = commands.devices_from_probe(child.result)
    assert devices[0] == ("cpu", "CPU") and child.result["torch"]  # torch answered, with its version
    assert all(d == "mps" or d.startswith("cuda:") for d, _ in devices[1:])
    assert commands.devices_from_probe(None) == [("cpu", "CPU")]
    assert commands.devices_from_probe(json.loads('{"devices": [{"id": "cpu"}, {"id": "cuda:0", "name": "GPU 0"}]}'))\
        == [("cpu", "cpu"), ("cuda:0", "GPU 0")]
