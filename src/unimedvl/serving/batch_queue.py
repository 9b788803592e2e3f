"""The waiting line both batchers share: jobs handed in by request handlers, taken by one batch
thread (:class:`.batcher.ChatBatcher`, :class:`.image_batcher.ImageBatcher`)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future


class BatchQueue:
    """Subclasses define ``_loop`` (the batch thread's body, which waits on ``_wake`` and leaves
    when ``_stopped``) and call :meth:`_start` once their own state is set up.  Jobs have a
    ``future``."""

    def __init__(self, thread_name: str):
        self._waiting: deque = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:  # pragma: no cover - defined by each batcher
        raise NotImplementedError

    def submit(self, job) -> Future:
        """Queue ``job`` for the batch thread; its ``future`` ends with the result."""
        with self._wake:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        return job.future

    def shutdown(self) -> None:
        """Stop the batch thread; jobs still waiting or running end with ``Cancelled``."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)
