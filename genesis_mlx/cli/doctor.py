"""genesis-mlx doctor (the checks: genesis_mlx/doctor.py)."""

from ..checks import check_writable_file
from ..doctor import DEFAULT_REPORT, run_doctor


def add_arguments(p):
    p.add_argument("--json", metavar="PATH", default=DEFAULT_REPORT,
                   help=f"where to write the report (default: ./{DEFAULT_REPORT})")
    p.add_argument("--quick", action="store_true",
                   help="shorter sequences and fewer timing runs (CI)")


def run(args):
    check_writable_file(args.json, "--json")
    return run_doctor(args.json, args.quick)
