"""benchmarks/busy_machine.py: what it runs, in which order, that its busy loops always end,
and the page it writes. The timed commands are replaced by a stand-in clock: timing the
whole suite inside the suite would take as long as the suite."""

import sys

import pytest
from conftest import benchmark_module


def _busy():
    return benchmark_module("busy_machine")


class FakeLoop:
    """Records what is done to a busy-loop process."""

    started: list["FakeLoop"] = []

    def __init__(self, command):
        self.command, self.killed, self.waited = command, False, False
        FakeLoop.started.append(self)

    def kill(self):
        self.killed = True

    def wait(self):
        assert self.killed, "waited for a loop that was never killed"
        self.waited = True


@pytest.fixture
def fake_runs(monkeypatch):
    """Busy loops recorded, not started; ``timed`` returns the queued seconds in order and
    records each command (a queued exception is raised instead)."""
    busy = _busy()
    FakeLoop.started = []
    calls, queue = [], []

    def fake_timed(command, cwd):
        calls.append(command)
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(busy.subprocess, "Popen", FakeLoop)
    monkeypatch.setattr(busy.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(busy, "timed", fake_timed)
    return busy, calls, queue


def test_times_compare_then_the_suite_with_loops_running_and_writes_the_medians(
    fake_runs, tmp_path
):
    busy, calls, queue = fake_runs
    queue += [3.0, 1.0, 2.0, 250.5]
    out = tmp_path / "busy.md"
    assert busy.main(["--busy", "2", "--repeats", "3", "--out", str(out)]) == 0

    assert [c[1:] for c in calls] == [["-m", "bdia.cli", "compare", "--no-progress"]] * 3 + [
        ["-m", "pytest", "-q"]
    ]
    assert all(c[0] == sys.executable for c in calls)
    assert len(FakeLoop.started) == 2
    assert all(loop.killed and loop.waited for loop in FakeLoop.started)
    text = out.read_text()
    assert "| `bdia compare` | 3.0, 1.0, 2.0 | 2.0 | 30 |" in text  # median of the three
    assert "| `python -m pytest -q` | 250.5 | 250.5 | 300 |" in text
    assert "with 2 busy-loop processes" in text
    # The command as run, but where its page went.
    assert text.rstrip().endswith(
        "Written by `python benchmarks/busy_machine.py --busy 2 --repeats 3`."
    )


def test_skip_tests_times_only_compare(fake_runs, tmp_path):
    busy, calls, queue = fake_runs
    queue += [4.0]
    out = tmp_path / "busy.md"
    assert busy.main(["--busy", "1", "--repeats", "1", "--skip-tests", "--out", str(out)]) == 0
    assert len(calls) == 1
    text = out.read_text()
    written = "Written by `python benchmarks/busy_machine.py --busy 1 --repeats 1 --skip-tests`."
    assert written in text
    assert "pytest" not in text


def test_a_failed_command_stops_the_loops_and_leaves_the_page_as_it_was(fake_runs, tmp_path):
    busy, calls, queue = fake_runs
    queue += [3.0, SystemExit("`bdia compare` failed")]
    out = tmp_path / "busy.md"
    out.write_text("the last good page\n")
    with pytest.raises(SystemExit, match="failed"):
        busy.main(["--busy", "2", "--repeats", "3", "--out", str(out)])
    assert len(calls) == 2  # nothing more ran after the failure
    assert all(loop.killed and loop.waited for loop in FakeLoop.started)
    assert out.read_text() == "the last good page\n"


def test_timed_reports_a_failed_commands_own_output():
    busy = _busy()
    failing = [sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"]
    with pytest.raises(SystemExit) as raised:
        busy.timed(failing, busy.REPO)
    assert "(exit 3)" in str(raised.value) and str(raised.value).endswith("the reason")
    assert busy.timed([sys.executable, "-c", "pass"], busy.REPO) > 0
