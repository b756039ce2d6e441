"""The built wheel ships the adapters as ppwrap.adapters, never as a top-level module."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_ships_adapters_inside_the_package_and_py_typed(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ppwrap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    adapters = sorted(p.name for p in (ROOT / "adapters").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("ppwrap/adapters/")) == adapters
    assert not any(n.startswith("adapters/") for n in names)
    assert "ppwrap/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
