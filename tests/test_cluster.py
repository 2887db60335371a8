"""Cluster mode against real servers: this machine's PostgreSQL, and an `mlflow server` of each
test's own on a free loopback port. Workers are real processes, killed for real."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import MlflowServer, tiny_spec
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from autotune.cli import main
from autotune.core import names
from autotune.core.spec import load_spec
from autotune.run.loop import Observer, run_study
from autotune.search import run_fields, sync, tracking
from autotune.search.queries import FINISHED
from autotune.search.storage import make_storage

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def study_name():
    """A study name no other test run uses; deleted from PostgreSQL afterwards."""
    name = f"cluster-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=make_storage(POSTGRES))


def autotune(*args: str | Path, wait: bool = True, **kwargs):
    """The `autotune` command in a process of its own, as a user or a cluster would start it."""
    command = [sys.executable, "-m", "autotune.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def mlflow_runs(uri: str, study: str) -> tuple[list, dict[int, list]]:
    """The study's parent runs, and its child runs by trial number (deleted runs left out)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`autotune.study` = '{study}'"
    )
    parents = [r for r in runs if r.data.tags["autotune.role"] == "parent"]
    children: dict[int, list] = {}
    for run in runs:
        if run.data.tags["autotune.role"] == "trial":
            children.setdefault(int(run.data.tags["autotune.trial"]), []).append(run)
    return parents, children


def assert_mlflow_holds_the_study(uri: str, study: optuna.Study) -> None:
    """One parent; for every trial that ran, one child under it, ended as Optuna ended it."""
    parents, children = mlflow_runs(uri, study.study_name)
    assert len(parents) == 1
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert sorted(children) == [t.number for t in ran]
    for trial in ran:
        [run] = children[trial.number]
        state = "INTERRUPTED" if trial.user_attrs.get("interrupted") else trial.state.name
        assert run.data.tags["autotune.state"] == state
        assert run.info.status == run_fields.RUN_STATUS[state]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if trial.state == TrialState.COMPLETE:  # the whole record, not only the end state
            assert float(run.data.params["final.val_acc"]) == pytest.approx(trial.value, rel=1e-3)


def cluster_spec(write_spec, name: str, uri: str, **study) -> Path:
    return write_spec(
        tiny_spec(
            study={"name": name, "storage": POSTGRES, **study},
            mlflow={"tracking_uri": uri},
        )
    )


def test_two_nodes_starting_at_once_share_one_budget_and_one_parent_run(
    write_spec, study_name: str, mlflow_server: MlflowServer
):
    spec = cluster_spec(write_spec, study_name, mlflow_server.uri, n_trials=8)
    # two `autotune run` on a study that does not exist yet, at the same moment: two nodes
    nodes = [autotune("run", spec, wait=False) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    study = optuna.load_study(study_name=study_name, storage=make_storage(POSTGRES))

    # the budget is the study's: exactly 8 trials finished, none left running or waiting
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == 8
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # both nodes worked on it, and no configuration was tried twice
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 8
    # MLflow: one parent run although both started at once, and every trial under it
    assert_mlflow_holds_the_study(mlflow_server.uri, study)


def test_a_worker_killed_mid_trial_has_its_trial_run_again(
    write_spec, study_name: str, mlflow_server: MlflowServer
):
    # heartbeats every second, a worker silent for 3 seconds is dead; trials of a few seconds
    spec = cluster_spec(
        write_spec,
        study_name,
        mlflow_server.uri,
        n_trials=6,
        heartbeat_interval=1,
        heartbeat_grace=3,
    )
    Path(spec).write_text(Path(spec).read_text().replace("max_epochs: 2", "max_epochs: 8"))
    launcher = autotune("run", spec, "--workers", "2", wait=False)
    storage = make_storage(POSTGRES)

    # kill the worker of the first trial that is well into its training, with SIGKILL
    victim = None
    deadline = time.monotonic() + 180
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=study_name, storage=storage)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "worker" in trial.user_attrs and len(trial.intermediate_values) >= 2:
                    victim = trial
                    break
    assert victim is not None, "no trial got two epochs in"
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)

    # the other worker finished the study: the launcher says which worker died, and succeeds
    assert launcher.returncode == 0, err
    assert "was killed by signal 9" in err
    study = optuna.load_study(study_name=study_name, storage=storage)
    by_number = {t.number: t for t in study.trials}
    # the killed trial was failed by the heartbeat check and its configuration run again
    assert by_number[victim.number].state == TrialState.FAIL
    [retry] = [
        t
        for t in study.trials
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number
    ]
    assert retry.state in FINISHED and retry.params == victim.params
    # still exactly the budget, and nothing left RUNNING
    assert len([t for t in study.trials if t.state in FINISHED]) == 6
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # MLflow: the dead worker's run was closed as FAIL from the Optuna storage
    assert_mlflow_holds_the_study(mlflow_server.uri, study)


