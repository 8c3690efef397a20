"""Image decoding in worker processes: ordered, bounded, and honest about what failed.

:class:`ImageDecoder` keeps one pool for its whole life (a shard worker decodes every shard
through the same processes, instead of paying a pool start per shard). Three kinds of failure
are told apart:

- the image's own fault: the decoder raises -> an error row (in :func:`imaging.decode_sample`);
- a worker dies or hangs on one image (a decoder crash on a hostile file): that image alone is
  retried in a fresh pool and, if it kills or hangs that one too, becomes an error row;
- the pool itself cannot work (workers die on a known-good image: a script without a
  ``__main__`` guard, no memory, no processes left): :class:`DecodePoolError`, so the shard
  fails and is retried later. Good images are never recorded as undecodable.

Every wait is bounded by ``timeout`` seconds per image.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

from mlmfilter.core import errors
from mlmfilter.core.processes import worker_initializer
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample

log = logging.getLogger(__name__)

#: seconds one image may take in a worker before the worker is presumed hung
DEFAULT_TIMEOUT = 120.0
#: seconds a closing pool's workers get to exit on their own before they are terminated
SHUTDOWN_GRACE = 1.0


#: the rule for a GPU judge (docs/benchmarks.md, "decode rate"): decoding one web-sized JPEG (~1000x750) to
#: 384 px takes ~16 ms of one core of the development machine (a 500x375 Flickr photo ~6 ms); a judge
#: at GPU speed takes ~100 pairs/s (the H100 target of the 1.5B judge, four metrics)
DECODE_MS_AT_384 = 16.0
GPU_JUDGE_PAIRS_PER_SECOND = 100.0
#: decoders kept ahead of the judge by this factor (images vary in size; a worker also pickles its result)
DECODE_HEADROOM = 1.5


def decode_workers_for(
    pairs_per_second: float = GPU_JUDGE_PAIRS_PER_SECOND,
    ms_per_image: float = DECODE_MS_AT_384,
    cpus: int | None = None,
) -> int:
    """Decode processes that keep a consumer of ``pairs_per_second`` fed: ``ceil(rate x ms / 1000 x
    headroom)``, at least 1, and at most the CPUs less two (the scoring process and its image processor)."""
    needed = math.ceil(pairs_per_second * ms_per_image / 1000.0 * DECODE_HEADROOM)
    available = (cpus if cpus is not None else len(os.sched_getaffinity(0))) - 2
    return max(1, min(needed, available))


class DecodePoolError(RuntimeError):
    """Decoding worker processes cannot run at all; the shard fails (it is not the images' fault)."""


def _pool_context() -> multiprocessing.context.BaseContext:
    # not fork: the parent may hold torch threads and CUDA state that a fork would copy broken.
    # Not forkserver either: its server outlives a killed parent and keeps its children (and the
    # parent's stdout) alive; spawned workers are the parent's own children and die with it.
    # The pool lives as long as its decoder, so the spawn start-up is paid once per worker.
    return multiprocessing.get_context("spawn")


def _probe_sample() -> Sample:
    """A small known-good JPEG: what a working pool always decodes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, format="JPEG")
    return Sample(uid="0" * 32, shard="probe", key="probe", image_bytes=buffer.getvalue())


class ImageDecoder:
    """Decodes samples in order; ``workers=0`` decodes inline. Call :meth:`close` when done."""

    def __init__(self, spec: DecodeSpec, workers: int = 1, prefetch: int = 64, timeout: float = DEFAULT_TIMEOUT):
        self.spec = spec
        self.workers = workers
        self.prefetch = max(prefetch, workers)
        self.timeout = timeout
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # bumped on every pool restart

    def decode(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        """Decoded samples in input order; at most ``prefetch`` in flight."""
        if self.workers <= 0:
            for sample in samples:
                yield decode_sample(sample, self.spec)
            return
        pending: deque[tuple[Sample, Future | None, int]] = deque()
        try:
            for sample in samples:
                pending.append(self._submit(sample))
                if len(pending) >= self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        except BaseException:
            # an abandoned stream (error, generator closed) leaves futures we will never read
            for _, future, _ in pending:
                if future is not None:
                    future.cancel()
            raise

    def start(self) -> None:
        """Spawn the worker processes now rather than on the first image.

        A spawned worker takes 0.1-0.2 s to start and import PIL; started while the stage loads
        its models, that time is hidden instead of being waited for by the first chunk.
        """
        if self.workers <= 0 or self._pool is not None:
            return
        pool = self._ensure_pool()
        probe = _probe_sample()
        for _ in range(self.workers):  # concurrent.futures spawns one process per pending task
            pool.submit(decode_sample, probe, self.spec)

    def close(self) -> None:
        self._shutdown()

    def worker_pids(self) -> list[int]:
        """Process ids of the live decoding workers (empty before the first image or when inline)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(pid for pid, process in processes.items() if process.is_alive())

    def __enter__(self) -> "ImageDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _submit(self, sample: Sample) -> tuple[Sample, Future | None, int]:
        if not sample.ok:  # nothing to decode: keep its place in the order
            return sample, None, self._generation
        try:
            return sample, self._ensure_pool().submit(decode_sample, sample, self.spec), self._generation
        except BrokenProcessPool:  # a worker died since the last collect
            self._restart()
            return sample, self._ensure_pool().submit(decode_sample, sample, self.spec), self._generation

    def _collect(self, sample: Sample, future: Future | None, generation: int) -> Sample:
        if future is None:
            return sample
        try:
            return future.result(timeout=self.timeout)
        except (BrokenProcessPool, FutureTimeout):
            return self._retry_alone(sample, generation)

    def _retry_alone(self, sample: Sample, generation: int) -> Sample:
        if generation == self._generation:
            self._restart()
        try:
            return self._ensure_pool().submit(decode_sample, sample, self.spec).result(timeout=self.timeout)
        except (BrokenProcessPool, FutureTimeout) as exc:
            self._restart()
            self._check_pool_works(cause=exc)
            how = "hung" if isinstance(exc, FutureTimeout) else "died"
            code = errors.DECODE_TIMEOUT if isinstance(exc, FutureTimeout) else errors.UNDECODABLE_IMAGE
            return sample.fail(code, f"the decoder process {how} on this image twice (timeout {self.timeout:.0f} s)")

    def _check_pool_works(self, cause: BaseException) -> None:
        """A fresh pool must decode a known-good image; if not, the pool is what is broken."""
        probe = _probe_sample()
        try:
            result = self._ensure_pool().submit(decode_sample, probe, self.spec).result(timeout=self.timeout)
            if result.ok:
                return
            detail = f"{result.error}: {result.error_detail}"
        except (BrokenProcessPool, FutureTimeout, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
        self._restart()
        raise DecodePoolError(
            "image-decoding worker processes fail on a known-good image "
            f"({detail}; first failure: {type(cause).__name__}: {cause}). If this is a Python script, put "
            'the mlmfilter call under `if __name__ == "__main__":`, or decode inline (decode_workers=0)'
        )

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_pool_context(),
                initializer=worker_initializer,
                initargs=(os.getpid(),),
            )
        return self._pool

    def _restart(self) -> None:
        self._shutdown()
        self._generation += 1

    def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        # Workers get a moment to finish and exit on their own: one killed while it writes a decoded
        # image to the result pipe leaves half a message there, on which the pool's manager thread
        # then waits forever, and the interpreter with it at exit (it joins that thread). Only a
        # worker still running after the grace (hung on an image, or idle behind a hung one) is ended.
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.terminate()


def decode_stream(
    samples: Iterable[Sample], spec: DecodeSpec, workers: int = 1, prefetch: int = 64
) -> Iterator[Sample]:
    """Decode samples in order. ``workers=0`` decodes inline; otherwise a process pool does
    (see :class:`mlmfilter.images.pool.ImageDecoder`, which a long-lived caller keeps open).

    At most ``prefetch`` samples are in flight, so memory stays bounded however long the
    input is. Closing the generator early shuts the pool down.
    """
    with ImageDecoder(spec, workers, prefetch) as decoder:
        yield from decoder.decode(samples)
