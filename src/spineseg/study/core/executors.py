"""Where a stage's run grid runs: here, one run after another, or as Dask tasks on many processes.

With Dask each training run is one task. A `LocalCluster` uses this machine (one worker per GPU, or
``executor.workers`` processes on a CPU), a `dask_jobqueue.SLURMCluster` a SLURM cluster, and an
``address`` an existing scheduler. A GPU task asks for the worker resource ``GPU`` so that no worker
trains two runs on one GPU. A task lost with its worker is retried (one that raises is not) and resumes
from its last epoch checkpoint (the run store and the data must be on a filesystem every worker sees). Either way a run
that raises is reported, with its stage, model and seed, after every other run has finished.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from spineseg.errors import ConfigError, SpinesegError
from spineseg.study.core.config import ExecutorSection


class RunFailed(SpinesegError, RuntimeError):
    """One or more runs of a grid raised; the others finished."""


class Executor(Protocol):
    def map(self, fn: Callable, items: Sequence, label: Callable[[Any], str] = str) -> list: ...


def _raise_failures(failures: dict[str, BaseException]) -> None:
    if failures:
        lines = "; ".join(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                          for name, exc in failures.items())
        raise RunFailed(f"{len(failures)} run(s) failed, the others finished — {lines}") from next(iter(failures.values()))


class SequentialExecutor:
    """Runs tasks one after another in this process, with an overall progress bar."""

    def __init__(self, desc: str = "runs"):
        self.desc = desc

    def map(self, fn: Callable, items: Sequence, label: Callable[[Any], str] = str) -> list:
        results, failures = [None] * len(items), {}
        for index, item in enumerate(tqdm(items, desc=self.desc, unit="run")):
            try:
                results[index] = fn(item)
            except Exception as exc:
                failures[label(item)] = exc
        _raise_failures(failures)
        return results


class _Raised:
    """A task's exception, returned as its value: Dask retries only tasks lost with their worker."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _in_worker(fn: Callable, item: Any, threads: int, gpus: int) -> Any:
    """Run one task inside a Dask worker: its torch threads, and its own GPU when the worker has one."""
    import torch
    from distributed import get_worker

    torch.set_num_threads(threads)
    if gpus and torch.cuda.is_available():
        name = get_worker().name
        torch.cuda.set_device(int(name) % torch.cuda.device_count() if str(name).isdigit() else 0)
    try:
        return fn(item)
    except Exception as exc:
        return _Raised(exc)


def check_executor(section: ExecutorSection) -> None:
    """Refuse a cluster that cannot start here: without ``sbatch`` a SLURM cluster's jobs are never submitted,
    and Dask would wait for their workers forever without a word."""
    if section.kind == "dask" and not section.address and section.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor.cluster = 'slurm' but sbatch is not on PATH: run on a SLURM login node, give "
                          "executor.address of a running Dask scheduler, or use executor.cluster: local")


class DaskExecutor:
    """Each item one Dask task; the bar counts runs as they finish."""

    def __init__(self, section: ExecutorSection, desc: str = "runs"):
        check_executor(section)
        self.section = section
        self.desc = desc

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from distributed import Client

        section = self.section
        if section.address:
            with Client(section.address) as client:
                yield client
            return
        with self._cluster() as cluster, Client(cluster) as client:
            if section.cluster == "slurm":
                cluster.scale(jobs=section.slurm.jobs)
            yield client

    def _cluster(self):
        section = self.section
        if section.cluster == "slurm":
            from dask_jobqueue import SLURMCluster

            slurm = section.slurm
            extra = [f"--resources GPU={slurm.gpus}"] if slurm.gpus else []
            return SLURMCluster(queue=slurm.queue or None, account=slurm.account or None, walltime=slurm.walltime,
                                cores=slurm.cores, memory=slurm.memory, processes=1,
                                job_extra_directives=list(slurm.job_extra_directives), worker_extra_args=extra)
        import torch
        from distributed import LocalCluster

        gpus = torch.cuda.device_count()
        workers = section.workers or gpus or 1
        resources = {"GPU": 1} if gpus else None
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, resources=resources,
                            dashboard_address=None, silence_logs=logging.ERROR)

    def _gpus_per_task(self, client) -> int:
        offered = max((info.get("resources", {}).get("GPU", 0) for info in client.scheduler_info()["workers"].values()),
                      default=0)
        if offered and self.section.gpus_per_task > offered:  # no worker could ever take such a task
            raise ConfigError(f"executor.gpus_per_task {self.section.gpus_per_task}: the workers offer at most "
                              f"{offered:g} GPU(s) each")
        return self.section.gpus_per_task if offered else 0

    def map(self, fn: Callable, items: Sequence, label: Callable[[Any], str] = str) -> list:
        from distributed import as_completed

        if not items:
            return []
        with self.client() as client:
            gpus = self._gpus_per_task(client)
            token = uuid.uuid4().hex[:8]
            futures = {client.submit(_in_worker, fn, item, self.section.threads_per_worker, gpus, pure=False,
                                     key=f"spineseg-{token}-{index}", retries=self.section.retries,
                                     resources={"GPU": gpus} if gpus else None): index
                       for index, item in enumerate(items)}
            results, failures = [None] * len(items), {}
            for future in tqdm(as_completed(futures), total=len(futures), desc=self.desc, unit="run"):
                index = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # lost with its worker more often than `retries` allows
                    result = _Raised(exc)
                if isinstance(result, _Raised):
                    failures[label(items[index])] = result.exc
                else:
                    results[index] = result
        _raise_failures(failures)
        return results


def make_executor(section: ExecutorSection, desc: str) -> Executor:
    return DaskExecutor(section, desc) if section.kind == "dask" else SequentialExecutor(desc)
