"""Docs that cannot drift: every `btsearch ...` command line in README.md and docs/ names a command
that exists and options that command takes, with a value where it needs one, and no more
arguments than it accepts. The lines are parsed against the click commands, never run."""

import re
import shlex
from pathlib import Path

import click
import pytest

from btsearch.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```")
INLINE = re.compile(r"`(btsearch [^`]+)`")
SHELL_BREAKS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each `btsearch` command in a fenced block (a `$ ` prompt,
    backslash continuations, a trailing `# comment` and a path to the script, such as
    `.venv/bin/btsearch`, allowed) or in an inline code span."""
    found = []
    fenced = False
    lines = path.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            text = line.strip().removeprefix("$ ")
            start = number
            while text.endswith("\\") and number < len(lines):
                text = text[:-1] + " " + lines[number].strip()
                number += 1
            for part in re.split(r"&&|;|\|", text):  # each command of a chain or pipe
                part = part.strip()
                words = part.split()
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
                    words.pop(0)
                if words and (words[0] == "btsearch" or words[0].endswith("/btsearch")):
                    found.append((start, " ".join(words)))
        else:
            found += [(number, match) for match in INLINE.findall(line)]
    return found


def synopsis_words(command: str) -> list[str]:
    """The words of a command as click would see them: a comment dropped, a synopsis's `[...]`
    read as present and `A|B` as A, `...` (repeat) dropped, shell redirections ended at."""
    words = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    out = []
    for word in words:
        if word in SHELL_BREAKS or word.startswith((">", "2>")):
            break
        if word in ("...", "…"):
            continue
        out.append(word.split("|")[0] if re.fullmatch(r"[A-Za-z0-9_,.-]+(\|[A-Za-z0-9_,.-]+)+", word) else word)
    return out


def check_words(command: click.Command, words: list[str], where: str) -> None:
    """Fail unless `command` takes `words`: every option known (with its value), subcommands
    resolved, and the positional arguments within what the command accepts."""
    if isinstance(command, click.Group):
        options = [word for word in words if word.startswith("-")]
        positional = [word for word in words if not word.startswith("-")]
        if not positional:
            assert set(options) <= {"-h", "--help", "--version"}, f"{where}: {options} before a subcommand"
            return
        sub = command.commands.get(positional[0])
        assert sub is not None, f"{where}: no command {positional[0]!r} (has {sorted(command.commands)})"
        return check_words(sub, words[words.index(positional[0]) + 1 :], where)
    takes: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in [*param.opts, *param.secondary_opts]:
                takes[name] = param
    arguments = [param for param in command.params if isinstance(param, click.Argument)]
    unlimited = any(param.nargs == -1 for param in arguments)
    most = sum(max(param.nargs, 0) for param in arguments)
    positional = 0
    rest = iter(words)
    for word in rest:
        if word in ("-h", "--help"):
            return
        if word == "--":
            positional += sum(1 for _ in rest)
            break
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-\d+(\.\d+)?", word):
            name, equals, _ = word.partition("=")
            option = takes.get(name)
            assert option is not None, f"{where}: {command.name} has no option {name} (it has {sorted(takes)})"
            if not (option.is_flag or option.count):
                if not equals:
                    value = next(rest, None)
                    assert value is not None, f"{where}: {name} needs a value"
            continue
        positional += 1
    assert unlimited or positional <= most, f"{where}: {command.name} takes at most {most} arguments, the line gives {positional}"


def test_the_docs_name_commands_at_all():
    """The check below has something to check: the README's commands are found."""
    commands = [command for _, command in command_lines(ROOT / "README.md")]
    assert any(command.startswith("btsearch search ") for command in commands)
    assert any(command.startswith("btsearch index ") for command in commands)
    assert ".venv/bin/btsearch demo" in commands, "the first command on the page, run from the venv, is checked too"
    assert len(DOCS) > 1, "docs/ holds the guide's pages"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_documented_command_parses(path):
    for number, command in command_lines(path):
        check_words(main, synopsis_words(command)[1:], f"{path.relative_to(ROOT)}:{number}: {command}")


@pytest.mark.parametrize("line, problem", [
    ("btsearch serach cats --db photos.db", "no command 'serach'"),
    ("btsearch search cats --db", "--db needs a value"),
    ("btsearch search cats --top 5 --db photos.db", "has no option --top"),
    ("btsearch eval captions --db photos.db extra", "takes at most 0 arguments"),
    ("btsearch eval nothing --db photos.db", "no command 'nothing'"),
])
def test_a_drifted_line_is_caught(line, problem):
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_words(main, synopsis_words(line)[1:], line)