class KillsTheServer(Observer):
    """Kills the tracking server after `kill_after` trials, starts it again after `back_after`."""

    def __init__(self, server: MlflowServer, kill_after: int, back_after: int | None = None):
        self.server, self.kill_after, self.back_after = server, kill_after, back_after
        self.done = 0
        self.notes: list[str] = []

    def trial_done(self, study, trial) -> None:
        self.done += 1
        if self.done == self.kill_after:
            self.server.kill()
        if self.done == self.back_after:
            self.server.start()

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_the_tracking_server_killed_mid_study_then_sync_fills_it_in(
    tmp_path: Path, write_spec, mlflow_server: MlflowServer
):
    spec_file = write_spec(
        tiny_spec(
            study={"name": "outage", "n_trials": 5}, mlflow={"tracking_uri": mlflow_server.uri}
        )
    )
    progress = KillsTheServer(mlflow_server, kill_after=2)
    outcome = run_study(load_spec(spec_file), progress=progress)

    # the study finished without the server; the user was told once, then reminded at the end
    assert outcome.finished == 5 and not outcome.interrupted
    assert sum("did not answer" in note for note in progress.notes) == 1
    assert "autotune sync" in progress.notes[-1]

    # the server is back: `autotune sync` logs what it missed, from the Optuna storage
    mlflow_server.start()
    result = CliRunner().invoke(main, ["sync", str(spec_file)])
    assert result.exit_code == 0, result.output
    assert "logged 3 trials" in result.output
    assert_mlflow_holds_the_study(mlflow_server.uri, outcome.study)
    # a second sync finds nothing missing, and logs nothing twice
    result = CliRunner().invoke(main, ["sync", str(spec_file)])
    assert "logged 0 trials" in result.output
    assert_mlflow_holds_the_study(mlflow_server.uri, outcome.study)


def test_what_mlflow_missed_is_logged_when_it_answers_again(
    write_spec, mlflow_server: MlflowServer, monkeypatch
):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.5)
    spec_file = write_spec(
        tiny_spec(study={"name": "blip", "n_trials": 6}, mlflow={"tracking_uri": mlflow_server.uri})
    )
    progress = KillsTheServer(mlflow_server, kill_after=1, back_after=3)
    outcome = run_study(load_spec(spec_file), progress=progress)

    # told once that it went away, and that the missed trials were logged on its return
    assert outcome.finished == 6
    assert sum("did not answer" in note for note in progress.notes) == 1
    assert any("answers again" in note for note in progress.notes)
    # with no `autotune sync`, MLflow holds every trial whole
    assert_mlflow_holds_the_study(mlflow_server.uri, outcome.study)


