"""genesis-mlx doctor (the checks: genesis_mlx/doctor.py)."""

from ..checks import check_writable_file
from ..doctor import run_doctor


def add_arguments(p):
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the report, for bug reports, to this JSON file (default: "
                        "none written)")
    p.add_argument("--quick", action="store_true",
                   help="shorter sequences and fewer timing runs (CI)")


def run(args):
    if args.json is not None:
        check_writable_file(args.json, "--json")
    return run_doctor(args.json, args.quick)
