"""The `autotune` command: a thin shell over the package. Parses, calls, prints.

Bad input (SpecError) is one line on stderr and exit code 2; a file that could not be written (a
read-only or full disk: WriteError) is one line and exit code 3; an interrupted study exits with
130. Either of the last two resumes when the same command runs again. Every error line goes out
through `fail`: one line, at most MAX_LINE characters, no secret in it.

Each verb imports what it runs inside itself: `autotune --help` imports click alone, and
`validate` of a built-in dataset neither torch nor Optuna.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from autotune.cli_common import (
    friendly,
    make_console,
    storage_option,
    tracking_option,
    url_overrides,
)
from autotune.cli_repair import diagnose, fix
from autotune.cli_study import init, trials
from autotune.core.errors import SpecError, WriteError, first_line
from autotune.core.names import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
)
from autotune.core.redaction import redact

if TYPE_CHECKING:
    from rich.console import Console

    from autotune.run.session import StudyOutcome


def _devices(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    devices = [d.strip() for d in value.split(",")]
    if not all(d.isdigit() for d in devices):
        raise click.BadParameter(f"{value!r}: expected CUDA device numbers, e.g. 0,1,2,3")
    return devices


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autotune")
def main() -> None:
    """Find how a network should combine Dropout and BatchNorm."""


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    help="The study's trial budget (overrides study.n_trials), shared by all its workers.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds after which no new trial starts (overrides study.timeout).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Local worker processes that share the study, one trial each at a time [default: 1].",
)
@click.option(
    "--trials-per-device",
    type=click.IntRange(min=1),
    help="Run this many workers on each device (--devices, or every visible GPU; the CPU "
    "counts as one), so small trials share a big GPU. Instead of --workers.",
)
@click.option(
    "--devices",
    callback=_devices,
    help="CUDA devices for the workers, round-robin, e.g. 0,1,2,3 (default: every visible GPU).",
)
@click.option(
    "--allow-changes",
    is_flag=True,
    help="Resume a study although the spec changes what its trials train with (train, data, "
    "search space, pruner); each trial keeps the settings it ran with.",
)
@storage_option
@tracking_option
@click.option("--worker", "as_worker", is_flag=True, hidden=True)  # one of --workers' processes
@friendly
def run(
    spec_file: Path,
    n_trials: int | None,
    timeout: float | None,
    workers: int | None,
    trials_per_device: int | None,
    devices: list[str] | None,
    storage: str | None,
    tracking_uri: str | None,
    as_worker: bool,
    allow_changes: bool,
) -> None:
    """Run the study in SPEC_FILE, or resume it where it stopped, or join it: the same command
    on another node works on the same study when its storage is shared."""
    from autotune.core.spec import load_spec
    from autotune.run.progress import RichProgress
    from autotune.run.summary import print_summary

    if as_worker:
        from autotune.run.workers import await_launcher

        if not await_launcher():
            sys.exit(EXIT_BAD_INPUT)
    if workers is not None and trials_per_device is not None:
        raise SpecError("--trials-per-device: give it or --workers, not both")
    spec = load_spec(spec_file, overrides=url_overrides(storage, tracking_uri))
    if devices is not None and not as_worker:
        from autotune.run.workers import check_devices

        check_devices(devices, spec.train.accelerator)
    if trials_per_device is not None:
        from autotune.run.workers import device_count

        workers = trials_per_device * device_count(devices, spec.train.accelerator)
    workers = workers or 1
    console = make_console()
    progress = RichProgress(console, spec.study.metric, spec.train.max_epochs)
    troubles: list[str] = []
    if workers > 1:
        from autotune.run.workers import launch

        outcome, troubles = launch(
            spec_file,
            spec,
            workers,
            devices,
            n_trials=n_trials,
            timeout=timeout,
            progress=progress,
            allow_changes=allow_changes,
        )
    else:
        from autotune.run.workers import run_here

        outcome = run_here(spec, n_trials, timeout, devices, progress, as_worker, allow_changes)
    if not as_worker:
        print_summary(console, spec, outcome, spec_file)
    _end_run(console, spec_file, outcome, troubles)


def _end_run(console: Console, spec_file: Path, outcome: StudyOutcome, troubles: list[str]) -> None:
    """What `run` says at its end, and its exit code: interrupted, or failed."""
    for trouble in troubles:
        console.print(f"[yellow]{trouble}[/]", soft_wrap=True)
    if outcome.interrupted:
        console.print(
            f"interrupted: run `autotune run {spec_file}` again to resume", soft_wrap=True
        )
        sys.exit(EXIT_INTERRUPTED)
    if outcome.stopped_by_failures or (troubles and outcome.finished < outcome.budget):
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@storage_option
@tracking_option
@friendly
def validate(spec_file: Path, storage: str | None, tracking_uri: str | None) -> None:
    """Check SPEC_FILE, its search space and its data without training anything, with the
    storage and tracking URI that `run` would take."""
    from autotune.core.spec import load_spec
    from autotune.run.preflight import check_spec

    spec = load_spec(spec_file, overrides=url_overrides(storage, tracking_uri))
    space, data = check_spec(spec)
    model = spec.model.import_ or spec.model.template
    click.echo(
        f"{spec_file}: ok: study {spec.study.name!r}, {spec.study.n_trials} trials, "
        f"{model} with {len(space.blocks)} blocks, data {data.name} "
        f"{data.input_shape} with {data.n_classes} classes"
    )
    if spec.model.imported:  # where autotune found the blocks, and the room each one has
        for i, slot in enumerate(space.slots):
            click.echo(f"  block{i}: {slot.label} ({slot.kind}): {', '.join(slot.placements)}")


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "formats",
    type=click.Choice(["py", "yaml", "json"]),
    multiple=True,
    help="What to write, once per format: py (best_model.py), yaml (recommended.yaml), "
    "json (recommended.json). Default: yaml and py.",
)
@storage_option
@friendly
def export(spec_file: Path, formats: tuple[str, ...], storage: str | None) -> None:
    """Write the study's recommendation again from SPEC_FILE's storage, each file verified
    against the tuned network and its saved weights."""
    from autotune.core.spec import load_spec
    from autotune.nn.weights import CheckFailed
    from autotune.outputs.export import DEFAULT_FORMATS, NothingToRecommend, write_outputs
    from autotune.search.storage import load_existing_study

    spec = load_spec(spec_file, overrides=url_overrides(storage))
    study = load_existing_study(spec)
    try:
        paths = write_outputs(study, spec, formats or DEFAULT_FORMATS)
    except CheckFailed as exc:  # a file that failed its check: the message names it
        raise SpecError(str(exc)) from None
    except NothingToRecommend as exc:
        raise SpecError(f"study.name: {exc}") from None
    for path in paths:
        click.echo(f"wrote {path}")


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="A configuration (blocks, recalibrate_bn), e.g. a recommended.yaml; "
    "default: the search space's defaults.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as JSON.")
@friendly
def predict(spec_file: Path, config_file: Path | None, as_json: bool) -> None:
    """Predict each BN layer's variance shift Δ for a configuration, without training."""
    import json

    from autotune.core.spec import load_spec
    from autotune.nn.data import load_data
    from autotune.nn.fitting import predict as predict_config
    from autotune.run.preflight import check_runnable, read_config, resolve_space
    from autotune.run.summary import print_prediction

    spec = load_spec(spec_file)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    space = resolve_space(spec, data)
    check_runnable(spec, space, data)
    config = space.defaults() if config_file is None else read_config(space, config_file)
    prediction = predict_config(spec, config, data)
    if as_json:
        click.echo(json.dumps({"config": config.to_params(), **prediction.to_dict()}, indent=2))
    else:
        print_prediction(make_console(stderr=False), config, prediction)


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@storage_option
@tracking_option
@friendly
def sync(spec_file: Path, storage: str | None, tracking_uri: str | None) -> None:
    """Log to MLflow what it misses of the study in SPEC_FILE, from the Optuna storage: trials
    finished while the tracking server was away, or whose worker died; and end the parent run,
    as the end of a run would have, where that run could not."""
    from autotune.core.spec import load_spec
    from autotune.outputs.export import rewrite_if_run_moved
    from autotune.run.finish import parent_status, sync_parent_run
    from autotune.search.storage import load_existing_study, raise_if_disk
    from autotune.search.sync import sync_study
    from autotune.search.tracking import Tracker

    spec = load_spec(spec_file, overrides=url_overrides(storage, tracking_uri))
    if not spec.mlflow.enabled:
        raise SpecError("mlflow.enabled: false: this study logs nothing to MLflow")
    study = load_existing_study(spec)
    where = f"mlflow.tracking_uri: {redact(spec.tracking_uri)}"
    try:
        tracker = Tracker(
            spec.tracking_uri, spec.experiment_name, spec.study.name, notify=lambda _: None
        )
        if not tracker.online:
            raise SpecError(f"{where}: does not answer ({tracker.last_error})")
        logged = sync_study(tracker, study, spec.study.metric)
        ended = sync_parent_run(study, spec, tracker)
    except (SpecError, WriteError):
        raise
    except Exception as exc:
        raise_if_disk(exc, spec.tracking_uri)  # a local store on a full or read-only disk
        raise SpecError(f"{where}: {first_line(exc)}") from None
    if tracker.fault is not None:
        raise tracker.fault
    if tracker.down_since is not None:  # a call of the parent's end did not get through
        raise SpecError(f"{where}: does not answer ({tracker.last_error})")
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    click.echo(
        f"{redact(spec.tracking_uri)}: logged {logged} trials it was missing; "
        f"it now holds all {finished} finished trials of study {spec.study.name!r}"
    )
    if ended is not None:
        logged_files = ", ".join(path.name for path in ended.outputs) or "no recommendation"
        click.echo(
            f"its parent run was left running: ended {parent_status(ended)} "
            f"({ended.finished}/{ended.budget} trials), with {logged_files} and the figures"
        )
        return
    rewritten = rewrite_if_run_moved(study, spec)
    if rewritten:
        names = ", ".join(path.name for path in rewritten)
        click.echo(f"{names} written again: they now name the recommended trial's new run")


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@storage_option
@friendly
def report(spec_file: Path, storage: str | None) -> None:
    """Write the study in SPEC_FILE's storage as one self-contained HTML page, its pictures
    embedded, and the pictures as PNG beside it."""
    from autotune.core.spec import load_spec
    from autotune.outputs.report import write_report
    from autotune.search.storage import load_existing_study

    spec = load_spec(spec_file, overrides=url_overrides(storage))
    study = load_existing_study(spec)
    click.echo(f"wrote {write_report(study, spec)}")


