"""`autotune diagnose` and `autotune fix`: the variance shift of a model that is already trained,
found and repaired without retraining (autotune.run.repair). click alone is imported here."""

from __future__ import annotations

from pathlib import Path

import click

from autotune.cli_common import fail, friendly, tracking_option, url_overrides
from autotune.core.names import EXIT_BAD_INPUT, EXIT_FAILED

spec_argument = click.argument("spec_file", type=click.Path(path_type=Path))
weights_option = click.option(
    "--weights",
    type=click.Path(path_type=Path),
    required=True,
    help="The trained weights: a state_dict, or a checkpoint that holds one (Lightning's).",
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="The configuration the weights were trained with (blocks, recalibrate_bn), e.g. a "
    "recommended.yaml: needed for a template, optional for model.import.",
)


@click.command()
@spec_argument
@weights_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path),
    help="Also write the diagnosis as one HTML page to this file.",
)
@click.option(
    "--mlflow",
    "to_mlflow",
    is_flag=True,
    help="Also log the diagnosis as a run of its own in the spec's MLflow experiment.",
)
@tracking_option
@friendly
def diagnose(
    spec_file: Path,
    weights: Path,
    config_file: Path | None,
    as_json: bool,
    html_file: Path | None,
    to_mlflow: bool,
    tracking_uri: str | None,
) -> None:
    """Measure the variance shift of trained WEIGHTS of SPEC_FILE's model, layer by layer, and
    what recalibrating BN (dropout off) would win on the validation split."""
    import json

    from autotune.core.checks import quiet_lightning
    from autotune.core.redaction import redact
    from autotune.core.spec import load_spec
    from autotune.core.writes import write_atomic
    from autotune.outputs.diagnosis import diagnosis_lines, diagnosis_page
    from autotune.run.repair import diagnose_spec, log_diagnosis

    quiet_lightning()
    spec = load_spec(spec_file, overrides=url_overrides(None, tracking_uri))
    diagnosis, _, _ = diagnose_spec(spec, weights, config_file)
    if as_json:
        click.echo(json.dumps({"weights": weights.name, **diagnosis.to_dict()}, indent=2))
    else:
        click.echo(f"{weights.name}: {spec.model.import_ or spec.model.template}")
        for line in diagnosis_lines(diagnosis):
            click.echo(line)
    page = diagnosis_page(diagnosis, f"autotune diagnose: {weights.name}")
    if html_file is not None:
        click.echo(f"wrote {write_atomic(html_file, page)}", err=as_json)
    if to_mlflow:
        run_id = log_diagnosis(spec, diagnosis, weights, page)
        click.echo(f"logged run {run_id} to {redact(spec.tracking_uri)}", err=as_json)


@click.command()
@spec_argument
@weights_option
@config_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the fixed weights (the input's state_dict keys); what was done goes "
    "beside it, in <out>.yaml.",
)
@friendly
def fix(spec_file: Path, weights: Path, config_file: Path | None, out: Path) -> None:
    """Recalibrate BN in trained WEIGHTS with dropout off, on the training split; verify on the
    validation split (and the test split where there is one); write the weights to OUT unless
    they score worse."""
    from autotune.core.checks import quiet_lightning
    from autotune.core.spec import load_spec
    from autotune.outputs.diagnosis import score_lines
    from autotune.run.repair import fix as fix_weights

    quiet_lightning()
    spec = load_spec(spec_file)
    if out.resolve() == weights.resolve():
        fail(f"--out: {out} is the input's own file: name another, the input stays", EXIT_BAD_INPUT)
    fixed = fix_weights(spec, weights, config_file, out)
    for line in score_lines(fixed.diagnosis):
        click.echo(line)
    if fixed.test is not None:
        before, after = (fixed.test[k]["acc"] for k in ("before", "after"))
        click.echo(f"test acc {before:.4f} as trained, {after:.4f} recalibrated")
    if fixed.refused is not None:
        if fixed.diagnosis.needs_fix:  # it would have made the weights worse: say so, fail
            fail(f"{out} not written: {fixed.refused}", EXIT_FAILED)
        click.echo(f"{out} not written: {fixed.refused}")
        return
    for path in fixed.written:
        click.echo(f"wrote {path}")
