"""Cells in other processes: ``fractalbench run --jobs N`` on this machine, or one submitit job per
cell (``--executor local``, ``--executor slurm``).

Every cell runs in a process of its own and writes its own cell file (atomically, as in the
sequential path); this process only launches, waits, prints one line per finished cell and rewrites
``results.csv``/``results.json``. A cell whose process dies before writing its file (a crash, a
signal, an out-of-memory kill) gets an error record naming the exit code and its log. Finished
cells are skipped (resume), and Ctrl-C stops every running cell and keeps the finished ones.

Executors:

- ``process``: up to N fresh Python processes (spawned, not forked: no CUDA or thread-pool state
  is inherited, and the caller's ``__main__`` is not imported again). A process runs in its own
  session, so Ctrl-C reaches only ``fractalbench run``, which stops it with SIGTERM; it also gets
  SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a killed ``fractalbench run`` leaves no
  cell running. Its output goes to ``RUN/logs/<cell>.log``.
- ``local`` / ``slurm``: submitit's LocalExecutor / Slurm; at most N jobs at a time (Slurm: every
  cell at once when N is not given). Job resources come from the suite's ``resources:`` section;
  logs are ``RUN/submitit/<job id>_0_log.out|err``. A job that is preempted or reaches ``timeout_min`` is
  requeued by submitit (:meth:`CellJob.checkpoint`) and resumes from its last epoch checkpoint.

Pinning (:func:`placement`): a cell takes the lowest free job slot k (0..N-1), so the first N cells
get slots 0..N-1. On CUDA, a cell on ``cuda`` sees only GPU k mod G (``CUDA_VISIBLE_DEVICES``, G =
the GPUs this process sees), so no two running cells share a GPU while N <= G; a cell on
``cuda:I`` sees every GPU and uses GPU I. On the CPU each cell sets ``torch.set_num_threads(max(1,
T // N))``, T being this process's ``torch.get_num_threads()`` (OMP_NUM_THREADS when set, else
the number of cores). On Slurm the scheduler assigns GPUs and a cell uses ``resources.cpus`` threads.

Data: the splits this process loaded (for the suite's checks) travel with the job when they pickle
to at most ``PASS_DATA_MB`` MiB (the digits: 2 MiB, which saves each cell the ~2 s of importing
scikit-learn and decoding them); larger ones (CIFAR-10: 150 MiB or more) are loaded anew in the
cell's process (``load_dataset`` is deterministic, so both give the same splits). Models
registered at run time (not by a ``baselines`` module) travel with the job (cloudpickle), so a
model registered by a test or script also builds in the cell's process.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractalbench.harness.cells import Cell, cell_meta, dependencies, error_record, run_cell
from fractalbench.harness.results import RunStore

EXECUTORS = ("process", "local", "slurm")
LOG_DIR = "logs"  # RUN/logs/<cell_id>.log: the output of a cell's process (executor "process")
SUBMITIT_DIR = "submitit"  # RUN/submitit/: submitit's pickles and logs, named by job id
PASS_DATA_MB = 64  # splits that pickle to at most this many MiB go with each job; larger ones are reloaded there
STOP_GRACE_S = 10.0  # after Ctrl-C, how long a cell's process may take to stop before it is killed


def check_executor(executor: str, jobs: int | None) -> None:
    """ValueError (one line) when ``executor`` is unknown, ``jobs`` is below 1 or Slurm is missing."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not allowed; allowed: {', '.join(EXECUTORS)}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if executor == "slurm" and missing:
        raise ValueError(f"--executor slurm needs Slurm (`{'`, `'.join(missing)}` not on PATH); use --executor local "
                         "or --jobs N on this machine")


