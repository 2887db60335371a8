"""How each trial ended and why, said the same way everywhere: the progress line, the summary's
counts, `autotune trials` and the history figure; and the summary table at 80 columns."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
from click.testing import CliRunner
from optuna.trial import TrialState
from rich.console import Console

from autotune.cli import main
from autotune.core.names import (
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    INTERRUPTED_ATTR,
    PRUNED_REASON_ATTR,
    SURPLUS_ATTR,
)
from autotune.search.endings import (
    COMPLETE,
    FAILED,
    GATED,
    INTERRUPTED,
    NOT_STARTED,
    PRUNED,
    counts_line,
    ending,
    ending_counts,
    told,
    why,
)
from autotune.search.pruners import VarianceShiftPruner, pruning_rule

BLOCKS = [
    {"placement": "after_act", "rate": 0.09, "regularizer": "alpha_dropout", "bn_momentum": 0.013},
    {
        "placement": "before_bn",
        "rate": 0.33,
        "regularizer": "stochastic_depth",
        "bn_momentum": 0.11,
    },
    {"placement": "after_bn", "rate": 0.5, "regularizer": "spatial_dropout", "bn_momentum": 0.5},
    {"placement": "none", "rate": 0.0, "regularizer": "none", "bn_momentum": 0.0228},
    {"placement": "after_act", "rate": 0.12, "regularizer": "dropblock", "bn_momentum": 0.2},
]


def every_ending() -> optuna.Study:
    """A study with a trial that ended each way, as the objective records them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="endings", direction="maximize")

    def trial(state: TrialState, attrs: dict, steps: dict[int, float] | None = None, value=None):
        t = study.ask()
        t.set_user_attr(CONFIG_ATTR, BLOCKS)
        for key, item in attrs.items():
            t.set_user_attr(key, item)
        for step, reported in (steps or {}).items():
            t.report(reported, step)
        study.tell(t, value, state=state)

    trial(TrialState.COMPLETE, {}, {1: 0.9, 2: 0.95}, value=0.95)
    reason = "pruned after epoch 2: val_acc=0.8000, by the median rule: not in the best 50 %"
    trial(TrialState.PRUNED, {PRUNED_REASON_ATTR: reason}, {1: 0.7, 2: 0.8})
    gate = "pruned before training: predicted Δ 0.338 at block1.bn, outside the gate's [0.5, 2]"
    trial(TrialState.PRUNED, {PRUNED_REASON_ATTR: gate})
    trial(TrialState.FAIL, {FAIL_REASON_ATTR: "ValueError: bad shape: (3, 4)\nmore lines"})
    trial(TrialState.FAIL, {INTERRUPTED_ATTR: True})
    trial(TrialState.FAIL, {SURPLUS_ATTR: True, FAIL_REASON_ATTR: "not started: others took it"})
    trial(TrialState.PRUNED, {})  # stored by a version that recorded no reason
    return study


def test_each_ending_is_told_apart_and_says_why():
    study = every_ending()
    kinds = [ending(t) for t in study.trials]
    # pruned in training and gated before it are both PRUNED to Optuna; three kinds of FAIL
    assert kinds == [COMPLETE, PRUNED, GATED, FAILED, INTERRUPTED, NOT_STARTED, GATED]
    lines = [told(t, "val_acc") for t in study.trials]
    assert lines[0] == "complete: val_acc=0.9500 after 2 epochs"
    # the epoch is said once, then the rule
    assert lines[1] == (
        "pruned after epoch 2: val_acc=0.8000, by the median rule: not in the best 50 %"
    )
    assert lines[2] == (
        "gated before training: predicted Δ 0.338 at block1.bn, outside the gate's [0.5, 2]"
    )
    # a failure keeps its type and only its first line
    assert lines[3] == "failed: ValueError: bad shape: (3, 4)"
    assert lines[4].startswith("interrupted: by a signal")
    assert lines[5] == "not started: others took it"
    # no reason stored: how it ended is still said
    assert lines[6] == "gated before training" and why(study.trials[6]) == ""


def test_the_trials_filter_offers_every_ending():
    from autotune.cli_study import ENDED
    from autotune.search.endings import ENDINGS

    # written out in the CLI, which imports no Optuna for --help: the same names
    assert ENDED == ENDINGS


def test_counts_separate_gated_from_pruned_and_interrupted_from_failed():
    counts = ending_counts(every_ending())
    assert counts == {
        COMPLETE: 1,
        PRUNED: 1,
        GATED: 2,
        FAILED: 1,
        INTERRUPTED: 1,
        NOT_STARTED: 1,
    }
    # the four that are always said, even at zero; the others only where there are any
    empty = optuna.create_study()
    assert counts_line(ending_counts(empty)) == "0 complete, 0 pruned, 0 gated, 0 failed"


def test_the_pruner_says_which_rule_stopped_a_trial_in_training():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    pruner = VarianceShiftPruner(base, threshold=0.5)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.9, 0.95):
        t = study.ask()
        t.set_user_attr("predicted_delta", 1.0)
        t.report(value, 1)
        study.tell(t, value)
    t = study.ask()
    t.set_user_attr("predicted_delta", 0.6)  # shifted: the median rule is made stricter
    t.report(0.5, 1)
    assert t.should_prune()
    rule = pruning_rule(study.pruner, t.number)
    assert rule.startswith("by the median rule: not in the best ")
    assert "at epoch 1, narrowed from 50 % for its predicted Δ 0.600" in rule
    # read once: the rule belongs to the stop it explained
    assert pruning_rule(study.pruner, t.number) == ""
    # a plain Optuna pruner is named by its rule
    assert pruning_rule(base, t.number) == "by the median rule"


