"""Shared by the scripts that run on every rank under ``mlx.launch``."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# The rank scripts import the test helpers (families) from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_result(out_dir: str, rank: int, result: Any) -> None:
    path = Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(path)


COUNTED = ("send", "recv", "recv_like", "all_sum", "all_gather")
calls: Counter[str] = Counter()


def count_collectives() -> None:
    """Count every call of MLX's point-to-point and collective operations in ``calls``."""
    import mlx.core as mx

    for name in COUNTED:
        real = getattr(mx.distributed, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(mx.distributed, name, counted)
