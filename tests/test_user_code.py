"""autotune.user_code: the user's `package.module:name`, or one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.errors import SpecError
from autotune.user_code import import_object


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
