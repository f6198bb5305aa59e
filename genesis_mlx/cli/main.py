"""``genesis-mlx`` command line: one subcommand per job, each in its own module."""

import argparse
import importlib
import sys

from ..errors import GenesisError

COMMANDS = {
    "convert": ("convert", "convert a reference checkpoint into an MLX model directory"),
    "generate": ("generate", "generate text from a prompt"),
    "chat": ("chat", "chat with the model in the terminal"),
    "demo": ("demo", "offline end-to-end demo on a small random-weight model"),
    "lora": ("lora", "fine-tune LoRA adapters on your data"),
    "fuse": ("fuse", "fold LoRA adapters into a plain model"),
    "serve": ("serve", "an OpenAI-compatible server (mlx-lm's) for the model"),
    "bench": ("bench", "speed and memory against the reference and mlx-lm"),
    "info": ("info", "what this machine runs: MLX device, BLAS, versions"),
    "doctor": ("doctor", "check the GPU kernels on this machine; a report for bug reports"),
    "lm": ("lm", "run one of mlx-lm's tools (mlx_lm TOOL ...), with the fast BLAS"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="genesis-mlx",
        description="Genesis-152M (GLA + FoX + TTT hybrid) on MLX. 'genesis-mlx COMMAND "
                    "--help' describes a command's options.")
    parser.add_argument("--version", action="version", version=f"genesis-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, (module, help_text) in COMMANDS.items():
        command = importlib.import_module(f"genesis_mlx.cli.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def check_environment():
    """The GENESIS_MLX_* settings that choose how the model computes, before any work."""
    from ..forms import setting
    from ..kernels.backend import environment_setting

    setting()
    environment_setting()


def main(argv=None) -> int:
    if argv is None:
        from ..cpu.blas import reexec_with_openblas

        reexec_with_openblas(sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        check_environment()
        return args.run(args) or 0
    except GenesisError as e:
        print(f"genesis-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
