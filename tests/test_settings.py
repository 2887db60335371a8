"""What a trial means stays fixed: a rerun whose spec changes what the stored study's trials
train with is refused in one line, unless asked; every trial records what it trained with."""

from __future__ import annotations

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

from autotune.cli import main
from autotune.core.errors import SpecError
from autotune.core.names import TRAINED_WITH_ATTR
from autotune.core.spec import load_spec
from autotune.run.preflight import resolve_space
from autotune.search.settings import first_change, settled, study_settings
from autotune.search.storage import open_study, spec_storage


def opened(write_spec, name: str = "spec.yaml", **sections):
    spec = load_spec(write_spec(tiny_spec(**sections), name))
    return spec, open_study(spec, resolve_space(spec))[0]


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"train": {"max_epochs": 3}}, r"train\.max_epochs: .* with 2, the spec says 3"),
        ({"train": {"lr": 0.01}}, r"train\.lr: .* with 0\.001, the spec says 0\.01"),
        ({"data": {"batch_size": 64}}, r"data\.batch_size: .* with 128, the spec says 64"),
        ({"search_space": {"params": {"rate": {"high": 0.3}}}}, r"search_space\.block0\.rate"),
        ({"study": {"pruner": "median"}}, r"study\.pruner\.name: .* with 'none'"),
        ({"data": {"standardize": False}}, r"data\.standardize: .* with 'unset', .* says False"),
    ],
)
def test_a_rerun_that_changes_what_trials_train_is_refused(write_spec, changed, named):
    opened(write_spec)
    changed_spec = load_spec(write_spec(tiny_spec(**changed), "changed.yaml"))

    # one line naming the change, and how to go on anyway
    with pytest.raises(SpecError, match=named) as raised:
        open_study(changed_spec, resolve_space(changed_spec))
    assert "--allow-changes" in str(raised.value) and "\n" not in str(raised.value)


def test_a_field_added_later_is_stored_only_where_it_changes_what_trials_did(write_spec):
    # data.standardize came after studies began to store their settings: at its default, what
    # every earlier trial did, it is left out, so a study stored before it resumes unchanged
    study = opened(write_spec)[1]
    assert "standardize" not in study.user_attrs[TRAINED_WITH_ATTR]["data"]
    study = opened(write_spec, "raw.yaml", data={"standardize": False}, study={"name": "raw"})[1]
    assert study.user_attrs[TRAINED_WITH_ATTR]["data"]["standardize"] is False


def test_where_and_how_fast_it_runs_and_the_budget_may_change(write_spec):
    opened(write_spec)
    faster = {"train": {"accelerator": "cpu", "compile": False}, "study": {"n_trials": 9}}

    # no change to what a trial learns: the rerun resumes
    opened(write_spec, "faster.yaml", **faster)


def test_an_allowed_change_is_stored_and_said(write_spec):
    spec, study = opened(write_spec)
    longer = load_spec(write_spec(tiny_spec(train={"max_epochs": 3}), "longer.yaml"))
    said: list[str] = []

    open_study(longer, resolve_space(longer), allow_changes=True, notify=said.append)

    # the study takes the new settings (the next rerun of this spec is not refused) and says so
    study = optuna.load_study(study_name="tiny", storage=spec_storage(spec))
    assert study.user_attrs[TRAINED_WITH_ATTR]["train"]["max_epochs"] == 3
    assert len(said) == 1 and "train.max_epochs" in said[0] and "--allow-changes" in said[0]
    open_study(longer, resolve_space(longer))


def test_a_study_stored_before_settings_were_kept_resumes_unchanged(write_spec):
    spec = load_spec(write_spec(tiny_spec(data={"test_fraction": None})))
    optuna.create_study(study_name="tiny", storage=spec_storage(spec), direction="maximize")

    # no settings stored: any spec resumes it, as it ran (without a test split), and today's
    # settings are kept from then on
    study, created = open_study(spec, resolve_space(spec))
    assert not created
    kept = study.user_attrs[TRAINED_WITH_ATTR]
    assert kept == study_settings(settled(spec, study), resolve_space(spec))
    assert kept["data"]["test_fraction"] == 0.0
    # a new study holds out the default test split
    new = tiny_spec(study={"name": "new"}, data={"test_fraction": None})
    new = load_spec(write_spec(new, "new.yaml"))
    study, created = open_study(new, resolve_space(new))
    assert created and study.user_attrs[TRAINED_WITH_ATTR]["data"]["test_fraction"] == 0.2


def test_a_data_file_is_known_by_its_rows_not_its_path(write_spec, tmp_path):
    rows = "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
    (tmp_path / "one.csv").write_text(rows)
    (tmp_path / "moved.csv").write_text(rows)
    (tmp_path / "other.csv").write_text(rows.replace("\n1,", "\n5,"))
    opened(write_spec, data={"name": None, "path": "one.csv"})

    # the same rows elsewhere: the same study; other rows: refused
    opened(write_spec, "moved.yaml", data={"name": None, "path": "moved.csv"})
    with pytest.raises(SpecError, match=r"data\.path: .*sha256:"):
        opened(write_spec, "other.yaml", data={"name": None, "path": "other.csv"})


def test_first_change_names_the_first_differing_field():
    stored = {"train": {"lr": 0.1, "max_epochs": 2}, "data": {"name": "digits"}}

    assert first_change(stored, stored) is None
    assert first_change(stored, {**stored, "train": {"lr": 0.1, "max_epochs": 5}}) == (
        "train.max_epochs",
        "2",
        "5",
    )
    assert first_change(stored, {**stored, "data": {}})[0] == "data.name"
    assert first_change(stored, {**stored, "extra": 1}) == ("extra", "'unset'", "1")


def test_every_trial_records_what_it_trained_with(write_spec):
    first = write_spec(tiny_spec(study={"n_trials": 1}))
    assert CliRunner().invoke(main, ["run", str(first)]).exit_code == 0
    longer = write_spec(tiny_spec(study={"n_trials": 2}, train={"max_epochs": 3}), "longer.yaml")

    # refused in one line, exit code 2; then asked for, it runs
    refused = CliRunner().invoke(main, ["run", str(longer)])
    assert refused.exit_code == 2 and "train.max_epochs" in refused.output
    assert CliRunner().invoke(main, ["run", str(longer), "--allow-changes"]).exit_code == 0

    study = optuna.load_study(study_name="tiny", storage=spec_storage(load_spec(longer)))
    epochs = [t.user_attrs[TRAINED_WITH_ATTR]["train"]["max_epochs"] for t in study.trials]
    assert epochs == [2, 3]
    # recommended.yaml gives the epochs the recommended trial trained, whichever it is
    recommended = yaml.safe_load((load_spec(longer).output_dir / "recommended.yaml").read_text())
    assert recommended["train"]["max_epochs"] == epochs[recommended["best"]["trial"]]