def test_an_unreachable_tracking_server_fails_sync_in_one_line(write_spec, tmp_path: Path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = write_spec(tiny_spec(study={"n_trials": 1}))
    assert CliRunner().invoke(main, ["run", str(spec)]).exit_code == 0
    result = CliRunner().invoke(
        main, ["sync", str(spec), "--tracking-uri", f"http://127.0.0.1:{port}"]
    )
    # bad input: one line naming the field, exit 2
    assert result.exit_code == 2
    assert result.output.startswith(f"error: mlflow.tracking_uri: http://127.0.0.1:{port}: ")
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_a_password_in_both_urls_is_nowhere_to_be_read(
    write_spec, tmp_path: Path, study_name: str, mlflow_server: MlflowServer
):
    password, token = "Pg-s3cret-e2e", "Ml-t0ken-e2e"
    # this PostgreSQL takes any password; the MLflow server ignores the token
    storage = POSTGRES.replace("postgres@", f"postgres:{password}@")
    uri = mlflow_server.uri.replace("http://", f"http://user:{token}@")
    env = {**os.environ, "AUTOTUNE_STORAGE": storage, "MLFLOW_TRACKING_URI": uri}
    spec = write_spec(tiny_spec(study={"name": study_name, "n_trials": 2}))
    said = ""
    for verb, *flags in (["run", "--workers", "2"], ["export"], ["report"], ["sync"]):
        result = autotune(verb, spec, *flags, env=env)
        assert result.returncode == 0, result.stderr
        said += result.stdout + result.stderr

    def leaks(text: str) -> bool:
        return password in text or token in text

    # stdout and stderr of every verb: the URLs are named, redacted
    assert not leaks(said)
    # the link to the trials carries neither the token nor the user: the browser asks for them
    assert f"compare trials: http://127.0.0.1:{mlflow_server.port}/#/experiments/" in said
    # MLflow: every param and tag of the parent run and of each trial's run
    parents, children = mlflow_runs(mlflow_server.uri, study_name)
    for run in [*parents, *(run for runs in children.values() for run in runs)]:
        assert not leaks(json.dumps([run.data.params, run.data.tags]))
    assert parents[0].data.params["study.storage"] == POSTGRES.replace("postgres@", "postgres:***@")
    # every file: the outputs, the workers' logs, the report, the server's store and artifacts
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"recommended.yaml", "best_model.py", "report.html", "worker-1.log"} <= {
        path.name for path in files
    }
    assert [path for path in files if leaks(path.read_bytes().decode("latin-1"))] == []
    # and the Optuna study's own attrs and its trials'
    study = optuna.load_study(study_name=study_name, storage=make_storage(POSTGRES))
    assert not leaks(json.dumps([study.user_attrs, [t.user_attrs for t in study.trials]]))


def mid_trial(storage, name: str, n: int) -> list:
    """Wait until n trials of the study are running and past their first epoch; return them."""
    deadline = time.monotonic() + 180
    running: list = []
    while len(running) < n and time.monotonic() < deadline:
        time.sleep(0.3)
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=name, storage=storage)
            running = [
                t
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.intermediate_values
            ]
    assert len(running) == n, f"{n} trials did not get an epoch in"
    return running


def test_sigterm_to_the_launcher_ends_every_worker_s_trial_cleanly_and_a_rerun_resumes(
    write_spec, tmp_path: Path
):
    spec = write_spec(tiny_spec(study={"name": "stop", "n_trials": 6}, train={"max_epochs": 50}))
    launcher = autotune("run", spec, "--workers", "2", wait=False)
    storage = make_storage(f"sqlite:///{tmp_path / 'out' / 'autotune.db'}")
    mid_trial(storage, "stop", 2)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)

    # exit 130; the trials running then ended FAIL in Optuna (marked interrupted), KILLED in
    # MLflow; none is left RUNNING
    assert launcher.returncode == 130, err
    study = optuna.load_study(study_name="stop", storage=storage)
    stopped = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert 1 <= len(stopped) <= 2
    assert all(t.state == TrialState.FAIL for t in stopped)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stop")
    for trial in stopped:
        [run] = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`autotune.trial` = '{trial.number}'"
        )
        assert run.info.status == "KILLED"
    # the same command resumes and spends the rest of the budget
    result = autotune("run", spec, "--workers", "2", "--n-trials", "3")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="stop", storage=storage)
    assert len([t for t in study.trials if t.state in FINISHED]) == 3


