"""`spidr-fast --help`, `--version` and every subcommand's `--help` answer without importing torch."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from spidr_fast.__main__ import COMMANDS

# Runs the CLI in a fresh interpreter and reports afterwards whether torch was ever imported.
PROBE = """
import sys
from spidr_fast.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
"""


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_commands_without_torch() -> None:
    proc = _probe("--help")
    assert "NO_TORCH" in proc.stderr, proc.stderr
    for command in ("demo", "extract", "manifest", "train", "export", "--version"):
        assert command in proc.stdout, proc.stdout


def test_version_without_torch() -> None:
    import spidr_fast

    proc = _probe("--version")
    assert "NO_TORCH" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == f"spidr-fast {spidr_fast.__version__}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_without_torch(command: str) -> None:
    # Every registered subcommand: its module (parser + main) imports torch only when main runs.
    proc = _probe(command, "--help")
    assert "NO_TORCH" in proc.stderr, proc.stderr
    assert f"usage: spidr-fast {command}" in proc.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_module_holds_its_parser_and_main(command: str) -> None:
    # The convention `__main__` relies on: one module per command, with add_arguments(parser), main(args) and a
    # docstring (the command's --help description).
    module = importlib.import_module(COMMANDS[command][0])
    module.add_arguments(argparse.ArgumentParser())
    assert callable(module.main) and module.__doc__


def test_python_m_spidr_fast_help_imports_no_torch() -> None:
    # The real entry point, with Python's own import log: no torch module among the imports.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "spidr_fast", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "spidr_fast.__main__" in imported or "spidr_fast" in imported
    assert not [name for name in imported if name == "torch" or name.startswith("torch.")]
    assert "train" in proc.stdout and "extract" in proc.stdout


def test_public_api_still_imports_from_the_package() -> None:
    import spidr_fast

    for name in spidr_fast.__all__:
        assert getattr(spidr_fast, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = spidr_fast.no_such_name


def test_extract_dtype_choices_are_the_extractors() -> None:
    # `extract --dtype` lists its names without importing torch: they must stay the extractor's.
    from spidr_fast.extract import DTYPE_NAMES
    from spidr_fast.extraction.extractor import DTYPES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
