"""``python -m genesis_mlx.benchmark worker IMPL ...``: one worker, one JSON line.
The reference worker is started afresh as the bench starts it (a plain torch
process), so running it by hand measures what the bench measures."""

import os
import sys

from .environments import reference_command, reference_environment


def main(argv):
    if len(argv) < 2 or argv[0] != "worker":
        sys.exit("usage: python -m genesis_mlx.benchmark worker IMPL [options]")
    impl, options = argv[1], argv[2:]
    if impl == "reference":
        options = without_option(options, "--model")  # the reference reads the checkpoint
        command = reference_command(options)
        os.execve(command[0], command, reference_environment(os.environ))
    from .mlx_workers import main as mlx_worker

    mlx_worker([impl, *without_option(options, "--checkpoint")])


def without_option(options, name):
    """options minus ``name VALUE`` (the bench passes every worker both paths)."""
    out, skip = [], False
    for option in options:
        if skip:
            skip = False
        elif option == name:
            skip = True
        elif not option.startswith(name + "="):
            out.append(option)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
