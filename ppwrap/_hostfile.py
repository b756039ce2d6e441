"""MLX's ring host file: per rank, the ``ip:port`` addresses it listens on.

``mlx.launch`` (and ppwrap's local launcher) write it and hand every rank its
path in ``MLX_HOSTFILE``; the ring backend connects the ranks by it. ppwrap
reads it to find the ranks sharing a host, the ring's sockets and the
heartbeat addresses.
"""

from __future__ import annotations

import json
import os

__all__ = ["ring_hosts"]


def ring_hosts(environ: dict[str, str] | None = None) -> list[list[str]] | None:
    """Each rank's addresses from the host file ``MLX_HOSTFILE`` names.

    Returns:
        A list of ``"ip:port"`` strings per rank, or ``None`` without a host
        file (a single process, another backend) or with one of another form.
    """
    env = os.environ if environ is None else environ
    path = env.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(hosts, list) or not all(isinstance(h, list) and h for h in hosts):
        return None
    return [[str(address) for address in addresses] for addresses in hosts]
