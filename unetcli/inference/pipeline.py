"""Per-case work in three steps with reading ahead and writing behind, so that over thousands of scans
the disk and the network are busy at the same time.

While the network computes case k, a reader thread prepares case k + 1 (decoding, resampling) and a
writer thread finishes case k - 1 (mapping back to the file's grid, writing the mask). Memory stays
bounded: at most one prepared case waits in the queue, one more is being read, one computes and one
is written. Results come back in the input order, and a failing case is reported only after every
earlier case has been written, as when the steps run one after the other; the outputs are the same
either way (the same functions run on the same data, the network always on the calling thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
_POLL_S = 0.1


def run_cases(items: Sequence[tuple[str, Item]], read: Callable[[Item], Any], compute: Callable[[Any], Any],
              write: Callable[[str, Any], Any], overlap: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, write(name, compute(read(item))))`` for each ``(name, item)``, in order.

    With ``overlap`` the reading of the next item and the writing of the previous one run in
    background threads while ``compute`` runs here. An exception of any step is raised once the
    items before it are done; nothing is left running when the iterator is closed or fails.
    """
    if not overlap:
        for name, item in items:
            yield name, write(name, compute(read(item)))
        return
    stop = threading.Event()
    ready: queue.Queue[tuple[str, Any, BaseException | None]] = queue.Queue(maxsize=1)
    reader = threading.Thread(target=_read_ahead, args=(items, read, ready, stop), name="unet-read-ahead", daemon=True)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-write-behind")
    reader.start()
    pending: tuple[str, Future] | None = None
    try:
        for _ in items:
            name, prepared, error = ready.get()
            computed = None
            if error is None:
                try:
                    computed = compute(prepared)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the earlier case is written
                    error = exc
            del prepared
            if pending is not None:
                yield pending[0], pending[1].result()
                pending = None
            if error is not None:
                raise error
            pending = (name, writer.submit(write, name, computed))
            del computed
        if pending is not None:
            yield pending[0], pending[1].result()
    finally:
        stop.set()
        writer.shutdown(wait=True)  # a write in progress completes (outputs are atomic either way)
        reader.join()


def _read_ahead(items: Sequence[tuple[str, Item]], read: Callable[[Item], Any],
                ready: queue.Queue, stop: threading.Event) -> None:
    """Read items one after the other into ``ready``; stop at the first failure or when asked."""
    for name, item in items:
        if stop.is_set():
            return
        try:
            result = (name, read(item), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the computing thread, which raises it in order
            result = (name, None, exc)
        while not stop.is_set():
            try:
                ready.put(result, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if result[2] is not None:
            return
