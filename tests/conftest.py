"""Fixtures shared by the test packages."""
import textwrap
import uuid

import pytest


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(source) -> the name of a fresh importable module holding `source` (user plug-in functions)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"plug_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name
    return write
