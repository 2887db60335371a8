"""autotune.core.user_code: the user's own code, imported by name, its failures said in one line
naming the field and told from ours."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from autotune.core.errors import SpecError, UserCodeError
from autotune.core.user_code import import_object, message_of, raised_in, raised_line


def _module(tmp_path: Path, code: str) -> str:
    """A module written to tmp_path under a name of its own; returns "module:build"."""
    name = f"user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(code)
    return f"{name}:build"


def test_an_exit_is_said_with_its_code():
    # SystemExit's message is only its code: it is named as the call it was
    assert raised_line(SystemExit(3)) == message_of(SystemExit(3)) == "SystemExit(3)"
    assert raised_line(SystemExit()) == "SystemExit(None)"
    assert raised_line(ValueError("bad\nmore")) == "ValueError: bad"
    assert message_of(ValueError("bad\nmore")) == "bad"


def test_a_module_that_exits_on_import_is_a_user_code_error(tmp_path: Path):
    target = _module(tmp_path, "raise SystemExit(3)\n")
    # one line naming the field; SystemExit does not leave the process
    with pytest.raises(UserCodeError, match=r"^model\.import: cannot import .*: SystemExit\(3\)$"):
        import_object(target, field="model.import", base_dir=tmp_path)
    # a UserCodeError is bad input like any SpecError
    assert issubclass(UserCodeError, SpecError)


def test_an_error_is_told_to_come_from_the_user_s_module_or_not(tmp_path: Path):
    target = _module(tmp_path, "def build():\n    raise SystemExit(4)\n")
    build = import_object(target, field="model.import", base_dir=tmp_path)
    with pytest.raises(SystemExit) as theirs:
        build()
    # raised in the user's module: theirs
    assert raised_in(theirs.value, target)
    # raised here, in autotune's own code (or a snippet it rendered): not theirs
    try:
        raise NameError("name 'drop_output' is not defined")
    except NameError as exc:
        assert not raised_in(exc, target)
    # a module that was never imported has no code to have raised anything
    assert not raised_in(theirs.value, "never_imported_xyz:build")


def test_a_module_that_is_not_there_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        import_object("fuzz_absent_module:build", field="model.import", base_dir=tmp_path)
    assert str(caught.value) == (
        "model.import: cannot import 'fuzz_absent_module:build': "
        "No module named 'fuzz_absent_module'"
    )


def test_a_long_name_is_echoed_by_its_start(tmp_path: Path) -> None:
    # the fuzz test's 10,000-character name: the error line held all of it, twice
    target = "fuzz_absent." + "pkg." * 2500 + "mod:" + "x" * 10_000
    with pytest.raises(SpecError) as caught:
        import_object(target, field="data.datamodule", base_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("data.datamodule: cannot import 'fuzz_absent.pkg.pkg.")
    assert "…" in message and len(message) < 400


# --- the arguments a factory gets from the data -----------------------------------------------


def test_a_factory_gets_the_data_under_the_names_common_models_use():
    from autotune.core.spec import ModelSpec
    from autotune.nn.surgery import factory_kwargs

    def mlp(in_features, num_classes, width=8): ...
    def cnn(in_channels, n_classes, img_size, depth=2): ...
    def tabular(input_dim, n_outputs): ...

    spec = ModelSpec.model_validate({"import": "user:build", "kwargs": {"width": 16}})
    # a flat feature count for a Linear, the class count by either name, what the spec gives
    assert factory_kwargs(spec, mlp, (1, 8, 8), 10) == {
        "width": 16,
        "in_features": 64,
        "num_classes": 10,
    }
    # an image's channels and side
    assert factory_kwargs(spec, cnn, (3, 16, 16), 4) == {
        "width": 16,
        "in_channels": 3,
        "n_classes": 4,
        "img_size": 16,
    }
    assert factory_kwargs(spec, tabular, (30,), 2) == {"width": 16, "input_dim": 30, "n_outputs": 2}

    # a default the factory chose stays, but for the two names autotune always filled
    def sized(input_size=128, n_classes=2, *, in_channels=3): ...

    assert factory_kwargs(spec, sized, (30,), 5) == {"width": 16, "n_classes": 5}


def test_a_factory_argument_the_data_cannot_tell_is_named_in_one_line():
    from autotune.core.spec import ModelSpec
    from autotune.nn.surgery import factory_kwargs

    def build(in_features, n_classes, depth, *, heads): ...

    spec = ModelSpec.model_validate({"import": "user:build"})
    with pytest.raises(SpecError) as caught:
        factory_kwargs(spec, build, (30,), 2)
    message = str(caught.value)
    # the field to set and every argument left without a value
    assert message.startswith("model.kwargs: 'user:build' needs 'depth', 'heads'")
    assert "in_features" in message and "\n" not in message

    # channels are not guessed for flat rows: a tabular in_channels is the user's to set
    def conv(in_channels, n_classes): ...

    with pytest.raises(SpecError, match="needs 'in_channels'"):
        factory_kwargs(spec, conv, (30,), 2)
