"""Every command line the README shows still exists as written: each script and module answers --help, each
flag the README passes it is one it declares, and each `--section.key` override names a config field.
(The commands' behaviour is tested where it lives; this guards the README against a renamed entry point
or flag.)"""

import contextlib
import io
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

from train.config import TrainConfig

# runpy warns when it re-runs a module the test process has already imported: expected here
pytestmark = [
    pytest.mark.compat,
    pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPT_LINE = re.compile(r"python3? (scripts/\w+\.py)((?: [^`|#\n]*)?)")
MODULE_LINE = re.compile(r"python3? -m (train|data\.prepare|model)\b((?: [^`|#\n]*)?)")
FLAG = re.compile(r"(?<![\w.-])(--[a-z][a-z0-9-]*)(?![\w.])")
OVERRIDE = re.compile(r"(?<![\w-])--([a-z_]+\.[a-z_.]+)[= ]")
SUBCOMMANDS = {"scripts/bench.py"}  # `bench.py NAME --flags`: flags belong to NAME


def readme_commands() -> dict[tuple[str, ...], set[str]]:
    """{(entry point, subcommand?): flags the README passes it}."""
    found: dict[tuple[str, ...], set[str]] = {}
    for pattern in (SCRIPT_LINE, MODULE_LINE):
        for entry, rest in pattern.findall(README):
            entry = entry if entry.startswith("scripts/") else f"-m {entry}"
            words = rest.split()
            key = (entry, words[0]) if entry in SUBCOMMANDS and words and not words[0].startswith("-") else (entry,)
            found.setdefault(key, set()).update(FLAG.findall(rest))
    return found


def help_text(entry: str, *args: str) -> str:
    """`entry --help` run in this process (scripts by path, as `python scripts/X.py` runs them)."""
    out = io.StringIO()
    argv = [entry, *args, "--help"]

    def leave(code: int) -> None:
        raise SystemExit(code)

    # python -m train leaves by os._exit once DeepSpeed is imported (train/__main__.py exit_now), and an
    # earlier test may have imported it into this process: that would end pytest itself, silently
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as stop,
    ):
        patch.setattr(os, "_exit", leave)
        old, sys.argv = sys.argv, argv
        try:
            if entry.startswith("-m "):
                runpy.run_module(entry[3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / entry), run_name="__main__")
        finally:
            sys.argv = old
    assert stop.value.code in (0, None), f"{' '.join(argv)} exited {stop.value.code}"
    return out.getvalue()


def test_the_readme_shows_every_entry_point():
    entries = {key[0] for key in readme_commands()}
    scripts = {f"scripts/{path.name}" for path in (ROOT / "scripts").glob("*.py") if path.name != "gpu_check.py"}
    assert scripts <= entries, f"scripts the README never shows: {sorted(scripts - entries)}"
    assert {"-m train", "-m data.prepare", "-m model"} <= entries


@pytest.mark.parametrize("command", sorted(readme_commands()), ids=" ".join)
def test_a_readme_command_exists_with_its_flags(command):
    entry, *subcommand = command
    text = help_text(entry, *subcommand)
    if entry == "-m train":  # its options are config fields (see the override test)
        assert "--config" in text
        return
    flags = readme_commands()[command] - {"--help"}
    missing = sorted(flag for flag in flags if flag not in text)
    assert not missing, f"README passes {' '.join(command)} {missing}, which its --help does not declare"


def unknown_overrides(section_keys: set[str]) -> list[str]:
    """The `section.key` names that are no field of the config schema (free-form tables accept any key)."""
    unknown = []
    for section_key in section_keys:
        node = TrainConfig
        for part in section_key.split("."):
            fields = getattr(node, "model_fields", None)
            if fields is None:
                break  # a free-form table, e.g. model.overrides.*
            if part not in fields:
                unknown.append(section_key)
                break
            node = fields[part].annotation
    return sorted(unknown)


def test_readme_overrides_name_config_fields():
    names = set(OVERRIDE.findall(README)) - {"section.key"}  # the placeholder of the syntax line
    assert "run.max_steps" in names
    assert not unknown_overrides(names), f"README overrides naming no config field: {unknown_overrides(names)}"


def test_the_checks_see_a_wrong_flag_or_field():
    assert "--no-such-flag" not in help_text("scripts/plot.py")
    assert unknown_overrides({"run.max_steps", "run.no_such_key", "model.overrides.anything"}) == ["run.no_such_key"]