def test_the_progress_line_of_each_trial_says_how_it_ended_and_the_best():
    from autotune.run.progress import RichProgress

    study = every_ending()
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=80), "val_acc", 12)
    for trial in study.trials:
        progress.trial_done(study, trial)
    lines = out.getvalue().splitlines()
    text = " ".join(lines)
    # a line each, whole however long: a log is read a trial a line
    assert [line.split()[1] for line in lines] == [str(t.number) for t in study.trials]
    # piped: a line per trial, with the best so far since there is no bar to read it from
    assert "trial 0 complete: val_acc=0.9500 after 2 epochs" in text
    assert "trial 2 gated before training: predicted Δ 0.338" in text
    assert "trial 3 failed: ValueError: bad shape: (3, 4)" in text
    assert "best 0.9500 (trial 0)" in text


def test_the_summary_fits_80_columns_without_cutting_a_value(tmp_path):
    from autotune.run.summary import summary_table

    study = every_ending()
    for value in (0.9722, 0.9688):
        t = study.ask()
        t.set_user_attr(CONFIG_ATTR, BLOCKS)
        study.tell(t, value)
    out = io.StringIO()
    Console(file=out, width=80).print(summary_table(study, "val_acc", len(study.trials)))
    lines = out.getvalue().splitlines()
    # nothing past the 80th column, and nothing cut short with an ellipsis
    assert max(len(line) for line in lines) <= 80
    assert "…" not in out.getvalue()
    # each block on a line of its own
    for wanted in ("0 alpha_dropout after_act 0.09 m=0.013", "3 none m=0.023"):
        assert any(wanted in line for line in lines), wanted
    # the longest that can be (40 characters) wraps at a space: every value still whole
    words = out.getvalue().split()
    assert all(word in words for word in ("stochastic_depth", "before_bn", "0.33", "m=0.11"))


def test_the_history_figure_marks_gated_trials(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from autotune.outputs.report import _history

    figure, ax = plt.subplots()
    _history(ax, every_ending(), "val_acc")
    labels = ax.get_legend_handles_labels()[1]
    plt.close(figure)
    assert "gated before training" in labels and "pruned in training" in labels


# --- autotune trials ------------------------------------------------------------------------


def test_trials_lists_a_stored_study_from_its_storage_alone(stored):
    result = CliRunner().invoke(main, ["trials", str(stored), "--sort", "value"])
    assert result.exit_code == 0, result.output
    # a row per trial, best first, each with how it ended and its blocks
    rows = [line.split()[:3] for line in result.output.splitlines() if line[:5].strip().isdigit()]
    assert rows[0][0] == "2"  # the stored study's best trial
    assert all(row[1] in ("complete", "pruned", "gated", "failed") for row in rows)
    # JSON: every trial, with its configuration and how it ended
    result = CliRunner().invoke(main, ["trials", str(stored), "--json"])
    records = json.loads(result.output)
    assert [r["number"] for r in records] == sorted(r["number"] for r in records)
    assert {"ended", "why", "value", "epochs", "blocks", "params"} <= set(records[0])
    # a filter by how they ended
    result = CliRunner().invoke(main, ["trials", str(stored), "--json", "--ended", "complete"])
    assert {r["ended"] for r in json.loads(result.output)} == {"complete"}


def test_trials_of_a_study_that_is_not_there_is_one_line(write_spec):
    from conftest import tiny_spec

    spec = write_spec(tiny_spec())
    result = CliRunner().invoke(main, ["trials", str(spec)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


# --- autotune init --------------------------------------------------------------------------


def test_init_writes_a_starter_spec_that_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init"])
    assert result.exit_code == 0, result.output
    text = Path("spec.yaml").read_text()
    # commented: every line of a section says why
    assert text.count("#") > 15
    result = CliRunner().invoke(main, ["validate", "spec.yaml"])
    assert result.exit_code == 0, result.output
    assert "data digits" in result.output
    # a second init does not write over the first
    result = CliRunner().invoke(main, ["init"])
    assert result.exit_code == 2 and "--force" in result.output
    # a name YAML would read as a number or a boolean is quoted, and still validates
    for name in ("2024.yaml", "on.yaml"):
        assert CliRunner().invoke(main, ["init", name]).exit_code == 0
        result = CliRunner().invoke(main, ["validate", name])
        assert result.exit_code == 0, result.output
        assert f"study '{Path(name).stem}'" in result.output


def test_init_with_a_model_writes_a_factory_the_spec_tunes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        main, ["init", "tune.yaml", "--model", "my_net.py", "--data", "breast_cancer"]
    )
    assert result.exit_code == 0, result.output
    assert "import: my_net:build" in Path("tune.yaml").read_text()
    result = CliRunner().invoke(main, ["validate", "tune.yaml"])
    assert result.exit_code == 0, result.output
    # the factory's two BatchNorm layers are two blocks
    assert "with 2 blocks" in result.output


def test_init_with_a_csv_names_its_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = "\n".join(f"{i % 3},{i * 0.5},{(i * 7) % 5}" for i in range(90))
    Path("table.csv").write_text("y,a,b\n" + rows + "\n")
    result = CliRunner().invoke(main, ["init", "--data", "table.csv", "--label", "y"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["validate", "spec.yaml"])
    assert result.exit_code == 0, result.output
    # a file that is not there, or outside the spec's folder: one line, exit 2
    for data in ("missing.csv", str(tmp_path.parent / "x.csv")):
        result = CliRunner().invoke(main, ["init", "other.yaml", "--data", data])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
