"""The SQL that the store writes (literals LanceDB's DataFusion reads) and reads back (its
complaints about a user's `where` predicate, made one line)."""

from __future__ import annotations

import re
from collections.abc import Iterable


class FilterError(ValueError):
    """A `where` predicate LanceDB's SQL cannot apply; the message is one line."""


def sql_problem(message: str, columns: list[str]) -> str:
    """LanceDB's (DataFusion's) complaint about a predicate as one line a user can act on."""
    unknown = re.search(r"No field named ([^.\s]+)", message)
    if unknown:
        name = unknown.group(1).strip("`'\"")
        return f"no column named {name}: the columns are {', '.join(columns)}"
    line = message.replace("Invalid input, ", "").splitlines()[0] if message.strip() else "not a condition"
    line = re.sub(r",?\s*/\S+\.rs:\d+:\d+.*$", "", line)  # the Rust source location means nothing to a user
    parse = re.search(r"sql parser error: (.*?)\)?$", line)
    if parse:
        return f"it does not parse ({parse.group(1)})"
    types = re.search(r"Received literal (\w+)\((.*?)\) and could not convert to literal of type '?([^']+)'?", line)
    if types:
        return f"the value {types.group(2)} does not compare with a column of type {types.group(3)}"
    return line.strip()


def sql_string(value: str) -> str:
    """A SQL string literal: LanceDB's SQL (DataFusion) escapes a quote by doubling it, nothing else."""
    return "'" + value.replace("'", "''") + "'"


def sql_ints(values: Iterable[int]) -> str:
    return ", ".join(str(int(value)) for value in values)
