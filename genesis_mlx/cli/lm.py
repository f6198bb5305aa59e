"""``genesis-mlx lm TOOL ARGS...``: mlx-lm's own tools (genesis_mlx/mlx_lm_cli.py)."""

import argparse

from ..mlx_lm_cli import TOOLS


def add_arguments(p):
    p.add_argument("tool", metavar="TOOL", help=f"one of mlx-lm's tools: {', '.join(TOOLS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the tool's own options, as mlx_lm TOOL takes them (TOOL --help "
                        "lists them); a Genesis directory needs --trust-remote-code")


def run(args):
    from ..mlx_lm_cli import run_tool

    run_tool(args.tool, args.args)
