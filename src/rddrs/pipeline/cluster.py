"""The Ray engine of the run driver: each shard a Ray task with its CPUs and GPUs.

``RayEngine`` joins a running Ray cluster (``address``, e.g. ``"auto"`` on a node of one, or
the one this process already started), or starts a local one. Every shard is a call of
``engines.run_task`` as a Ray task with ``num_cpus``/``num_gpus`` and ``max_retries``: when the
worker process running it dies (killed, lost node), Ray starts the task again, and the shard
resumes from the rows it had flushed. The driver (``sweep.execute``) merges what comes back.

What a cluster needs: ``rddrs`` (with the ``cluster`` extra) installed on every node, and the
results, data and models directories at the same paths on every node (a shared file system;
the driver passes absolute paths). Ray is imported only here.
"""

from __future__ import annotations

import time

from rddrs import RDDRSError
from rddrs.pipeline.engines import cores, run_task
from rddrs.pipeline.files import one_line
from rddrs.pipeline.shards import Task

#: object store of a local cluster started here: shards return a few numbers, not arrays
LOCAL_OBJECT_STORE = 300 * 2**20


def _ray():
    try:
        import ray
    except ImportError:
        raise RDDRSError("--engine ray needs Ray: pip install 'rddrs[cluster]'") from None
    return ray


class RayEngine:
    """Shards as Ray tasks of ``cpus`` CPUs and ``gpus`` GPUs each, retried ``retries`` times
    after a worker's death. ``local_cpus``: CPUs of a local cluster started here (default: this
    machine's cores)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        cpus: float = 1,
        gpus: float = 0,
        retries: int = 3,
        local_cpus: int | None = None,
    ):
        ray = self.ray = _ray()
        self.cpus, self.gpus = float(cpus), float(gpus)
        self.started = False
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(
                        num_cpus=local_cpus or cores(),
                        object_store_memory=LOCAL_OBJECT_STORE,
                        include_dashboard=False,
                        log_to_driver=False,
                    )
                    self.started = True
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise RDDRSError(
                    f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'} ({one_line(err)})"
                ) from None
        remote = ray.remote(run_task)
        self._task = remote.options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=int(retries))
        self._memory = remote.options(num_cpus=self.cpus, num_gpus=0, max_retries=int(retries))  # on the CPU
        self._refs: dict = {}
        self._capacity, self._checked = 1, 0.0
        if self.gpus > 0 and not ray.cluster_resources().get("GPU"):
            raise RDDRSError(f"{self.gpus:g} GPU(s) per task asked for, but the Ray cluster has no GPU")

    @property
    def capacity(self) -> int:
        """Tasks the cluster can run at once (its resources now, re-read every few seconds)."""
        if time.monotonic() - self._checked > 5:
            have = self.ray.cluster_resources()
            fits = [have.get("CPU", 0) / self.cpus] if self.cpus > 0 else []
            if self.gpus > 0:
                fits.append(have.get("GPU", 0) / self.gpus)
            self._capacity = max(1, int(min(fits))) if fits else 1
            self._checked = time.monotonic()
        return self._capacity

    def submit(self, task: Task) -> None:
        threads = max(1, int(self.cpus))
        remote = self._memory if task.spec.kind == "memory" else self._task
        self._refs[remote.remote(task, threads)] = task

    def wait(self, timeout: float) -> list[tuple[Task, dict]]:
        if not self._refs:
            return []
        ray = self.ray
        ready, rest = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        results = []
        for ref in ready:
            task = self._refs.pop(ref)
            try:
                results.append((task, ray.get(ref)))
            except ray.exceptions.RayError as err:  # retries exhausted, or an error inside the task
                died = not isinstance(err, ray.exceptions.RayTaskError)  # its worker or node, not the task
                results.append((task, {"status": "error", "message": one_line(err, 500), "retry": died}))
        return results

    def close(self, cancel: bool = False) -> None:
        """Forget the tasks; with ``cancel``, kill their workers first and wait (a minute at most)
        until they are gone, so that no cancelled task writes after its shard is merged."""
        if cancel and self._refs:
            for ref in list(self._refs):
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass
            self.ray.wait(list(self._refs), num_returns=len(self._refs), timeout=60)
        self._refs.clear()
        if self.started:
            self.ray.shutdown()
            self.started = False