def _alive(pid: int) -> bool:
    """Whether a process runs: a zombie (exited, not yet reaped by its new parent) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_the_launcher_killed_stops_its_workers_and_queues_their_trials_again(
    write_spec, tmp_path: Path
):
    # trials of about a minute: far longer than the workers may take to notice
    spec = write_spec(
        tiny_spec(study={"name": "orphans", "n_trials": 6}, train={"max_epochs": 500})
    )
    launcher = autotune("run", spec, "--workers", "2", wait=False)
    storage = make_storage(f"sqlite:///{tmp_path / 'out' / 'autotune.db'}")
    running = mid_trial(storage, "orphans", 2)
    pids = [int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in running]
    launcher.kill()  # SIGKILL: the launcher can neither forward a signal nor clean up
    launcher.communicate(timeout=30)
    try:
        # both workers notice and stop, well before their trials would end
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not any(_alive(pid) for pid in pids), "a worker outlived its launcher"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    study = optuna.load_study(study_name="orphans", storage=storage)
    by_number = {t.number: t for t in study.trials}
    # their trials ended FAIL (out of the budget), none is left RUNNING
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    for trial in running:
        assert by_number[trial.number].state == TrialState.FAIL
    # and each configuration is queued to run again, as a dead worker's would be
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in waiting}
    assert sorted(retried) == sorted(t.number for t in running)
    for trial in running:
        assert retried[trial.number].params == trial.params


def test_a_worker_that_cannot_write_ends_the_launcher_with_its_line_and_exit_3(
    write_spec, tmp_path: Path
):
    spec = write_spec(tiny_spec(study={"name": "full", "n_trials": 4}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "weights").write_text("a file where the weights' folder must go\n")
    result = autotune("run", spec, "--workers", "2")

    # the launcher says what its worker said, in one line, and exits as a worker did: 3
    assert result.returncode == 3, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "weights" in line and "Traceback" not in result.stderr


# --- the pieces, without servers --------------------------------------------------------------


def test_devices_go_round_robin_through_what_the_scheduler_gave(monkeypatch):
    from autotune.run.workers import plan_devices

    # on the CPU: plain processes, no device
    assert plan_devices(3, ["0", "1"], "cpu") == [None, None, None]
    # device numbers count the GPUs this process sees: 0 is the scheduler's GPU 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert plan_devices(3, ["0", "1"], "auto") == ["4", "5", "4"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert plan_devices(2, ["2", "3"], "gpu") == ["2", "3"]


def test_a_second_sigterm_changes_nothing_a_second_ctrl_c_interrupts():
    from autotune.core.signals import stop_on_signals

    with stop_on_signals() as stop:
        # a scheduler's SIGTERM and the launcher's forwarded one: still a clean stop
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        # Ctrl-C after that: at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_crashed_run_on_a_journal_does_not_hold_the_budget(tmp_path: Path, write_spec):
    url = f"journal:///{tmp_path / 'study.journal'}"
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 2, "storage": url})))
    # a run killed mid-trial: its trial stays RUNNING, and a journal has no heartbeat to tell
    study = optuna.create_study(study_name="tiny", storage=make_storage(url), direction="maximize")
    study.ask()
    outcome = run_study(spec)
    # the rerun does not wait for it: it finishes the budget
    assert outcome.finished == 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the orphan's ask, on purpose
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed(tmp_path: Path, write_spec):
    spec = load_spec(
        write_spec(tiny_spec(study={"n_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 2}))
    )
    # Optuna's ask made the trial RUNNING; its worker died before the objective began, so no
    # heartbeat was ever recorded for it
    storage = make_storage(spec.storage_url, heartbeat_interval=1, heartbeat_grace=2)
    orphan = optuna.create_study(study_name="tiny", storage=storage, direction="maximize").ask()
    outcome = run_study(spec)
    # the waiting worker failed it after the grace period, then spent the budget itself
    assert outcome.finished == 1
    failed = outcome.study.trials[orphan.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "its worker stopped before it started"


def test_sync_replaces_a_cut_short_run_and_removes_a_second_copy(tmp_path: Path, write_spec):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3})))
    study = run_study(spec).study
    tracker = tracking.Tracker(spec.tracking_uri, spec.experiment_name, "tiny")
    runs = tracker.trial_runs()
    # trial 0's run missed some calls (it is tagged so); trial 1 was logged twice
    tracker.client.set_tag(runs[0][0].info.run_id, names.PARTIAL, "true")
    tracker.parent_run_id = study.user_attrs[names.PARENT_ATTR]
    tracker.log_trial(run_fields.TrialRecord(study.trials[1], "val_acc"))
    assert len(tracker.trial_runs()[1]) == 2

    logged = sync.sync_study(tracker, study, "val_acc")
    # trial 0 logged again whole; of trial 1's two runs one is left; trial 2 untouched
    assert logged == 1
    after = tracker.trial_runs()
    assert [len(after[n]) for n in (0, 1, 2)] == [1, 1, 1]
    assert names.PARTIAL not in after[0][0].data.tags
    assert after[2][0].info.run_id == runs[2][0].info.run_id
    # the record is the trial's: its params, per-epoch metrics and final value
    history = tracker.client.get_metric_history(after[0][0].info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    synced, live = after[0][0].data, runs[2][0].data
    assert float(synced.params["final.val_acc"]) == pytest.approx(study.trials[0].value, rel=1e-3)

    # the predicted Δ before training and again after the first epoch, as the live run has them
    # (trial 2 recalibrated BN, trial 0 not: the final metrics named for that differ)
    def logged(values: dict) -> set[str]:
        return {name for name in values if "before_recalibration" not in name}

    assert logged(synced.params) == logged(live.params)
    assert logged(synced.tags) - {names.PARTIAL} == logged(live.tags) - {names.PARTIAL}
    assert logged(synced.metrics) == logged(live.metrics)
    repredicted = study.trials[0].user_attrs["predicted_shift_after_epoch_1"]["delta_summary"]
    again = float(synced.tags["after_epoch_1.predicted_delta.worst"])
    assert again == pytest.approx(repredicted["worst_delta"], rel=1e-3)
    # named as the live run would be once its trial ended
    assert after[0][0].info.run_name == "trial-0 complete"
    assert after[0][0].data.params["block0.placement"] == str(
        study.trials[0].user_attrs["config"][0]["placement"]
    )
    # the study knows which run holds each trial now: trial 0's new one, though the trial's own
    # attr still names the run sync replaced, and whichever of trial 1's copies was kept
    assert run_fields.trial_run_id(study.user_attrs, study.trials[0]) == after[0][0].info.run_id
    assert study.trials[0].user_attrs["mlflow_run_id"] == runs[0][0].info.run_id
    assert run_fields.trial_run_id(study.user_attrs, study.trials[1]) == after[1][0].info.run_id
    assert run_fields.trial_run_id(study.user_attrs, study.trials[2]) == runs[2][0].info.run_id


def test_sync_writes_the_outputs_again_when_the_recommended_trials_run_moved(write_spec):
    spec_file = write_spec(tiny_spec(study={"n_trials": 2}))
    spec = load_spec(spec_file)
    run_study(spec)
    written = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())["best"]
    tracker = tracking.Tracker(spec.tracking_uri, spec.experiment_name, "tiny")
    assert [run.info.run_id for run in tracker.trial_runs()[written["trial"]]] == [
        written["mlflow_run_id"]
    ]
    # the recommended trial's run missed some calls: sync logs the trial again
    tracker.client.set_tag(written["mlflow_run_id"], names.PARTIAL, "true")
    result = CliRunner().invoke(main, ["sync", str(spec_file)])
    assert result.exit_code == 0, result.output
    assert "recommended.yaml, best_model.py written again" in result.output
    # the outputs name the run MLflow now holds, not the one sync deleted
    (run,) = tracker.trial_runs()[written["trial"]]
    assert run.info.run_id != written["mlflow_run_id"]
    rewritten = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())["best"]
    assert rewritten["mlflow_run_id"] == run.info.run_id
    assert run.info.run_id in (spec.output_dir / "best_model.py").read_text()
    # nothing moved since: a second sync writes nothing
    result = CliRunner().invoke(main, ["sync", str(spec_file)])
    assert "written again" not in result.output


class CutsRunsShort(Observer):
    """Tags every finished trial's run as one that missed some calls, as a server that went
    away for a moment would leave it."""

    def __init__(self, tracking_uri: str) -> None:
        self.client = MlflowClient(tracking_uri)

    def trial_done(self, study, trial) -> None:
        self.client.set_tag(trial.user_attrs["mlflow_run_id"], names.PARTIAL, "true")


def test_the_end_of_a_run_writes_the_outputs_again_when_its_sync_moved_a_run(write_spec):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 2})))
    outcome = run_study(spec, progress=CutsRunsShort(spec.tracking_uri))
    # the end of the run logged every trial again; the outputs name the runs MLflow holds
    best = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())["best"]
    tracker = tracking.Tracker(spec.tracking_uri, spec.experiment_name, "tiny")
    (run,) = tracker.trial_runs()[best["trial"]]
    assert names.PARTIAL not in run.data.tags
    assert best["mlflow_run_id"] == run.info.run_id
    assert best["mlflow_run_id"] != outcome.study.trials[best["trial"]].user_attrs["mlflow_run_id"]


def test_bad_input_with_workers_is_one_line_and_no_worker_trains(write_spec, tmp_path: Path):
    spec = write_spec(tiny_spec())
    # a storage that cannot be opened: found by the launcher after its workers started
    result = autotune("run", spec, "--workers", "2", "--storage", "redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert result.stderr.startswith("error: study.storage: cannot open 'redis://127.0.0.1:1/0'")
    assert result.stderr.count("\n") == 1
    # the workers were told to leave before they touched anything
    logs = sorted((tmp_path / "out" / "workers").glob("worker-*.log"))
    assert len(logs) == 2 and all(log.read_text() == "" for log in logs)


def test_trials_per_device_runs_that_many_workers_on_each_device(write_spec, monkeypatch):
    from click.testing import CliRunner

    from autotune.cli import main
    from autotune.run import workers

    planned = []

    def launch(spec_file, spec, n_workers, devices, **kwargs):  # the plan, not the processes
        planned.append(workers.plan_devices(n_workers, devices, spec.train.accelerator))
        raise KeyboardInterrupt

    monkeypatch.setattr(workers, "launch", launch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("autotune.run.workers.visible_gpus", lambda: 2)  # a node with two GPUs
    spec = str(write_spec(tiny_spec(train={"accelerator": "gpu"})))
    CliRunner().invoke(main, ["run", spec, "--trials-per-device", "3", "--devices", "0,1"])
    # three workers on each of the two GPUs
    assert planned == [["0", "1", "0", "1", "0", "1"]]
    # on the CPU, the CPU is the one device: three plain processes
    cpu = str(write_spec(tiny_spec(train={"accelerator": "cpu"}), name="cpu.yaml"))
    CliRunner().invoke(main, ["run", cpu, "--trials-per-device", "3"])
    assert planned[1] == [None, None, None]


def test_each_worker_is_told_how_many_share_its_gpu(write_spec, monkeypatch):
    from autotune.core.names import DEVICE_WORKERS_ENV
    from autotune.run import workers

    started = []
    monkeypatch.setattr(
        workers.subprocess, "Popen", lambda command, env, **kw: started.append(env) or object()
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec_file = write_spec(tiny_spec(train={"accelerator": "gpu"}))
    workers.start_workers(spec_file, load_spec(spec_file), 5, 5, ["0", "1"], None)
    # GPU 0 has three of the five, GPU 1 two: each sizes its share of the GPU's memory by that
    assert [(env["CUDA_VISIBLE_DEVICES"], env[DEVICE_WORKERS_ENV]) for env in started] == [
        ("0", "3"),
        ("1", "2"),
        ("0", "3"),
        ("1", "2"),
        ("0", "3"),
    ]


def test_trials_per_device_and_workers_do_not_mix(write_spec):
    result = autotune("run", write_spec(tiny_spec()), "--workers", "2", "--trials-per-device", "2")
    # one line, exit 2, before anything starts
    assert result.returncode == 2
    assert result.stderr == "error: --trials-per-device: give it or --workers, not both\n"


def test_a_launcher_whose_workers_were_all_killed_does_not_finish_its_parent_run(
    write_spec, tmp_path: Path
):
    budget = 6
    spec = write_spec(tiny_spec(study={"n_trials": budget}, train={"max_epochs": 8}))
    storage = make_storage(f"sqlite:///{tmp_path / 'out' / 'autotune.db'}")
    launcher = autotune("run", spec, "--workers", "2", wait=False)

    # SIGKILL each worker once it trains a trial, as a scheduler that preempts both would
    killed: set[int] = set()
    deadline = time.monotonic() + 180
    while len(killed) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="tiny", storage=storage)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = int(trial.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
                if pid and pid not in killed and trial.intermediate_values:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
    assert len(killed) == 2, "both workers did not get to train"
    _, err = launcher.communicate(timeout=300)

    # the launcher names both and fails: the budget was not reached
    assert launcher.returncode == 1, err
    assert err.count("was killed by signal 9") == 2
    finished = len(
        optuna.load_study(study_name="tiny", storage=storage).get_trials(states=FINISHED)
    )
    assert finished < budget
    # the parent run is KILLED, not FINISHED as if the study were done, and says how far it got
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id],
        filter_string="tags.`autotune.role` = 'parent'",
    )
    assert parent.info.status == "KILLED"
    assert parent.data.tags["autotune.finished"] == f"{finished}/{budget}"


def _parent(uri: str, study: str):
    [parent], _ = mlflow_runs(uri, study)
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    return parent, artifacts


def test_sync_ends_a_parent_run_left_running_as_the_end_of_a_run_would(
    tmp_path: Path, write_spec, mlflow_server: MlflowServer
):
    def spec_file(name: str) -> Path:
        return write_spec(
            tiny_spec(
                study={"name": name, "n_trials": 3},
                mlflow={"tracking_uri": mlflow_server.uri},
                output=str(tmp_path / name),
            ),
            name=f"{name}.yaml",
        )

    # the same study twice: once with the server up to the end, once with it gone after a trial
    run_study(load_spec(spec_file("normal")))
    outage = spec_file("outage")
    run_study(load_spec(outage), progress=KillsTheServer(mlflow_server, kill_after=1))
    mlflow_server.start()
    parent, _ = _parent(mlflow_server.uri, "outage")
    assert parent.info.status == "RUNNING"  # its run could not end it

    result = CliRunner().invoke(main, ["sync", str(outage)])
    assert result.exit_code == 0, result.output
    # the parent now holds what a normal end gives it: status, metrics, tags and artifacts
    normal, normal_artifacts = _parent(mlflow_server.uri, "normal")
    synced, synced_artifacts = _parent(mlflow_server.uri, "outage")
    assert synced.info.status == normal.info.status == "FINISHED"
    assert set(synced.data.metrics) == set(normal.data.metrics)
    assert synced.data.metrics["finished_trials"] == 3
    assert set(synced.data.tags) - {"mlflow.runName"} == set(normal.data.tags) - {"mlflow.runName"}
    assert any(key.startswith("autotune.recommended.") for key in synced.data.tags)
    assert synced.data.tags["autotune.finished"] == "3/3"
    assert synced_artifacts == normal_artifacts
    assert {"recommended.yaml", "best_model.py", "figures/history.png"} <= synced_artifacts
    assert "ended FINISHED (3/3 trials)" in result.output
    # a second sync finds the parent ended and leaves it so
    result = CliRunner().invoke(main, ["sync", str(outage)])
    assert "parent run" not in result.output


def test_sync_does_not_finish_a_parent_run_whose_study_is_short_of_its_budget(
    write_spec, mlflow_server: MlflowServer
):
    spec_file = write_spec(
        tiny_spec(
            study={"name": "short", "n_trials": 3}, mlflow={"tracking_uri": mlflow_server.uri}
        )
    )
    # one trial, then the timeout; the server went away before the run could end its parent
    run_study(load_spec(spec_file), timeout=0.01, progress=KillsTheServer(mlflow_server, 1))
    mlflow_server.start()

    result = CliRunner().invoke(main, ["sync", str(spec_file)])
    assert result.exit_code == 0, result.output
    parent, _ = _parent(mlflow_server.uri, "short")
    # KILLED, as the run itself would have ended it: a rerun goes on
    assert parent.info.status == "KILLED"
    assert parent.data.tags["autotune.finished"] == "1/3"
