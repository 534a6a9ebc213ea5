"""The file a running `serve` keeps in its collection (`layout.SERVER_FILE`), through which
`btsearch search` finds it and sends its query there instead of loading the model.

JSON: the server's pid and url, the collection it serves (its folder's resolved path and the
manifest's model and creation time: a folder rebuilt in place is another collection), the
device and precision it runs the model with, and a bearer token (null when the API wants
none). Written with mode 0600 (a token is a secret) when the server starts, removed when it
stops; a file left by a killed server is recognised by its dead pid or a failed health check.
Light to import: the CLI reads it without torch.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..indexers.atomic import atomic_write
from ..indexers.layout import MANIFEST, SERVER_FILE


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    url: str  # where the API answers, e.g. http://127.0.0.1:8000
    collection: str  # the folder's resolved path
    created: str  # the manifest's
    model: str  # the manifest's
    device: str  # as `serve --device` was given ("auto" unless told)
    precision: str  # as `serve --precision` was given
    token: str | None = None  # sent as `Authorization: Bearer <token>` when set

    @property
    def alive(self) -> bool:
        """Whether the process that wrote it still runs (a killed server's file outlives it)."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it runs, as another user
            return True
        return True


def collection_identity(folder: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """(resolved path, creation time, model) of the collection at `folder`, from its manifest;
    None when it has no readable one."""
    path = Path(folder).resolve()
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return str(path), str(manifest["created"]), str(manifest["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write(folder: str | os.PathLike[str], url: str, device: str, precision: str, token: str | None = None) -> ServerRecord:
    """Announce this process as the collection's server (ValueError when the folder has no
    readable manifest: the caller opens the collection first)."""
    identity = collection_identity(folder)
    if identity is None:
        raise ValueError(f"{folder} has no readable manifest")
    path, created, model = identity
    record = ServerRecord(
        pid=os.getpid(), url=url, collection=path, created=created, model=model, device=device, precision=precision, token=token,
    )
    with atomic_write(Path(path) / SERVER_FILE) as out:
        if hasattr(os, "fchmod"):
            os.fchmod(out.fileno(), 0o600)  # before a byte is written
        out.write(json.dumps(asdict(record), indent=1).encode())
    return record


def read(folder: str | os.PathLike[str]) -> ServerRecord | None:
    """The collection's server file; None when there is none or it cannot be read as one."""
    try:
        fields = json.loads((Path(folder) / SERVER_FILE).read_text(encoding="utf-8"))
        return ServerRecord(**fields)
    except (OSError, ValueError, TypeError):
        return None


def remove(folder: str | os.PathLike[str]) -> None:
    """Remove the file if this process wrote it (another server may have announced itself since)."""
    record = read(folder)
    if record is not None and record.pid == os.getpid():
        (Path(folder) / SERVER_FILE).unlink(missing_ok=True)


@contextmanager
def announced(folder: str | os.PathLike[str], url: str, device: str, precision: str, token: str | None = None) -> Iterator[ServerRecord]:
    """The server file for as long as the block runs (a server's lifetime). In the main thread,
    SIGTERM raises SystemExit meanwhile: uvicorn shuts down on it and then raises it again with
    the handler it found, which would otherwise end the process before the file is removed."""
    record = write(folder, url, device, precision, token)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main else None
    try:
        yield record
    finally:
        remove(folder)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
