"""Joining a Ray cluster by address, for both Ray engines (`index --engine ray`, `serve --engine
ray`): one line when it cannot be joined, at once when nothing listens at the address (Ray's own
connect would retry for a minute), and the fix when the cluster wants a token.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from .errors import RayClusterError

PROBE_S = 5.0  # how long the address gets to accept a connection


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
