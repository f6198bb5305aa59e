import platform


def add_arguments(p):
    pass


def run(args):
    import mlx.core as mx

    from .. import __version__
    from ..cpu.blas import advice, command_preload, describe
    from ..forms import why_arrangement

    print(f"genesis-mlx {__version__}, mlx {mx.__version__}")
    print(f"machine: {platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"device: {mx.default_device()}")
    print(f"forms: {why_arrangement()}")
    print(f"blas: {describe()} ({advice()})")
    libraries = command_preload()
    if libraries:  # for the user's own Python processes
        print(f"preload: LD_PRELOAD={':'.join(libraries)}")
