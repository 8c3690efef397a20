"""Image decoding in worker processes: ordered, bounded, and honest about what failed.

:class:`ImageDecoder` keeps its worker processes for its whole life (a shard worker decodes
every shard through the same processes, instead of paying a pool start per shard). Three kinds
of failure are told apart:

- the image's own fault: the decoder raises -> an error row (in :func:`imaging.decode_sample`);
- a worker dies or hangs on one image (a decoder crash on a hostile file): that image alone is
  retried in a fresh process and, if it kills or hangs that one too, becomes an error row; the
  other images the lost worker held are sent again to its replacement;
- the pool itself cannot work (workers die on a known-good image: a script without a
  ``__main__`` guard, no memory, no processes left): :class:`DecodePoolError`, so the shard
  fails and is retried later. Good images are never recorded as undecodable.

Every wait on a worker is bounded. Each worker has its own socket pair; the parent reads a
result (an 8-byte length, then the pickled sample) with a deadline of ``timeout`` seconds per
image, from that worker's socket alone, so a worker that dies in the middle of writing a decoded
image back (inside the length or inside the body) is seen as soon as its socket ends, and one
that stops is seen at the deadline. (``concurrent.futures`` reads every worker's results in one
manager thread that blocks forever on a half-written message, and the interpreter with it at
exit: it is not used here.) Tasks go to the workers through one feeding thread per worker, so
the parent never blocks on a worker that does not read.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import pickle
import queue
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from mlmfilter.core import errors
from mlmfilter.core.processes import children_ignore_sigint, worker_initializer
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample

log = logging.getLogger(__name__)

#: seconds one image may take in a worker before the worker is presumed hung
DEFAULT_TIMEOUT = 120.0
#: seconds a closing pool's workers get to exit on their own before they are killed
SHUTDOWN_GRACE = 1.0
#: a result's length prefix (bytes of the pickled reply that follow it)
_FRAME = struct.Struct("!Q")
#: no decoded image is this big (the pixel limit is ~89 M pixels, 268 MB as RGB): a longer length is garbage
_MAX_FRAME = 1 << 34
#: test-only: ``"length:KEY"`` or ``"body:KEY"`` makes a worker die after writing part of the length
#: or part of the body of sample KEY's result, as a worker killed at that point would
TEAR_ENV = "MLMFILTER_TEST_TEAR_DECODE_RESULT"


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


class _WorkerLost(Exception):
    """A worker died (its socket ended, maybe in the middle of a result) or passed the deadline."""

    def __init__(self, hung: bool, detail: str):
        super().__init__(detail)
        self.hung = hung
        self.detail = detail


def _pool_context() -> multiprocessing.context.BaseContext:
    # not fork: the parent may hold torch threads and CUDA state that a fork would copy broken.
    # Not forkserver either: its server outlives a killed parent and keeps its children (and the
    # parent's stdout) alive; spawned workers are the parent's own children and die with it.
    # The workers live as long as their decoder, so the spawn start-up is paid once per worker.
    return multiprocessing.get_context("spawn")


def _probe_sample() -> Sample:
    """A small known-good JPEG: what a working pool always decodes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, format="JPEG")
    return Sample(uid="0" * 32, shard="probe", key="probe", image_bytes=buffer.getvalue())


