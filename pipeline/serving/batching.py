"""Micro-batching: requests that arrive while the model runs share its next call.

There is no waiting window: a lone small request (the caller says whether it is alone) runs at
once on the event loop, without a hop to another thread; under load, everything queued while one
batch runs becomes the next batch (up to `max_images`). Batches run on one worker thread, which
ONNX Runtime lets run beside the event loop (it releases the GIL), so decoding the next requests
overlaps with inference. The model never runs on two threads at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

Predict = Callable[[np.ndarray], Any]  # returns rows the batcher slices per request: an array, or served.Answers
INLINE_MAX_IMAGES = 8  # a lone request of at most this many images runs on the event loop (about 0.1 ms each)


class MicroBatcher:
    def __init__(self, predict: Predict, max_images: int) -> None:
        self.predict = predict
        self.max_images = max_images
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.busy = False  # a batch is on the worker thread

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.worker = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.worker:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def __call__(self, images: np.ndarray, alone: bool = False) -> np.ndarray:
        """The model's rows for `images`; `alone`: no other request is in the server."""
        if alone and not self.busy and not self.pending and len(images) <= INLINE_MAX_IMAGES:
            return self.predict(images)
        future = asyncio.get_running_loop().create_future()
        self.pending.append((images, future))
        self.wakeup.set()
        return await future

    def take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The next batch: queued requests in arrival order, up to max_images (at least one)."""
        taken, total = [], 0
        while self.pending and (not taken or total + len(self.pending[0][0]) <= self.max_images):
            images, future = self.pending.pop(0)
            if not future.done():  # the client gave up or timed out
                taken.append((images, future))
                total += len(images)
        return taken

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            jobs = self.take()
            if not jobs:
                continue
            batch = jobs[0][0] if len(jobs) == 1 else np.concatenate([images for images, _ in jobs])
            self.busy = True
            try:
                outputs = await loop.run_in_executor(self.executor, self.predict, batch)
            except Exception as error:  # a model failure fails this batch's requests, not the server
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self.busy = False
            start = 0
            for images, future in jobs:
                if not future.done():
                    future.set_result(outputs[start:start + len(images)])
                start += len(images)
