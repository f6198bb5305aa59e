"""Thin entry point: ``python convert.py --hf-path SRC --mlx-path DIR`` is
``genesis-mlx convert --hf-path SRC --mlx-path DIR``."""

import sys

from genesis_mlx.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
