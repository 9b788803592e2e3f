"""Running model work from the web server: bounded admission, a fixed number of model threads,
timeouts and cooperative cancellation.

At most ``max_concurrency`` jobs run on the model and ``max_queue`` wait; a job beyond that is
refused at once (429) instead of piling up.  A job's ``prepare`` step (decoding the request's
uploaded images) runs only after it is admitted, on at most ``max_concurrency`` decoding threads,
so decoded pixels never pile up beyond the queue's limits.  A job that passes ``request_timeout_s`` (waiting plus
running), or whose client went away, gets its :class:`CancelToken` set; model loops check it
between decoding/denoising steps (:meth:`CancelToken.check`) and stop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from .errors import APIError
from .model_thread import run_on

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside model work whose request was cancelled."""


class CancelToken:
    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def timed_out(self) -> bool:
        return self._event.is_set() and self.reason.startswith("timed out")

    def check(self, *_args) -> None:
        """Raise :class:`Cancelled` if cancelled; usable as a progress callback."""
        if self._event.is_set():
            raise Cancelled(self.reason)


class ModelWorker:
    """Admission, timeouts and cancellation for model work: jobs on ``max_concurrency`` model
    threads, and work that ``batchers`` run together (chat answers: :class:`.batcher.ChatBatcher`;
    text-to-image: :class:`.image_batcher.ImageBatcher`; each has ``max_batch`` and ``active``).
    ``capacity`` requests may be admitted at once: those that can run plus ``max_queue`` waiting."""

    def __init__(self, max_concurrency: int, max_queue: int, timeout_s: float, batchers=(), model_thread=None):
        self.max_concurrency, self.max_queue, self.timeout_s = max_concurrency, max_queue, timeout_s
        self.batchers = tuple(batchers)
        self.model_thread = model_thread  # a .model_thread.ModelThread: jobs' model work runs there, in turn with the batches
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="unimedvl-model")
        self._decoder = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="unimedvl-decode")
        self._lock = threading.Lock()
        self.admitted = 0  # queued + running
        self._running_jobs = 0  # image jobs on the model threads

    @property
    def running(self) -> int:
        return self._running_jobs + sum(b.active for b in self.batchers)

    @property
    def queued(self) -> int:
        return max(0, self.admitted - self.running)

    @property
    def capacity(self) -> int:
        return self.max_concurrency + sum(b.max_batch for b in self.batchers) + self.max_queue

    def admit(self) -> None:
        with self._lock:
            if self.admitted >= self.capacity:
                batch = "".join(f", {b.name} batch {b.max_batch}" for b in self.batchers)
                raise APIError(429, f"the server is busy: {self.running} request(s) running and {self.queued} queued "
                                    f"(max_concurrency {self.max_concurrency}{batch}, max_queue {self.max_queue}); retry later",
                               code="queue_full", headers={"Retry-After": "1"})
            self.admitted += 1

    def release(self) -> None:
        with self._lock:
            self.admitted -= 1

    def _prepare(self, prepare: Callable[[], object], token: CancelToken, deadline: float) -> None:
        if time.monotonic() > deadline:
            token.cancel("timed out in the queue")
        token.check()
        prepare()

    def _run(self, fn: Callable[[CancelToken], T], token: CancelToken, deadline: float) -> T:
        with self._lock:
            self._running_jobs += 1
        try:
            if time.monotonic() > deadline:
                token.cancel("timed out in the queue")
            token.check()
            return run_on(self.model_thread, fn, token)
        finally:
            with self._lock:
                self._running_jobs -= 1

    def _timeout_error(self) -> APIError:
        return APIError(504, f"the request took longer than request_timeout_s ({self.timeout_s:g} s) and was cancelled", code="timeout")

    async def run(self, fn: Callable[[CancelToken], T], *, prepare: Callable[[], object] | None = None,
                  is_disconnected: Callable | None = None, token: CancelToken | None = None) -> T:
        """Run ``prepare()`` on a decoding thread, then ``fn(token)`` on a model thread, both after
        admission; 504 past the timeout (queued, preparing or running), 499 when the client left.
        ``prepare``'s own errors (an unreadable upload...) are raised as they are."""
        def start(token: CancelToken, deadline: float):
            return asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, token, deadline)

        return await self._admitted(start, prepare, is_disconnected, token)

    async def run_batched(self, submit: Callable[[CancelToken], "Future"], *, prepare: Callable[[], object] | None = None,
                          is_disconnected: Callable | None = None, token: CancelToken | None = None):
        """As :meth:`run`, for work that ``submit(token)`` hands to a batcher (returning its
        future): the same admission, preparation, timeout, disconnect and cancellation rules."""
        return await self._admitted(lambda token, _deadline: asyncio.wrap_future(submit(token)), prepare, is_disconnected, token)

    async def _admitted(self, start, prepare, is_disconnected, token: CancelToken | None):
        """Admit, ``prepare`` on a decoding thread, then await ``start(token, deadline)``'s future."""
        self.admit()
        token = token or CancelToken()
        deadline = time.monotonic() + self.timeout_s
        try:
            if prepare is not None:
                await self._wait(asyncio.get_running_loop().run_in_executor(self._decoder, self._prepare, prepare, token, deadline),
                                 token, deadline, is_disconnected)
            return await self._wait(start(token, deadline), token, deadline, is_disconnected)
        finally:
            self.release()

    async def _wait(self, future, token: CancelToken, deadline: float, is_disconnected: Callable | None):
        # A request answered 504/499 leaves its work to stop on its own; whatever that work ends
        # with is collected here, so asyncio never reports an exception nobody retrieved.
        future.add_done_callback(_collect)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                token.cancel("timed out")
                raise self._timeout_error()
            done, _ = await asyncio.wait({future}, timeout=min(0.25, remaining))
            if done:
                try:
                    return future.result()
                except Cancelled:
                    if token.timed_out:  # e.g. it waited in the queue past the deadline
                        raise self._timeout_error() from None
                    raise APIError(499, f"cancelled: {token.reason}", code="cancelled") from None
            if is_disconnected is not None and await is_disconnected():
                token.cancel("the client disconnected")
                raise APIError(499, "the client disconnected", code="cancelled")

    def run_sync(self, fn: Callable[[CancelToken], T], *, prepare: Callable[[], object] | None = None) -> T:
        """The same admission, preparation and timeout for synchronous callers (the web UI's handlers)."""
        self.admit()
        token = CancelToken()
        deadline = time.monotonic() + self.timeout_s
        try:
            if prepare is not None:
                self._result(self._decoder.submit(self._prepare, prepare, token, deadline), token, deadline)
            return self._result(self._executor.submit(self._run, fn, token, deadline), token, deadline)
        finally:
            self.release()

    def _result(self, future, token: CancelToken, deadline: float):
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            token.cancel("timed out")
            future.add_done_callback(_collect)
            raise self._timeout_error() from None
        except Cancelled:
            if token.timed_out:
                raise self._timeout_error() from None
            raise

    def shutdown(self) -> None:
        for batcher in self.batchers:
            batcher.shutdown()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _collect(future) -> None:
    """Done-callback: retrieve a future's outcome so an abandoned one never logs 'never retrieved'."""
    if not future.cancelled():
        future.exception()
