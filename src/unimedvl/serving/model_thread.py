"""The one thread on which the server runs the model.

PyTorch's CPU kernels parallelise with OpenMP, and an OpenMP runtime keeps a team of worker threads
for *each* thread that calls into it.  When the teams of several calling threads together outnumber
the cores (model loading on the main thread, the chat batcher, the image batcher, the request
threads...), libgomp stops spin-waiting between parallel regions and every region pays a sleep and
a wake-up: on a 2-core CPU a small element-wise op went from 23 us to 147 us and a decoding step of
the `small` preset from 7 ms to 13 ms.  So every forward of the server - and, where the caller can
arrange it, loading the model too - runs on one thread, and the batchers only schedule.  On a GPU
this costs nothing: the work is serialised on the device anyway.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs callables one at a time on a single daemon thread; :meth:`run` waits for the result.

    A call made from the model thread itself runs at once (no deadlock when model work nests)."""

    def __init__(self, name: str = "unimedvl-model", after_call: Callable[[], None] | None = None):
        # after_call runs on the model thread after every call (the server's malloc trimmer)
        self._after_call = after_call
        self._calls: SimpleQueue = SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            else:
                future.set_result(result)
                del result
            finally:
                del fn, args, kwargs, item, future  # nothing of the call outlives it while the thread waits
            if self._after_call is not None:
                try:
                    self._after_call()
                except Exception:  # noqa: BLE001 - housekeeping never stops the model thread
                    pass

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
        future: Future = Future()
        if threading.current_thread() is self._thread:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001
                future.set_exception(e)
            return future
        self._calls.put((future, fn, args, kwargs))
        return future

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._calls.put(None)


def run_on(model_thread: ModelThread | None, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on ``model_thread``, or on the calling thread when there is none (a scheduler
    built on its own, as tests do)."""
    return fn(*args) if model_thread is None else model_thread.run(fn, *args)
