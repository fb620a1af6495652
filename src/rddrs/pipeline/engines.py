"""Engines run the tasks of a sweep (``rddrs.pipeline.sweep``): ``Inline`` in this process, one
after another; ``Local`` in a pool of processes on this machine (processes x threads <= cores;
on a GPU one process per group of GPUs); ``rddrs.pipeline.cluster.RayEngine`` on a Ray cluster.
Each only calls ``run_task``, so a shard's rows do not depend on the engine."""

from __future__ import annotations

import os
import signal
import sys
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path

from rddrs import RDDRSError
from rddrs.pipeline.files import Busy, one_line
from rddrs.pipeline.runspec import MEMORY
from rddrs.pipeline.shards import Task


@lru_cache(maxsize=4)
def _model(path: str, device: str, probabilities: bool):
    from rddrs.pipeline.models import load_model, resolve_device

    return load_model(path, device=resolve_device(device), probabilities=probabilities)


@lru_cache(maxsize=2)
def _test_set(data: str, dataset: str):
    from rddrs.pipeline.data import load_dataset

    return load_dataset(Path(data), dataset, train=False)


def run_task(task: Task, threads: int | None = None) -> dict:
    """Compute one task where it is called (a worker of any engine) and say how it went:
    ``{"status": "done" | "error", "message": ..., "retry": ..., "pid": ...}``; ``retry``: whether
    the same task can succeed later (its file was being written by another process)."""
    from rddrs.pipeline import allocator

    allocator.tune()  # a worker's entry point: large CPU buffers stay in the process
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = task.spec
    try:
        if spec.kind == MEMORY:
            from rddrs.pipeline.memory import apply_memory

            images, labels = _test_set(spec.data, spec.dataset)
            apply_memory(Path(spec.source), images, 0, progress=False, labels=labels)
        else:
            from rddrs.pipeline.runs import run_certification

            settings = spec.settings()
            images, labels = _test_set(spec.data, spec.dataset)
            if task.hi > len(images):
                raise RDDRSError(
                    f"test images {task.lo}..{task.hi - 1} reach outside the test set (0..{len(images) - 1})"
                )
            model = _model(settings.model, settings.device, settings.probabilities)
            run_certification(
                settings,
                model,
                images[task.lo : task.hi],
                labels[task.lo : task.hi],
                task.lo,
                task.path,
                spec.inputs_per_batch,
                spec.batch_size,
                progress=False,
                test_labels=labels,
            )
    except RDDRSError as err:
        return {"status": "error", "message": str(err), "retry": isinstance(err, Busy), "pid": os.getpid()}
    return {"status": "done", "pid": os.getpid()}


class Inline:
    """Tasks in this process, one after another (the chapters' engine)."""

    name = "inline"
    capacity = 1

    def __init__(self, threads: int | None = None):
        self.threads, self._queue = threads, []

    def submit(self, task: Task) -> None:
        self._queue.append(task)

    def wait(self, timeout: float) -> list[tuple[Task, dict]]:
        if not self._queue:
            return []
        task = self._queue.pop(0)
        return [(task, run_task(task, self.threads))]

    def close(self, cancel: bool = False) -> None:
        self._queue.clear()


