"""Text-to-image requests denoised together: requests waiting for the model that ask for the same
size and the same sampler setting (preset, steps, guidance) run as one batch, every guidance branch
of every image in one packed forward per step (:meth:`UniMedVLPipeline.generate_images`).

One thread runs the batches.  It takes the oldest waiting request and every other waiting request
with the same setting, up to ``max_batch`` images (a request's ``n`` images count; a request with
more runs alone).  Each image keeps its own prompt and seed, so it is the image the request would
get alone, up to the float rounding of the packing.  A request cancelled mid-way (timeout, client
gone) leaves the batch at the next step; the others go on.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .schemas import ImageRequest
from .batch_queue import BatchQueue
from .model_thread import run_on
from .worker import Cancelled, CancelToken

log = logging.getLogger("unimedvl.serve")


@dataclass
class ImageJob:
    """One text-to-image request; ``future`` ends with its ``n`` :class:`GeneratedImage` results."""

    request: ImageRequest
    token: CancelToken
    future: Future = field(default_factory=Future)

    @property
    def setting(self) -> tuple:
        r = self.request
        return (r.width, r.height, r.preset, r.steps, r.guidance, r.cache)


class ImageBatcher(BatchQueue):
    name = "image"

    def __init__(self, pipeline, max_batch: int, model_thread=None):
        super().__init__("unimedvl-images")
        if max_batch < 1:
            raise ValueError(f"max_image_batch must be >= 1, got {max_batch}")
        self.pipeline, self.max_batch = pipeline, max_batch
        self.model_thread = model_thread  # a .model_thread.ModelThread: the denoising runs there
        self.active = 0  # images being denoised now
        self.batches = 0  # batches run (tests and metrics read them)
        self.largest_batch = 0
        self._start()

    def _take(self) -> list[ImageJob]:
        """The oldest waiting job and the waiting jobs that share its setting, within max_batch images."""
        first = self._waiting.popleft()
        group, images, rest = [first], first.request.n, deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.setting == first.setting and images + job.request.n <= self.max_batch:
                group.append(job)
                images += job.request.n
            else:
                rest.append(job)
        self._waiting = rest
        return group

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting:
                    self._wake.wait()
                if self._stopped:
                    break
                group = self._take()
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            for job in [job for job in group if job.token.cancelled]:
                _fail(job, Cancelled(job.token.reason))
            group = [job for job in group if not job.token.cancelled]
            if group:
                run_on(self.model_thread, self._run, group)
        for job in self._waiting:
            _fail(job, Cancelled("the server is shutting down"))

    def _run(self, group: list[ImageJob]) -> None:
        owner = [j for j, job in enumerate(group) for _ in range(job.request.n)]  # image -> its job
        first = group[0].request

        def check(_step: int, _total: int) -> None:
            if all(job.token.cancelled for job in group):
                raise Cancelled(group[0].token.reason)

        self.active = len(owner)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(owner))
        try:
            results = self.pipeline.generate_images(
                [group[j].request.prompt for j in owner],
                seeds=[job.request.seed + k for job in group for k in range(job.request.n)],
                preset=first.preset, height=first.height, width=first.width, steps=first.steps,
                cfg_text_scale=first.guidance, cache=first.cache, progress=check, keep=lambda i: not group[owner[i]].token.cancelled)
        except Exception as e:  # noqa: BLE001 - the batch's error is each of its requests' error
            for job in group:
                _fail(job, Cancelled(job.token.reason) if job.token.cancelled else e)
            return
        finally:
            self.active = 0
        for j, job in enumerate(group):
            mine = [r for r, o in zip(results, owner) if o == j]
            if job.token.cancelled or any(r is None for r in mine):
                _fail(job, Cancelled(job.token.reason or "cancelled"))
            else:
                job.future.set_result(mine)


def _fail(job: ImageJob, error: BaseException) -> None:
    if job.future.done():
        return
    if not job.future.running():
        if not job.future.set_running_or_notify_cancel():
            return
    job.future.set_exception(error)
