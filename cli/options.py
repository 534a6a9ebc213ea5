"""The options and terminal conventions every `btsearch` command shares: --quiet, --json,
--model, --device/--precision, --db, sizes; notes on stderr, results on stdout.

Light to import: nothing here loads torch, FAISS or LanceDB (see `btsearch.defaults`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from btsearch.defaults import DEFAULT_MODEL, DEVICE_CHOICES, PRECISION_CHOICES

F = TypeVar("F", bound=Callable[..., Any])

_quiet = False
_started = time.perf_counter()


def start_invocation() -> None:
    """Each invocation starts loud (a subcommand's --quiet sets it while parsing), and its clock."""
    global _quiet, _started
    _quiet = False
    _started = time.perf_counter()


def invocation_seconds() -> float:
    """Seconds since the command started: what the user waited, the model's loading included."""
    return time.perf_counter() - _started


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _quiet
    _quiet = bool(value)


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
    help="No progress bars, notes or skipped-file lines on stderr (errors still print; `info --skipped` lists skips).",
)


def show_progress() -> bool:
    return sys.stderr.isatty() and not _quiet


def say(message: str) -> None:
    """A note for the person at the terminal, on stderr; silent with --quiet."""
    if not _quiet:
        click.echo(message, err=True)


def json_option(what: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as one JSON object on stdout, for scripts.")


model_option = click.option(
    "--model",
    default=None,
    metavar="M",
    help=f"Hub id or local folder of a BridgeTower checkpoint with ITC heads [default: the collection's own, else {DEFAULT_MODEL}].",
)


def device_option(command: F) -> F:
    """--device and --precision: where the model runs, and in which number format."""
    command = click.option(
        "--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
        help="Model precision. auto: bf16 where the CPU or GPU computes it natively (several times faster), "
        "else fp16 on GPUs and fp32 on CPUs. fp32 reproduces transformers' scores exactly.",
    )(command)
    return click.option(
        "--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
        help="Where the model runs (auto: CUDA when present).",
    )(command)


db_option = click.option("--db", required=True, type=click.Path(file_okay=False, path_type=Path), help="The collection folder.")

_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes from a size such as 512MiB, 2GiB, 1.5G or 1000000; ValueError if it is none."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _SIZE_UNITS else (text, "")
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"{value!r} is not a size such as 512MiB or 2GiB") from None
    if size <= 0:
        raise ValueError(f"{value!r} is not a positive size")
    return size


class ByteSize(click.ParamType):
    """A size in bytes: 512MiB, 2GiB, 1.5G, 1000000."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
