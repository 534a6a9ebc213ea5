"""Starting Ray for both Ray engines (`index --engine ray`, `serve --engine ray`): joining a
cluster by address, one line when it cannot be joined (at once when nothing listens there: Ray's
own connect would retry for a minute; the fix when the cluster wants a token), else a Ray of the
process's own.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any

from .errors import RayClusterError

PROBE_S = 5.0  # how long the address gets to accept a connection


def start_or_join(ray: Any, address: str | None, logging_level: int = logging.ERROR) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a Ray of this process's own on
    this machine's cores ("local": even where `ray start` runs one, which `ray.init()` would
    join); True when it started one. The driver sends its logs nowhere."""
    address = address or os.environ.get("RAY_ADDRESS")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lance")  # Ray forks its daemons; they run none of Lance's code
        if address:
            join(ray, address, logging_level)
            return False
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging_level)
        return True


def join(ray: Any, address: str, logging_level: int = logging.ERROR) -> None:
    """`ray.init(address=...)` for a driver that sends its logs nowhere; RayClusterError (one line)
    when nothing listens at a host:port address or Ray cannot join it. ("auto" and other forms
    Ray resolves itself are left to it.)"""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
        except OSError as error:
            raise RayClusterError(address, OSError(f"nothing accepts a connection there ({error.strerror or error})")) from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging_level)
    except Exception as error:  # noqa: BLE001 - whatever Ray raises, the user reads one line
        raise RayClusterError(address, error) from None