@main.command()
@friendly
def spaces() -> None:
    """List the search spaces in search_spaces/ and what they search."""
    from autotune.core.space_files import describe_space, list_spaces, load_space

    for name, path, description in list_spaces():
        click.echo(f"{name} ({path.name}): {description}")
        space = load_space(name, n_blocks=1, template="resnet")  # resnet: every choice applies
        for _, param, text in describe_space(space):
            click.echo(f"  {param:<14} {text}")


main.add_command(diagnose)
main.add_command(fix)
main.add_command(trials)
main.add_command(init)


def entry() -> None:
    """The `autotune` console script (and `python -m autotune.cli`): `main`, then the process
    ends without the interpreter's teardown of the modules a run loaded. With torch, Lightning,
    Optuna and MLflow imported that teardown alone takes about 2 s on 2 cores (docs/benchmarks.md,
    "The small end"), and by then everything autotune writes is whole on disk: files are written
    atomically, the stores' transactions committed, the MLflow runs ended. The streams and the
    logging handlers are flushed first. An error that escapes `main` ends the process as
    Python does, traceback and all."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):  # a message, as Python says it
            sys.stderr.write(f"{code}\n")
            code = 1
        leave(code or 0)
    leave(0)


def leave(code: int) -> NoReturn:
    """Flush what is said and logged, then end the process at once with `code`."""
    import logging
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
