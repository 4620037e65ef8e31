"""Reading ahead and writing behind (``unet predict --overlap``): same results in the same order, errors
after the cases before them are written, bounded memory, and the steps really overlap."""

from __future__ import annotations

import threading
import time

import pytest

from unetcli.inference.pipeline import run_cases

ITEMS = [(f"case{i}", i) for i in range(6)]


class Recorder:
    """Steps that log what runs when, and how many cases are held between reading and writing."""

    def __init__(self, fail_read: int | None = None, fail_compute: int | None = None, fail_write: int | None = None,
                 delay: float = 0.0) -> None:
        self.events: list[str] = []
        self.held = self.most_held = 0
        self.lock = threading.Lock()
        self.fail = {"read": fail_read, "compute": fail_compute, "write": fail_write}
        self.delay = delay

    def _log(self, what: str, i: int, change: int = 0) -> None:
        with self.lock:
            self.events.append(f"{what} {i}")
            self.held += change
            self.most_held = max(self.most_held, self.held)
        if self.fail[what.split()[0]] == i:
            raise ValueError(f"{what} {i} failed")

    def read(self, i: int) -> int:
        self._log("read", i, +1)
        time.sleep(self.delay)
        return i

    def compute(self, i: int) -> int:
        self._log("compute", i)
        time.sleep(self.delay)
        with self.lock:
            self.events.append(f"compute done {i}")
        return i * 10

    def write(self, name: str, value: int) -> int:
        self._log("write", value // 10)
        with self.lock:
            self.held -= 1
        return value + 1


@pytest.mark.parametrize("overlap", [True, False])
def test_results_come_in_order_and_equal(overlap: bool) -> None:
    steps = Recorder()
    assert list(run_cases(ITEMS, steps.read, steps.compute, steps.write, overlap=overlap)) == \
        [(f"case{i}", i * 10 + 1) for i in range(6)]


@pytest.mark.parametrize("step", ["read", "compute", "write"])
def test_a_failure_comes_after_the_cases_before_it(step: str) -> None:
    steps = Recorder(**{f"fail_{step}": 3})
    done = []
    with pytest.raises(ValueError, match=f"{step} 3 failed"):
        for name, _ in run_cases(ITEMS, steps.read, steps.compute, steps.write):
            done.append(name)
    assert done == ["case0", "case1", "case2"]
    assert "write 4" not in steps.events and "write 5" not in steps.events


def test_reading_and_writing_overlap_the_computation_with_bounded_memory() -> None:
    steps = Recorder(delay=0.05)
    list(run_cases(ITEMS, steps.read, steps.compute, steps.write))
    events = steps.events
    # the next case is read while the current one computes
    assert events.index("read 2") < events.index("compute done 1")
    assert steps.most_held <= 4  # one queued, one being read, one computing, one being written
    sequential = Recorder(delay=0.05)
    list(run_cases(ITEMS, sequential.read, sequential.compute, sequential.write, overlap=False))
    assert sequential.most_held == 1


def test_closing_early_stops_the_threads() -> None:
    steps = Recorder(delay=0.01)
    before = threading.active_count()
    done = run_cases(ITEMS, steps.read, steps.compute, steps.write)
    assert next(done)[0] == "case0"
    done.close()
    assert threading.active_count() == before
