"""`autotune run spec.yaml --workers N`: N local processes share one study.

The launcher checks the input and opens the study and its MLflow parent run once. It then starts N
copies of `autotune run` on the same spec, storage and tracking server, each pinned to a device
through CUDA_VISIBLE_DEVICES (round-robin over --devices); on the CPU they are plain processes
that share the cores. Storage and tracking URLs reach the workers through the environment, so a
password never shows in the process list. The launcher shows the study's progress as the storage
records it, forwards the first Ctrl-C or SIGTERM to every worker, and, when all have stopped,
writes the recommendation. Each worker logs to <output>/workers/worker-<i>.log.

Each worker holds a pipe from the launcher open for as long as it runs. When the launcher dies,
however it dies (SIGKILL, out of memory), the pipe closes: the worker stops as its SIGTERM would
stop it, and queues the trial it cut short to be run again, since nobody chose to stop it.

The same command on other nodes joins the same study: the budget is the whole study's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from autotune.core.errors import SpecError, WriteError
from autotune.core.names import (
    DEVICE_WORKERS_ENV,
    DEVICES_ENV,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_WRITE,
    STORAGE_ENV,
    TRACKING_ENV,
    WORKER_ENV,
    worker_log,
)
from autotune.core.spec import Spec
from autotune.core.writes import open_to_append
from autotune.run.finish import finish_study
from autotune.run.loop import Observer
from autotune.run.session import Session, StudyOutcome, open_session
from autotune.search.queries import count_finished
from autotune.search.storage import MAX_RETRIES, POLL_SECONDS

# set in a worker when its launcher's pipe closed: the launcher is gone
LAUNCHER_GONE = threading.Event()


@dataclass
class Worker:
    index: int
    device: str | None
    process: subprocess.Popen
    log: Path

    @property
    def trouble(self) -> str | None:
        """What the user should hear of how this worker stopped, or None when it stopped with
        the study (the budget spent, or interrupted)."""
        code = self.process.returncode
        if code in (0, EXIT_INTERRUPTED):
            return None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return f"worker {self.index} {how}; its log: {self.log}"

    @property
    def write_error(self) -> str:
        """What this worker said of the file it could not write (its log's last `error:` line),
        or where to look when its log could not take even that."""
        with contextlib.suppress(OSError):
            said = [
                line.removeprefix("error: ").strip()
                for line in self.log.read_text(errors="replace").splitlines()
                if line.startswith("error: ")
            ]
            if said:
                return said[-1]
        return f"worker {self.index} could not write a file; its log: {self.log}"


def device_count(devices: list[str] | None, accelerator: str) -> int:
    """How many devices the workers spread over: --devices, else every visible GPU; the CPU,
    where training runs there, counts as one."""
    if accelerator == "cpu":
        return 1
    if devices is None:
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, len(devices))


def check_devices(devices: list[str], accelerator: str) -> None:
    """SpecError naming --devices where it names a CUDA device this process does not see, or
    where training runs on the CPU: a run never quietly trains elsewhere than asked."""
    shown = ",".join(devices)
    if accelerator == "cpu":
        raise SpecError(f"--devices {shown}: train.accelerator is cpu; drop --devices")
    count = visible_gpus()
    absent = [d for d in devices if int(d) >= count]
    if not absent:
        return
    if count == 0:
        raise SpecError(
            f"--devices {shown}: this machine shows no CUDA device; drop --devices to train "
            "on what train.accelerator finds"
        )
    raise SpecError(
        f"--devices {shown}: no CUDA device {', '.join(absent)} here: this process sees "
        f"{count} ({', '.join(str(i) for i in range(count))})"
    )


def visible_gpus() -> int:
    """The CUDA devices this process sees, counted in a process of its own: where NVML is
    missing, torch counts by initialising CUDA, which would fix the devices this process may
    use before --devices chose one."""
    counted = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(counted.stdout.strip() or 0) if counted.returncode == 0 else 0


def plan_devices(n: int, devices: list[str] | None, accelerator: str) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each of n workers, round-robin over `devices` (default: every
    visible GPU); None for every worker when training runs on the CPU.

    Device numbers count the GPUs this process sees: under a scheduler that already set
    CUDA_VISIBLE_DEVICES=4,5,6,7, device 0 is GPU 4."""
    if accelerator == "cpu":
        return [None] * n
    if devices is None:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        return [None] * n
    visible = os.environ.get(DEVICES_ENV)
    if visible:
        seen = [d.strip() for d in visible.split(",") if d.strip()]
        devices = [seen[int(d)] if int(d) < len(seen) else d for d in devices]
    return [devices[i % len(devices)] for i in range(n)]


def launch(
    spec_file: Path,
    spec: Spec,
    n_workers: int,
    devices: list[str] | None = None,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: Observer | None = None,
    allow_changes: bool = False,
) -> tuple[StudyOutcome, list[str]]:
    """Run the study with n_workers processes; returns the outcome and what went wrong with
    any worker (a worker killed while the others finished the study is not a failed study)."""
    from autotune.core.signals import stop_on_signals

    progress = progress or Observer()
    budget = n_trials if n_trials is not None else spec.study.n_trials
    began = datetime.now()
    # the workers start first and import torch, Lightning and MLflow while the launcher checks
    # the spec and opens the study; they touch nothing until it says go (`await_launcher`)
    workers = start_workers(spec_file, spec, budget, n_workers, devices, timeout)
    try:
        # the launcher stores any change it allows before the workers open the study
        session = open_session(
            spec, n_trials=n_trials, notify=progress.note, allow_changes=allow_changes
        )
    except BaseException:
        _release(workers, go=False)  # bad input is said once, here; the workers just leave
        raise
    study = session.study
    outcome = StudyOutcome(study, count_finished(study), session.budget)
    # trials of earlier runs are not news; the workers' are, however quick
    seen = {
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete is not None and t.datetime_complete < began
    }
    with stop_on_signals() as stop:
        _supervise(workers, session, outcome, seen, stop, progress)
    _report_new(study, seen, progress)
    codes = [w.process.returncode for w in workers]
    outcome.interrupted = outcome.interrupted or EXIT_INTERRUPTED in codes
    outcome.stopped_by_failures = EXIT_FAILED in codes
    outcome.finished = count_finished(study)
    finish_study(session, outcome)
    unwritten = [w for w in workers if w.process.returncode == EXIT_WRITE]
    if unwritten:  # a disk that refused one worker's file: the run ends as that worker's did
        raise WriteError(unwritten[0].write_error)
    return outcome, [t for t in (w.trouble for w in workers) if t is not None]


def _supervise(
    workers: list[Worker],
    session: Session,
    outcome: StudyOutcome,
    seen: set[int],
    stop: threading.Event,
    progress: Observer,
) -> None:
    """Let the workers go and watch them until the last one ends: a signal forwarded to them
    once, new trials reported; on the launcher's own failure, or a second Ctrl-C, every worker
    stopped."""
    study = session.study
    forwarded = False
    try:
        _release(workers, go=True)
        progress.start(study, session.budget)
        while any(w.process.poll() is None for w in workers):
            if stop.is_set() and not forwarded:
                _signal(workers, signal.SIGTERM)  # each ends its running trial cleanly
                forwarded = outcome.interrupted = True
            _report_new(study, seen, progress)
            _wait_any(workers, POLL_SECONDS)
    except BaseException as exc:
        # a second Ctrl-C, or the launcher's own failure: no worker goes on alone. A
        # SIGTERM lets a worker end its trial cleanly; the SIGINT after it, at once
        outcome.interrupted = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            _signal(workers, sig)
        for worker in workers:
            worker.process.wait()
        if not isinstance(exc, KeyboardInterrupt):
            session.tracker.end_study({}, {}, [], status="FAILED")  # not left RUNNING
            raise
    finally:
        progress.close()


def await_launcher() -> bool:
    """In a worker: import what a trial needs, then wait for the launcher's word. True: go;
    False: the launcher found the input bad, or is gone.

    After the go, a thread watches the launcher's pipe (`watch_launcher`)."""
    import lightning.pytorch  # noqa: F401 - the slow imports, while the launcher checks
    import mlflow  # noqa: F401

    if sys.stdin.readline().strip() != "go":
        return False
    watch_launcher()
    return True


def watch_launcher() -> threading.Thread:
    """Stop this worker when the launcher's pipe on stdin closes: the launcher is gone, and no
    one would end this worker's trials or write the recommendation.

    The worker stops as its SIGTERM would stop it (the running trial ends at its next batch,
    FAIL, out of the budget), and `retry_cut_short` queues that trial again."""

    def watch() -> None:
        sys.stdin.read()  # blocks until the launcher closes its end, or its process ends
        LAUNCHER_GONE.set()
        print("the launcher is gone: stopping; the trial cut short will run again", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    thread.start()
    return thread


def run_here(
    spec: Spec,
    n_trials: int | None,
    timeout: float | None,
    devices: list[str] | None,
    progress: Observer,
    as_worker: bool,
    allow_changes: bool = False,
) -> StudyOutcome:
    """`run` without --workers, or one of --workers' processes: the study run in this process,
    on the device `devices` names; a worker retries the trials it cut short."""
    from autotune.run.loop import run_study

    if devices:  # before anything initialises CUDA
        [device] = plan_devices(1, devices, spec.train.accelerator)
        if device is not None:
            os.environ[DEVICES_ENV] = device
    outcome = run_study(
        spec,
        n_trials=n_trials,
        timeout=timeout,
        progress=progress,
        finish=not as_worker,
        allow_changes=allow_changes,
    )
    if as_worker:
        retry_cut_short(outcome)
    return outcome


def retry_cut_short(outcome: StudyOutcome) -> list[int]:
    """When the launcher is gone: queue each trial this worker cut short to run again (as a
    worker's death by heartbeat would, up to MAX_RETRIES times a configuration); return their
    numbers. A stop the user asked for (Ctrl-C, SIGTERM to the launcher) queues nothing."""
    if not LAUNCHER_GONE.is_set():
        return []
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for number in outcome.cut_short:
        retry(outcome.study, outcome.study.trials[number])
    return list(outcome.cut_short)


def _release(workers: list[Worker], *, go: bool) -> None:
    """Tell each waiting worker to go, or to leave; then wait for those told to leave.

    A worker told to go keeps its pipe open: it closes with the launcher (`watch_launcher`)."""
    for worker in workers:
        stdin = worker.process.stdin
        if stdin is None:
            continue
        with contextlib.suppress(OSError):  # a worker that died already
            if go:
                stdin.write("go\n")
                stdin.flush()
            else:
                stdin.close()
    if not go:
        for worker in workers:
            worker.process.wait()


def _wait_any(workers: list[Worker], seconds: float) -> None:
    """Sleep up to `seconds`, less when a worker exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(w.process.poll() is not None for w in workers):
            return
        time.sleep(0.05)


def start_workers(
    spec_file: Path,
    spec: Spec,
    budget: int,
    n_workers: int,
    devices: list[str] | None,
    timeout: float | None,
) -> list[Worker]:
    env = {**os.environ, STORAGE_ENV: spec.storage_url, TRACKING_ENV: spec.tracking_uri}
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    command = [sys.executable, "-m", "autotune.cli", "run", str(spec_file), "--worker"]
    command += ["--n-trials", str(budget)]
    if timeout is not None:
        command += ["--timeout", str(timeout)]
    workers = []
    plan = plan_devices(n_workers, devices, spec.train.accelerator)
    for index, device in enumerate(plan):
        worker_env = {**env, WORKER_ENV: str(index)}
        if device is not None:
            worker_env[DEVICES_ENV] = device
            worker_env[DEVICE_WORKERS_ENV] = str(plan.count(device))
        else:  # CPU workers share the cores instead of each spinning a pool over all of them
            worker_env.setdefault("OMP_NUM_THREADS", str(threads))
        log = worker_log(spec.output_dir, index)
        with open_to_append(log) as out:
            process = subprocess.Popen(
                command,
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                # the launcher's go, and its lifeline (see await_launcher)
                stdin=subprocess.PIPE,
                text=True,
                # signals from the terminal reach the launcher only, which forwards exactly one
                start_new_session=True,
            )
        workers.append(Worker(index, device, process, log))
    return workers


def _signal(workers: list[Worker], sig: signal.Signals) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(sig)


def _report_new(study: optuna.Study, seen: set[int], progress: Observer) -> None:
    """Tell `progress` of each trial that finished since the last look, and add it to `seen`."""
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in seen:
            progress.trial_done(study, trial)
            seen.add(trial.number)
