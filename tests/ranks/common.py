"""Shared by the scripts that run on every rank under ``mlx.launch``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The rank scripts import the test helpers (families) from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_result(out_dir: str, rank: int, result: Any) -> None:
    path = Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(path)