#: prctl's option that has the kernel signal a process when its parent ends (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int) -> None:
    """Have the kernel kill this process (SIGKILL) when its parent ``parent`` ends, however it
    ends (kill -9 included), and end it now if the parent has ended already. Linux only (prctl);
    the signal comes when the parent's thread that started this process ends, so a pool must be
    used by the thread that started it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before prctl: init (or a subreaper) adopted this process
        os._exit(1)


def _init_worker(threads: int, gpus, parent: int, started, stopping) -> None:
    end_with_parent(parent)
    started.put(os.getpid())
    if stopping.is_set():  # the pool was cancelled while this worker started: it takes no task
        os._exit(0)
    if gpus is not None:  # before CUDA starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing lock, a named semaphore: a worker stopped at the
    # deadline would leave it to the resource tracker, which warns of a leak at exit
    tqdm.set_lock(threading.RLock())


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Local:
    """Tasks in a pool of processes on this machine: ``processes`` (default: cores // threads,
    so that processes x threads <= cores; on a GPU one process per ``gpus`` GPUs). A worker that
    dies (killed, out of memory) takes the pool with it: the pool is rebuilt and its tasks are
    started again, up to ``retries`` times each; they resume from their flushed rows. The workers
    end with this process, even when it is killed (``end_with_parent``); each reports its pid
    when it starts, so that ``close(cancel=True)`` can stop the ones running tasks."""

    name = "local"

    def __init__(
        self, processes: int | None = None, threads: int = 1, gpus: int = 0, device: str = "cpu", retries: int = 3
    ):
        self.threads, self.gpus, self.retries = max(1, int(threads)), int(gpus), int(retries)
        self.groups = None
        if device.startswith("cuda") and self.gpus > 0:
            import torch

            visible = [str(i) for i in range(torch.cuda.device_count())]
            if len(visible) < self.gpus:
                raise RDDRSError(f"{self.gpus} GPU(s) per task asked for, {len(visible)} visible")
            self.groups = [
                ",".join(visible[i : i + self.gpus]) for i in range(0, len(visible) - self.gpus + 1, self.gpus)
            ]
        limit = max(1, cores() // self.threads)
        if self.groups is not None:
            limit = min(limit, len(self.groups))
        self.capacity = min(limit, processes) if processes else limit
        self._running: dict[futures.Future, Task] = {}
        self._tries: dict[tuple, int] = {}
        self._pool = None
        self._pids: list[int] = []

    def _start(self):
        import multiprocessing
        from multiprocessing.managers import SyncManager

        context = multiprocessing.get_context("spawn")
        queue = None
        if self.groups is not None:
            manager = SyncManager(ctx=context)
            manager.start(end_with_parent, (os.getpid(),))
            queue = manager.Queue()
            for group in self.groups[: self.capacity]:
                queue.put(group)
        self._started, self._stopping = context.SimpleQueue(), context.Event()
        self._pool = futures.ProcessPoolExecutor(
            self.capacity,
            mp_context=context,
            initializer=_init_worker,
            initargs=(self.threads, queue, os.getpid(), self._started, self._stopping),
        )
        self._pids = []

    def submit(self, task: Task) -> None:
        if self._pool is None:
            self._start()
        self._tries[task.key] = self._tries.get(task.key, 0) + 1
        self._running[self._pool.submit(run_task, task, self.threads)] = task

    def wait(self, timeout: float) -> list[tuple[Task, dict]]:
        if not self._running:
            return []
        finished, _ = futures.wait(list(self._running), timeout=timeout, return_when=futures.FIRST_COMPLETED)
        results, broken = [], []
        for future in finished:
            task = self._running.pop(future)
            try:
                results.append((task, future.result()))
            except BrokenProcessPool:
                broken.append(task)
            except Exception as err:  # a bug or a resource failure inside the task
                results.append((task, {"status": "error", "message": one_line(err)}))
        if broken:
            broken += [self._running.pop(f) for f in list(self._running)]
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for task in broken:
                if self._tries.get(task.key, 0) > self.retries:
                    results.append(
                        (
                            task,
                            {
                                "status": "error",
                                "retry": True,
                                "message": f"its worker died {self._tries[task.key]} time(s)",
                            },
                        )
                    )
                else:
                    self.submit(task)
        return results

    def workers(self) -> list[int]:
        """The pids of the pool's workers that have started (they report themselves)."""
        while self._pool is not None and not self._started.empty():
            self._pids.append(self._started.get())
        return list(self._pids)

    def close(self, cancel: bool = False) -> None:
        """Shut the pool down: after its tasks end, or, with ``cancel``, at once (its workers are
        terminated; a worker still starting takes no task)."""
        if self._pool is not None:
            if cancel:
                self._stopping.set()  # before reading the pids: a worker reports, then looks
                for pid in self.workers():
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:  # reaped already (it died)
                        pass
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
