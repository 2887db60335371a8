"""`autotune trials` (a study's trials, from its storage alone) and `autotune init` (a starter
spec, and a factory to start from). click alone is imported here."""

from __future__ import annotations

from pathlib import Path

import click

from autotune.cli_common import friendly, make_console, storage_option, url_overrides
from autotune.core.errors import SpecError

# search.endings.ENDINGS, without importing Optuna for --help
ENDED = (
    "complete",
    "pruned",
    "gated",
    "failed",
    "interrupted",
    "not started",
    "running",
    "waiting",
)


@click.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--sort",
    type=click.Choice(["number", "value", "ending", "epochs"]),
    default="number",
    show_default=True,
    help="The order: by trial number, by value (best first), by how they ended, by epochs.",
)
@click.option(
    "--ended",
    "endings",
    type=click.Choice(ENDED),
    multiple=True,
    help="Only the trials that ended so; give it more than once for several.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the trials as JSON, a list.")
@storage_option
@friendly
def trials(
    spec_file: Path, sort: str, endings: tuple[str, ...], as_json: bool, storage: str | None
) -> None:
    """List the trials of the study in SPEC_FILE: how each ended and why, its value, the
    epochs it trained and its configuration. Reads the Optuna storage alone, not MLflow."""
    import json

    from autotune.core.spec import load_spec
    from autotune.run.listing import listed, trial_record, trials_table
    from autotune.search.storage import load_existing_study

    spec = load_spec(spec_file, overrides=url_overrides(storage))
    study = load_existing_study(spec)
    chosen = listed(study, sort=sort, endings=endings)
    if as_json:
        click.echo(json.dumps([trial_record(t) for t in chosen], indent=2))
        return
    make_console(stderr=False).print(trials_table(study, chosen, spec.study.metric))


@click.command()
@click.argument("spec_file", type=click.Path(path_type=Path), default="spec.yaml")
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="A built-in dataset's name, or a csv or npz file of your own under the spec's folder.",
)
@click.option("--label", default="label", show_default=True, help="A file's label column.")
@click.option(
    "--model",
    "model_file",
    type=click.Path(path_type=Path),
    help="Also write a factory of your own network to this .py file, and tune it.",
)
@click.option("--force", is_flag=True, help="Overwrite files that are there.")
@friendly
def init(spec_file: Path, data: str, label: str, model_file: Path | None, force: bool) -> None:
    """Write a commented starter spec to SPEC_FILE (spec.yaml) that validates as it is; with
    --model, also a factory of your own network that the spec tunes."""
    from autotune.core.starter import starter_factory, starter_spec
    from autotune.core.writes import write_atomic

    data_file = Path(data) if Path(data).suffix in (".csv", ".npz") else None
    if data_file is not None and not data_file.is_file():
        raise SpecError(f"--data: no file {data_file}")
    text = starter_spec(
        spec_file,
        dataset=data,
        data_file=data_file,
        label=label,
        model_file=model_file,
    )
    written = [(spec_file, text)]
    if model_file is not None:
        written.append((model_file, starter_factory(model_file, spec_file)))
    for path, _ in written:
        if path.exists() and not force:
            raise SpecError(f"{path}: is there already; pass --force to write over it")
    for path, content in written:
        write_atomic(path, content.encode())
        click.echo(f"wrote {path}")
    click.echo(f"next: autotune validate {spec_file}, then autotune run {spec_file}")
