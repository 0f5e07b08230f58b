"""docs/expert-parallel.md against the CLI: its options table names every expert-parallel option each command
takes, with the CLI's defaults and the combine choices of runtime/parallel/options.py."""

import re
from pathlib import Path

import typer

from moetrt.cli import app
from moetrt.runtime.parallel.options import COMBINE_CHOICES, DEFAULT_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "expert-parallel.md").read_text()
COMMANDS = ("generate", "chat", "eval", "verify", "serve")


def documented_options() -> dict[str, str]:
    """{option: default column} from the doc's options table."""
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", DOC, flags=re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def expert_parallel_options(command: str) -> dict[str, object]:
    """{option: click parameter} of `command` that belong to expert parallelism."""
    click_command = typer.main.get_command(app).commands[command]
    return {name: param for param in click_command.params for name in param.opts
            if name.startswith(("--expert-", "--ep-", "--record-routing"))}


def test_every_command_that_loads_an_engine_takes_the_documented_options():
    documented = documented_options()
    for command in COMMANDS:
        assert set(expert_parallel_options(command)) == set(documented), command


def test_the_documented_defaults_and_choices_are_the_clis():
    documented, options = documented_options(), expert_parallel_options("serve")
    assert documented["--ep-timeout"] == f"{DEFAULT_TIMEOUT:g}" == f"{options['--ep-timeout'].default:g}"
    assert documented["--ep-combine"] == f"`{options['--ep-combine'].default}`"
    assert re.search(r"`--ep-combine " + r"\\\|".join(COMBINE_CHOICES) + "`", DOC)
