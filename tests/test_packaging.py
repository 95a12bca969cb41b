"""A non-editable install ships every package: pyproject.toml lists them by hand, so a new subpackage must be added."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).parent.parent


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvzip_cli").rglob("__init__.py")}
    assert on_disk | {"kvc_format"} == set(config["packages"])
    assert config["package-dir"] == {"kvc_format": "format"}