def threads_per_job(jobs: int) -> int:
    """The torch threads of each of ``jobs`` concurrent cells: max(1, T // jobs), T = this process's threads."""
    import torch

    return max(1, torch.get_num_threads() // max(1, jobs))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries ([] when CUDA is absent)."""
    import torch

    if not torch.cuda.is_available():
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class Placement:
    """Where a cell runs: its torch threads (None: unchanged) and ``CUDA_VISIBLE_DEVICES`` (None: unchanged)."""

    threads: int | None = None
    cuda_visible: str | None = None


def placement(device: str, slot: int, threads: int | None, gpus: list[str]) -> Placement:
    """The rule of the module docstring: a ``cuda`` cell in slot k sees GPU k mod len(gpus), a
    ``cuda:I`` cell sees every GPU, a CPU cell's GPUs are left as they are."""
    if device == "cuda" and gpus:
        return Placement(threads, gpus[slot % len(gpus)])
    if device.startswith("cuda") and gpus:
        return Placement(threads, ",".join(gpus))
    return Placement(threads, None)


def execution_info(executor: str, jobs: int | None) -> dict[str, Any]:
    """What environment.json records about how the cells ran (executor, concurrency, threads per cell)."""
    info: dict[str, Any] = {"executor": executor, "jobs": jobs}
    if executor != "slurm":
        info["threads_per_cell"] = threads_per_job(jobs or 1)
    return info


def _portable_splits(splits: dict[Any, Any]) -> dict[Any, bytes]:
    """dataset -> its pickled splits when they pickle to at most PASS_DATA_MB MiB, else b"" (reloaded)."""
    out = {}
    for dataset, data in splits.items():
        try:
            blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - whatever does not pickle is loaded in the cell's process
            blob = b""
        out[dataset] = blob if len(blob) <= PASS_DATA_MB * 2**20 else b""
    return out


def _runtime_registrations(names: set[str]) -> bytes:
    """The registry entries of ``names`` that no ``baselines`` module makes (cloudpickled)."""
    import cloudpickle

    from fractalbench.harness import registry

    entries = {n: registry.registered(n) for n in sorted(names)}
    extra = {n: m for n, m in entries.items()
             if m is not None and not str(getattr(m.builder, "__module__", "")).startswith(("baselines.", "harness."))}
    return cloudpickle.dumps(extra)


@dataclass
class CellJob:
    """One cell to run in another process: picklable; calling it runs the cell and writes its file."""

    cell: Cell
    suite: Any  # fractalbench.harness.suites.Suite
    run_dir: str
    commit: str
    place: Placement
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))
    registrations: bytes = b""
    splits: bytes = b""  # the pickled DataSplits of the cell's dataset (empty: load it here)

    def __call__(self) -> str:
        """Run the cell (unless its file exists) and return its status, "ok" or "error"."""
        self._settle()
        from fractalbench.harness.data import load_dataset

        store = RunStore(self.run_dir)
        if store.is_done(self.cell.cell_id):  # a requeued job whose cell finished meanwhile
            return str(store.read_meta(f"cells/{self.cell.cell_id}.json").get("status", "ok"))
        splits = pickle.loads(self.splits) if self.splits else load_dataset(self.cell.dataset)
        record = run_cell(self.cell, self.suite, store, splits, commit=self.commit)
        import torch

        record.meta = dict(record.meta or {}, process={
            "pid": os.getpid(), "host": os.uname().nodename, "threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        store.write_cell(record)
        return record.status

    def _settle(self) -> None:
        """Apply the placement, the kernel settings and the models registered at run time."""
        if self.place.cuda_visible is not None:  # before anything initialises CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = self.place.cuda_visible
        import torch

        from fractalbench.harness.environment import apply_kernel_settings

        if self.place.threads is not None:
            torch.set_num_threads(self.place.threads)
        apply_kernel_settings()
        sys.path.extend(p for p in self.sys_path if p not in sys.path)
        if self.registrations:
            import cloudpickle

            from fractalbench.harness import registry

            for name, entry in cloudpickle.loads(self.registrations).items():
                if registry.registered(name) is None:
                    registry.register_model(name, card=entry.card)(entry.builder)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook (preemption, timeout): the same job again; training resumes from the
        cell's epoch checkpoint and the cell's measurements run anew."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# ----- the cell's own process (executor "process") -----------------------------------------------

def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when ``parent`` dies (Linux); exit at once if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: measurement workers (subprocess.run) are killed


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of a cell's process (``python -c ... JOB_FILE PARENT_PID``): stop on SIGTERM or when
    the parent dies, run the pickled :class:`CellJob` of JOB_FILE; exit 0, or 130 when stopped."""
    job_file, parent = argv or sys.argv[1:3]
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _die_with_parent(int(parent))
    print(f"--- cell process {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    job = pickle.loads(Path(job_file).read_bytes())
    Path(job_file).unlink(missing_ok=True)
    try:
        job()
    except KeyboardInterrupt:
        print("--- stopped", flush=True)
        return 130
    return 0


_CHILD = "import sys; from fractalbench.harness.executors import child_main; sys.exit(child_main())"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"was killed by signal {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with code {code}"


class _ProcessHandle:
    """A cell running in a fresh Python process of this machine (its own session: Ctrl-C does not reach
    it; its parent stops it)."""

    def __init__(self, job: CellJob, store: RunStore) -> None:
        import subprocess

        import cloudpickle

        import fractalbench

        logs = store.run_dir / LOG_DIR
        logs.mkdir(parents=True, exist_ok=True)
        self.log, self.job_file = logs / f"{job.cell.cell_id}.log", logs / f".{job.cell.cell_id}.job"
        self.job_file.write_bytes(cloudpickle.dumps(job))
        env = dict(os.environ)  # fractalbench importable from where this process imported it
        package_parent = str(Path(fractalbench.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", _CHILD, str(self.job_file), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def finished(self) -> bool:
        done = self.process.poll() is not None
        if done:
            self.job_file.unlink(missing_ok=True)
        return done

    def failure(self) -> str:
        """Why the process ended without writing its cell file."""
        return f"the cell's process {_exit_text(self.process.returncode)} before writing its result (log: {self.log})"

    def output(self) -> str:
        """The end of the process's output (its log)."""
        return _tail(self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def reap(self, deadline: float) -> None:
        import subprocess

        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.job_file.unlink(missing_ok=True)


# ----- submitit (executors "local" and "slurm") --------------------------------------------------

class _SubmititHandle:
    """A cell running as a submitit job."""

    def __init__(self, job: CellJob, executor: Any, gpus: int) -> None:
        executor.update_parameters(gpus_per_node=gpus)
        self.job = executor.submit(job)

    def finished(self) -> bool:
        return bool(self.job.done())

    def failure(self) -> str:
        try:
            self.job.result()
            problem = "finished"
        except Exception as exc:  # noqa: BLE001 - a failed job is data
            problem = f"failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
        return f"the cell's job {self.job.job_id} {problem} without writing its result (logs: {self.job.paths.folder})"

    def output(self) -> str:
        """The end of the job's stderr."""
        try:
            return _tail(self.job.stderr() or "")
        except Exception:  # noqa: BLE001 - a missing log is no reason to lose the record
            return ""

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.job.cancel(check=False)

    def reap(self, deadline: float) -> None:
        while not self.finished() and time.monotonic() < deadline:
            time.sleep(0.2)


def slurm_gpus(device: str, resources: Any) -> int:
    """GPUs a cell's Slurm job asks for: ``resources.gpus``, else 1 for a cell on cuda and 0 on cpu."""
    return resources.gpus if resources.gpus is not None else int(device.startswith("cuda"))


def submitit_executor(kind: str, store: RunStore, suite: Any) -> Any:
    """A submitit executor of ``kind`` whose folder (pickles, logs) is ``RUN/submitit/``, with the suite's resources."""
    import submitit

    res = suite.resources
    executor = submitit.AutoExecutor(folder=store.run_dir / SUBMITIT_DIR, cluster=kind)
    params: dict[str, Any] = {"timeout_min": res.timeout_min, "mem_gb": res.mem_gb, "cpus_per_task": res.cpus,
                              "nodes": 1, "tasks_per_node": 1, "name": f"fractalbench-{suite.name}"}
    if kind == "slurm" and res.partition:
        params["slurm_partition"] = res.partition
    executor.update_parameters(**params)
    return executor


# ----- the scheduler -------------------------------------------------------------------------------

@dataclass
class _Launcher:
    """Starts one cell in job slot ``slot``; ``poll_s``: how often running cells are checked."""

    start: Callable[[Any, int], Any]
    poll_s: float
    jobs: int


def _launcher(executor: str, jobs: int | None, books: _Books, splits: dict[Any, Any], n_cells: int) -> _Launcher:
    """How cells start under ``executor`` (with their placement: threads, GPUs, resources)."""
    suite, store = books.suite, books.store
    registrations = _runtime_registrations({m.name for m in suite.models})
    data = _portable_splits(splits)

    def job(cell: Any, place: Placement) -> CellJob:
        return CellJob(cell, suite, str(store.run_dir), books.commit, place, registrations=registrations,
                       splits=data.get(cell.dataset, b""))

    if executor == "slurm":
        sub = submitit_executor("slurm", store, suite)

        def start_slurm(cell: Any, slot: int) -> _SubmititHandle:
            return _SubmititHandle(job(cell, Placement(suite.resources.cpus)), sub,
                                   slurm_gpus(cell.device, suite.resources))

        return _Launcher(start_slurm, 5.0, jobs or max(1, n_cells))
    width = jobs or 1
    threads, gpus = threads_per_job(width), visible_gpus()
    local = submitit_executor("local", store, suite) if executor == "local" else None

    def start_here(cell: Any, slot: int) -> _ProcessHandle | _SubmititHandle:
        cell_job = job(cell, placement(cell.device, slot, threads, gpus))
        return _ProcessHandle(cell_job, store) if local is None else _SubmititHandle(cell_job, local, 0)

    return _Launcher(start_here, 0.1, width)


@dataclass
class _Books:
    """What the scheduler records into: the run's store and summary, the display, the cell count."""

    suite: Any
    store: RunStore
    summary: Any  # fractalbench.harness.runner.RunSummary
    echo: Callable[[str], None]
    total: int
    commit: str

    def record(self, cell: Any, handle: Any, took: float) -> None:
        """Account for a cell whose process or job ended: its own file, else an error record of the crash."""
        store = self.store
        data = store.read_meta(f"cells/{cell.cell_id}.json") if store.is_done(cell.cell_id) else None
        if data is None:
            message = handle.failure()
            meta = dict(cell_meta(cell, self.suite, self.commit), crashed=True, traceback=handle.output())
            store.write_cell(error_record(cell, self.suite, store, message, meta))
            data = {"status": "error", "error": message}
        store.write_tables()
        summary = self.summary
        done = f"[{len(summary.skipped) + len(summary.finished) + len(summary.failed) + 1}/{self.total}]"
        if data.get("status") == "ok":
            summary.finished.append(cell.cell_id)
            self.echo(f"{done} {cell.cell_id}: ok ({took:.1f} s)")
        else:
            summary.failed.append(cell.cell_id)
            first = (str(data.get("error") or "unknown error").splitlines() or ["unknown error"])[0]
            self.echo(f"{done} {cell.cell_id}: FAILED ({first})")


def run_elsewhere(cells: list[Any], suite: Any, store: RunStore, summary: Any, echo: Callable[[str], None], *,
                  executor: str, jobs: int | None, commit: str, splits: dict[Any, Any] | None = None) -> None:
    """Run the unfinished ``cells`` under ``executor`` at most ``jobs`` at a time, recording into
    ``summary`` (a runner.RunSummary) and printing one line per cell; ``splits``: the datasets this
    process loaded (dataset -> DataSplits), passed on when small. KeyboardInterrupt stops every
    running cell (their files are not written) and propagates."""
    books, todo = _Books(suite, store, summary, echo, len(cells), commit), []
    for cell in cells:
        if store.is_done(cell.cell_id):
            summary.skipped.append(cell.cell_id)
            echo(f"[{len(summary.skipped)}/{books.total}] {cell.cell_id}: already done, skipped")
        else:
            todo.append(cell)
    if not todo:
        return
    launcher = _launcher(executor, jobs, books, splits or {}, len(todo))
    echo(f"running {len(todo)} cell(s), at most {launcher.jobs} at a time ({executor} executor)")
    running: dict[int, tuple[Any, Any, float]] = {}  # slot -> (cell, handle, start time)
    try:
        while todo or running:
            while todo and len(running) < launcher.jobs:
                ready = _next_ready(todo, suite, store, {c.cell_id for c, _, _ in running.values()})
                if ready is None:  # every cell left waits for a running cell whose checkpoint it starts from
                    break
                slot = min(set(range(launcher.jobs)) - set(running))
                cell = todo.pop(ready)
                running[slot] = (cell, launcher.start(cell, slot), time.perf_counter())
            for slot, (cell, handle, started) in list(running.items()):
                if handle.finished():
                    del running[slot]
                    books.record(cell, handle, time.perf_counter() - started)
            time.sleep(launcher.poll_s)
    finally:
        _stop_all([handle for _, handle, _ in running.values()])


def _next_ready(todo: list[Cell], suite: Any, store: RunStore, running: set[str]) -> int | None:
    """Index of the first cell of ``todo`` whose dependencies (``weights: cell:LABEL``) are neither
    waiting nor running (a dependency that failed lets it start, to fail with that reason); None: none."""
    waiting = {c.cell_id for c in todo} | running
    for i, cell in enumerate(todo):
        if not any(dep in waiting and not store.is_done(dep) for dep in dependencies(cell, suite)):
            return i
    return None


def _stop_all(handles: list[Any]) -> None:
    """Stop every running cell; wait up to STOP_GRACE_S for them, then kill what is left."""
    for handle in handles:
        handle.stop()
    deadline = time.monotonic() + STOP_GRACE_S
    for handle in handles:
        handle.reap(deadline)