# -- worker side ----------------------------------------------------------------------------------
def _serve(conn: Any, spec: DecodeSpec, initializer: Any, parent: int) -> None:
    """A decoding process: read a sample, decode it, write the result back; until the socket ends."""
    initializer(parent)  # die with the parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    tear_point, _, tear_key = os.environ.get(TEAR_ENV, "").partition(":")
    fd = conn.fileno()
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the decoder (or died)
        sample = pickle.loads(data)
        try:
            reply: tuple[str, Any] = ("ok", decode_sample(sample, spec))
        except Exception as exc:  # decode_sample turns bad images into error rows: this is a bug
            reply = ("raised", f"{type(exc).__name__}: {exc}")
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _FRAME.pack(len(payload))
        if tear_key and reply[0] == "ok" and reply[1].key == tear_key:
            _write_all(fd, frame[:3] if tear_point == "length" else frame + payload[: len(payload) // 2])
            os._exit(1)
        _write_all(fd, frame)
        _write_all(fd, payload)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- parent side ----------------------------------------------------------------------------------
class _Worker:
    """One decoding process, its own socket, and the thread that feeds it samples."""

    def __init__(self, spec: DecodeSpec):
        ctx = _pool_context()
        parent_end, child_end = ctx.Pipe(duplex=True)
        # looked up now, not at import: tests replace it to make a pool that cannot start
        self.process = ctx.Process(
            target=_serve, args=(child_end, spec, worker_initializer, os.getpid()), name="mlmfilter-decode", daemon=True
        )
        try:
            with children_ignore_sigint():  # Ctrl-C is the parent's to handle: no traceback per worker
                self.process.start()
        except OSError as exc:
            parent_end.close()
            raise DecodePoolError(f"cannot start an image-decoding process: {exc}") from exc
        finally:
            child_end.close()  # only the child holds its end: its death ends the socket
        self.conn = parent_end
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, name="mlmfilter-decode-feed", daemon=True)
        self._feeder.start()
        self._reaped = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, sample: Sample) -> None:
        self._outbox.put(pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))

    def _feed(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the worker is gone; reading its socket says so

    def receive(self, timeout: float) -> Sample:
        """The next result of this worker, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        header = self._read(_FRAME.size, deadline, "its result's length")
        (size,) = _FRAME.unpack(header)
        if size > _MAX_FRAME:
            raise _WorkerLost(False, f"the decoder process wrote a garbled result (length {size})")
        body = self._read(size, deadline, f"its {size}-byte result")
        try:
            status, value = pickle.loads(body)
        except Exception as exc:
            raise _WorkerLost(False, f"the decoder process wrote a garbled result ({type(exc).__name__})") from None
        if status != "ok":
            raise RuntimeError(f"image decoding raised in a worker process: {value}")
        return value

    def _read(self, size: int, deadline: float, what: str) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        poller = select.poll()
        poller.register(self.conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _WorkerLost(
                    True, f"the decoder process gave no result within the timeout ({got} bytes of {what} arrived)"
                )
            if not poller.poll(max(1, int(left * 1000))):
                continue  # the deadline is checked again above
            try:
                count = os.readv(self.conn.fileno(), [view[got:]])
            except OSError as exc:
                count, error = 0, exc
            else:
                error = None
            if count == 0:
                torn = got > 0 or what != "its result's length"
                because = f"; {error}" if error else ""
                raise _WorkerLost(
                    False,
                    f"the decoder process died{' while writing its result' if torn else ''} "
                    f"({got} bytes of {what} arrived{because})",
                )
            got += count
        return bytes(buffer)

    def stop(self) -> None:
        """Let the process exit on its own (its socket ends); see :meth:`reap`."""
        self._outbox.put(None)
        # Shut the socket down rather than close it: the feeder thread may be inside a write, and a
        # closed (or reused) descriptor under it is a crash or a write to another file. reap() closes.
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as end:
                end.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def reap(self, deadline: float) -> None:
        """Wait for the exit until ``deadline``, then kill (a hung or stopped worker ignores SIGTERM)."""
        if self._reaped:
            return
        self._reaped = True
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._feeder.join(1)  # its write failed with the worker gone (or the socket shut down)
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.process.close()
        except ValueError:
            pass  # still running after SIGKILL + 5 s (uninterruptible I/O): the OS reaps it

    def kill(self) -> None:
        self.stop()
        self.reap(time.monotonic())


@dataclass
class _Job:
    sample: Sample
    worker: _Worker | None  # None: nothing to decode (an earlier error), the sample passes through
    slot: int = -1


class ImageDecoder:
    """Decodes samples in order; ``workers=0`` decodes inline. Call :meth:`close` when done."""

    def __init__(self, spec: DecodeSpec, workers: int = 1, prefetch: int = 64, timeout: float = DEFAULT_TIMEOUT):
        self.spec = spec
        self.workers = workers
        self.prefetch = max(prefetch, workers)
        self.timeout = timeout
        self._slots: list[_Worker | None] = [None] * max(workers, 0)
        self._next_slot = 0

    def decode(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        """Decoded samples in input order; at most ``prefetch`` in flight."""
        if self.workers <= 0:
            for sample in samples:
                yield decode_sample(sample, self.spec)
            return
        pending: deque[_Job] = deque()
        try:
            for sample in samples:
                pending.append(self._submit(sample))
                if len(pending) >= self.prefetch:
                    yield self._collect(pending.popleft(), pending)
            while pending:
                yield self._collect(pending.popleft(), pending)
        except BaseException:
            # an abandoned stream (error, generator closed) leaves results we will never read in
            # the workers' sockets: those workers are replaced, so the next stream starts clean
            for worker in {id(job.worker): job.worker for job in pending if job.worker is not None}.values():
                self._retire(worker)
            raise

    def start(self) -> None:
        """Spawn the worker processes now rather than on the first image.

        A spawned worker takes 0.1-0.2 s to start and import PIL; started while the stage loads
        its models, that time is hidden instead of being waited for by the first chunk.
        """
        for slot in range(len(self._slots)):
            self._worker(slot)

    def close(self) -> None:
        workers = [w for w in self._slots if w is not None]
        self._slots = [None] * len(self._slots)
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for worker in workers:
            worker.reap(deadline)

    def worker_pids(self) -> list[int]:
        """Process ids of the live decoding workers (empty before the first image or when inline)."""
        return sorted(w.pid for w in self._slots if w is not None and w.pid is not None and w.process.is_alive())

    def __enter__(self) -> "ImageDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _worker(self, slot: int) -> _Worker:
        worker = self._slots[slot]
        if worker is None:
            worker = self._slots[slot] = _Worker(self.spec)
        return worker

    def _retire(self, worker: _Worker) -> None:
        """Kill ``worker``; its slot gets a fresh process when next used."""
        for slot, held in enumerate(self._slots):
            if held is worker:
                self._slots[slot] = None
        worker.kill()

    def _submit(self, sample: Sample) -> _Job:
        if not sample.ok:  # nothing to decode: keep its place in the order
            return _Job(sample, None)
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self._slots)
        worker = self._worker(slot)
        worker.send(sample)
        return _Job(sample, worker, slot)

    def _collect(self, job: _Job, pending: deque[_Job]) -> Sample:
        if job.worker is None:
            return job.sample
        try:
            return job.worker.receive(self.timeout)
        except _WorkerLost as lost:
            log.debug("decode worker %s lost on %s/%s: %s", job.worker.pid, job.sample.shard, job.sample.key, lost)
            lost_worker = job.worker
            self._retire(lost_worker)
            result = self._retry_alone(job.sample, job.slot)
            # the lost worker's other images were not at fault: its replacement decodes them, in order
            for other in pending:
                if other.worker is lost_worker:
                    other.worker = self._worker(other.slot)
                    other.worker.send(other.sample)
            return result

    def _retry_alone(self, sample: Sample, slot: int) -> Sample:
        worker = self._worker(slot)
        worker.send(sample)
        try:
            return worker.receive(self.timeout)
        except _WorkerLost as again:
            self._retire(worker)
            self._check_pool_works(slot, cause=again)
            how = "hung" if again.hung else "died"
            code = errors.DECODE_TIMEOUT if again.hung else errors.UNDECODABLE_IMAGE
            return sample.fail(
                code, f"the decoder process {how} on this image twice (timeout {self.timeout:.0f} s; {again.detail})"
            )

    def _check_pool_works(self, slot: int, cause: _WorkerLost) -> None:
        """A fresh worker must decode a known-good image; if not, the pool is what is broken."""
        worker = self._worker(slot)
        worker.send(_probe_sample())
        try:
            result = worker.receive(self.timeout)
            if result.ok:
                return
            detail = f"{result.error}: {result.error_detail}"
        except _WorkerLost as exc:
            detail = exc.detail
        self._retire(worker)
        raise DecodePoolError(
            "image-decoding worker processes fail on a known-good image "
            f"({detail}; first failure: {cause.detail}). If this is a Python script, put "
            'the mlmfilter call under `if __name__ == "__main__":`, or decode inline (decode_workers=0)'
        )


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
