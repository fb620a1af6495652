"""Engines run the tasks of a sweep (``rddrs.pipeline.sweep``): ``Inline`` in this process, one
after another; ``Local`` in a pool of processes on this machine (processes x threads <= cores;
on a GPU one process per group of GPUs); ``rddrs.pipeline.cluster.RayEngine`` on a Ray cluster.
Each only calls ``run_task``, so a shard's rows do not depend on the engine."""

from __future__ import annotations

import os
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool

from rddrs import RDDRSError
from rddrs.pipeline.files import one_line
from rddrs.pipeline.sweep import Task, run_task


def _init_worker(threads: int, gpus) -> None:
    if gpus is not None:  # before CUDA starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


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
    started again, up to ``retries`` times each; they resume from their flushed rows."""

    name = "local"

    def __init__(self, processes: int | None = None, threads: int = 1, gpus: int = 0, device: str = "cpu",
                 retries: int = 3):
        self.threads, self.gpus, self.retries = max(1, int(threads)), int(gpus), int(retries)
        self.groups = None
        if device.startswith("cuda") and self.gpus > 0:
            import torch

            visible = [str(i) for i in range(torch.cuda.device_count())]
            if len(visible) < self.gpus:
                raise RDDRSError(f"{self.gpus} GPU(s) per task asked for, {len(visible)} visible")
            self.groups = [",".join(visible[i: i + self.gpus]) for i in range(0, len(visible) - self.gpus + 1, self.gpus)]
        limit = max(1, cores() // self.threads)
        if self.groups is not None:
            limit = min(limit, len(self.groups))
        self.capacity = min(limit, processes) if processes else limit
        self._running: dict[futures.Future, Task] = {}
        self._tries: dict[tuple, int] = {}
        self._pool = None

    def _start(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        queue = None
        if self.groups is not None:
            queue = context.Manager().Queue()
            for group in self.groups[: self.capacity]:
                queue.put(group)
        self._pool = futures.ProcessPoolExecutor(self.capacity, mp_context=context, initializer=_init_worker,
                                                 initargs=(self.threads, queue))

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
                    results.append((task, {"status": "error",
                                           "message": f"its worker died {self._tries[task.key]} time(s)"}))
                else:
                    self.submit(task)
        return results

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            if cancel:
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
