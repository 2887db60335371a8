"""The `autotune` command: a thin shell over the package. Parses, calls, prints.

Bad input (SpecError) is one line on stderr and exit code 2; an interrupted study exits with 130
and resumes when the same command runs again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from autotune.errors import SpecError

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
# the storage URL can come from the environment, so that a password never has to be in a spec
STORAGE_ENV = "AUTOTUNE_STORAGE"

storage_option = click.option(
    "--storage",
    help=f"Optuna storage URL (overrides study.storage and ${STORAGE_ENV}): sqlite:///, "
    "postgresql://, journal:///path, redis://.",
)


def _overrides(storage: str | None) -> dict[str, Any]:
    """--storage, else $AUTOTUNE_STORAGE, else what the spec says."""
    url = storage or os.environ.get(STORAGE_ENV)
    return {"study.storage": url} if url else {}


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """SpecError -> one line on stderr, exit 2; no traceback for the user's mistakes."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _console(*, stderr: bool = True) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autotune")
def main() -> None:
    """Find how a network should combine Dropout and BatchNorm."""


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    help="The study's trial budget (overrides study.n_trials).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds after which no new trial starts (overrides study.timeout).",
)
@storage_option
@_friendly
def run(spec_file: Path, n_trials: int | None, timeout: float | None, storage: str | None) -> None:
    """Run the study in SPEC_FILE, or resume it where it stopped."""
    from autotune.progress import RichProgress, print_summary
    from autotune.spec import load_spec
    from autotune.study import run_study

    spec = load_spec(spec_file, overrides=_overrides(storage))
    console = _console()
    progress = RichProgress(console, spec.study.metric, spec.train.max_epochs)
    outcome = run_study(spec, n_trials=n_trials, timeout=timeout, progress=progress)
    print_summary(console, spec, outcome)
    if outcome.interrupted:
        console.print(
            f"interrupted: run `autotune run {spec_file}` again to resume", soft_wrap=True
        )
        sys.exit(EXIT_INTERRUPTED)
    if outcome.stopped_by_failures:
        sys.exit(1)


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@_friendly
def validate(spec_file: Path) -> None:
    """Check SPEC_FILE, its search space and its data without training anything."""
    from autotune.data import load_data
    from autotune.spec import load_spec
    from autotune.study import check_runnable, resolve_space

    spec = load_spec(spec_file)
    space = resolve_space(spec)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    check_runnable(spec, space, data)
    click.echo(
        f"{spec_file}: ok: study {spec.study.name!r}, {spec.study.n_trials} trials, "
        f"{spec.model.template} with {len(space.blocks)} blocks, data {data.name} "  # type: ignore[attr-defined]
        f"{tuple(data.input_shape)} with {data.n_classes} classes"  # type: ignore[attr-defined]
    )


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@storage_option
@_friendly
def export(spec_file: Path, storage: str | None) -> None:
    """Write recommended.yaml and best_model.py again from the study in SPEC_FILE's storage."""
    from autotune.export import write_outputs
    from autotune.spec import load_spec
    from autotune.study import load_existing_study

    spec = load_spec(spec_file, overrides=_overrides(storage))
    study = load_existing_study(spec)
    try:
        paths = write_outputs(study, spec)
    except RuntimeError as exc:
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
@_friendly
def predict(spec_file: Path, config_file: Path | None, as_json: bool) -> None:
    """Predict each BN layer's variance shift Δ for a configuration, without training."""
    import json

    from autotune.data import load_data
    from autotune.progress import print_prediction
    from autotune.space import config_from_mapping
    from autotune.spec import load_spec, read_yaml
    from autotune.study import check_runnable, resolve_space
    from autotune.training import predict as predict_config

    spec = load_spec(spec_file)
    space = resolve_space(spec)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    check_runnable(spec, space, data)
    config = space.defaults()
    if config_file is not None:
        config = config_from_mapping(
            read_yaml(config_file, what="config file"),
            n_blocks=len(space.blocks),
            template=spec.model.template,
            source=str(config_file),
        )
    prediction = predict_config(spec, config, data)
    if as_json:
        click.echo(json.dumps({"config": config.to_params(), **prediction.to_dict()}, indent=2))
    else:
        print_prediction(_console(stderr=False), config, prediction)


@main.command()
@_friendly
def spaces() -> None:
    """List the search spaces in search_spaces/ and what they search."""
    from autotune.space import describe_space, list_spaces, load_space

    for name, path, description in list_spaces():
        click.echo(f"{name} ({path.name}): {description}")
        space = load_space(name, n_blocks=1, template="resnet")  # resnet: every choice applies
        for _, param, text in describe_space(space):
            click.echo(f"  {param:<14} {text}")


if __name__ == "__main__":
    main()
