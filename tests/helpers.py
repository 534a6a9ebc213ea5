"""Helpers shared by the test modules: the CLI runner, a collection with captions, a server on a
free loopback port, the processes of a session (a server's, a Ray cluster's), and the papers'
original checkpoint layout."""

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from click.testing import CliRunner

from btsearch.cli.main import main


def run(*args, ok=True):
    """`btsearch ARGS` in-process; with `ok`, it must exit 0."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def index_with_captions(db, checkpoint, photos, photo_captions) -> None:
    """The sample photos indexed into `db` (fp32), and every caption of them added as a text."""
    run("index", photos[0].parent, "--db", db, "--model", checkpoint, "--precision", "fp32", "--batch-size", 4, "-q")
    texts = db.parent / "captions.txt"
    texts.write_text("\n".join(c for cs in photo_captions.values() for c in cs) + "\n")
    run("add-texts", texts, "--db", db, "--precision", "fp32", "-q")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session: a command started with start_new_session and
    what it started (a local Ray's GCS, raylet, workers, replicas)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session and not (entry / "stat").read_text().split(") ")[1].startswith("Z"):
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return found


def process_title(pid: int) -> str:
    """A process's command line, words joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_session(session: int, spare: int | None = None) -> None:
    """SIGKILL every process of a session but `spare`, until none is left (a worker forked
    meanwhile is caught in the next round)."""
    for _ in range(20):
        left = [pid for pid in session_processes(session) if pid != spare]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


def serve_in_thread(app) -> tuple[str, int, Callable[[], None]]:
    """uvicorn serving `app` on a free loopback port in a thread, with `serve`'s head limit:
    (url, port, stop)."""
    import uvicorn

    from btsearch.serve.app import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", port, stop


def to_original_layout(state: dict[str, torch.Tensor], body: str = "", itc_prefix: str = "") -> dict[str, torch.Tensor]:
    """Our key names back to the authors' (written by hand from microsoft/BridgeTower's and
    LooperXX/ManagerTower's code): the body under `body` in ours ("bridgetower." for
    transformers' layout) has no prefix there, CLIP's ViT sits under `vit_model.visual`, the ITC
    heads gain `itc_prefix` ("cross_modal_" in ManagerTower), and `logit_scale` is a temperature.
    CLIP's unused text-tower leftovers are added, as the original code saves them."""
    visual = body + "vision_model.visual."
    renames = {
        visual + "embeddings.patch_embedding.weight": "vit_model.visual.conv1.weight",
        visual + "embeddings.class_embedding": "vit_model.visual.class_embedding",
        visual + "embeddings.position_embedding.weight": "vit_model.visual.positional_embedding",
    }
    original = {}
    for key, tensor in state.items():
        if key in renames:
            original[renames[key]] = tensor
        elif key.startswith(body + "text_model."):
            original["text_transformer." + key.removeprefix(body + "text_model.")] = tensor
        elif key.startswith(visual):
            original["vit_model.visual." + key.removeprefix(visual)] = tensor
        elif key == "logit_scale":
            original["temperature"] = torch.exp(-tensor)  # logit_scale = log(1 / temperature)
        elif key.startswith(("itc_text_head.", "itc_image_head.")):
            original[itc_prefix + key] = tensor
        elif key.startswith("itm_score."):
            original[key] = tensor
        elif key.startswith(body):  # the rest of the body (transformers' itc_cross_modal_head has no original)
            original[key.removeprefix(body)] = tensor
    original["vit_model.positional_embedding"] = torch.zeros(77, 512)
    original["vit_model.ln_final.weight"] = torch.ones(512)
    original["vit_model.ln_final.bias"] = torch.zeros(512)
    return original
