"""The command line explains itself: every command listed in one line, every option
with help and its default, and --version."""

import argparse
import os
import subprocess
import sys

import pytest

from genesis_mlx import __version__
from genesis_mlx.cli.main import COMMANDS, build_parser


def genesis_mlx(*args):
    return subprocess.run([sys.executable, "-m", "genesis_mlx", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, COLUMNS="100"))


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_the_top_level_help_lists_every_command_in_one_line():
    result = genesis_mlx("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, (_, text) in COMMANDS.items():
        line = [l for l in lines if l.split()[:1] == [name]]
        assert line and line[0].split(None, 1)[1] == text, (name, line)
    assert set(subparsers()) == set(COMMANDS)


def test_version():
    result = genesis_mlx("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"genesis-mlx {__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_that_shows_its_default(command):
    """Flags say what they switch on; every other option says its default (by
    %(default)s or in words), or that it is required."""
    parser = subparsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (command, action.dest)
        if isinstance(action, argparse._StoreTrueAction) or not action.option_strings:
            continue
        text = parser._get_formatter()._expand_help(action)
        if action.required or "(required)" in text:  # generate's --prompt: checked in run
            assert "(required)" in text, (command, action.dest)
        else:
            assert "default" in text, (command, action.dest, text)
            if action.default is not None:
                shown = repr(action.default) if "%(default)r" in action.help else str(action.default)
                assert shown in text, (command, action.dest, text)


def test_max_tokens_tells_that_minus_one_means_no_limit():
    for command in ("generate", "chat"):
        help_text = subparsers()[command].format_help()
        assert "-1 for no limit" in help_text, command
