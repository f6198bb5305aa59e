from ..benchmark import IMPLS, bench
from ..checks import check_writable_file
from ..conversion.convert import DTYPES
from ..errors import GenesisError
from .generate import add_revision_argument


def add_arguments(p):
    p.add_argument("--model", default="random",
                   help="'random' (a random-weight model of the real shape, offline) or a "
                        "reference checkpoint (.safetensors, directory or Hub id) "
                        "(default: %(default)s)")
    add_revision_argument(p)
    p.add_argument("--prompt-lengths", default="128,512,2048",
                   help="comma list of prompt lengths, in tokens (default: %(default)s)")
    p.add_argument("--gen", type=int, default=128,
                   help="tokens generated per measurement (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3,
                   help="interleaved rounds of every implementation and length; min and "
                        "median reported (default: %(default)s)")
    p.add_argument("--compare", default="genesis-mlx-kv8,reference,mlx-lm",
                   help="comma list of: genesis-mlx-kv8 (this port with 8-bit FoX K/V), "
                        "reference (genesis-llm, torch), mlx-lm (same-size Llama); "
                        "genesis-mlx itself always runs (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="the MLX rows' weights (default: bfloat16 on a GPU, float32 on the "
                        "CPU; the reference always runs in float32, as its users run it)")
    p.add_argument("--json", default=None,
                   help="write the report as JSON here (default: printed only)")


def run(args):
    try:
        lengths = [int(x) for x in args.prompt_lengths.split(",") if x]
    except ValueError:
        raise GenesisError(f"--prompt-lengths {args.prompt_lengths}: comma-separated integers") from None
    compare = [c for c in args.compare.split(",") if c]
    unknown = [c for c in compare if c not in IMPLS[1:]]
    if unknown or not lengths or args.gen < 1 or args.reps < 1:
        raise GenesisError(f"bench: --compare takes {','.join(IMPLS[1:])}; lengths, --gen and "
                          "--reps must be positive")
    if any(length < 1 for length in lengths):
        raise GenesisError(f"--prompt-lengths {args.prompt_lengths}: each length must be at "
                           "least 1 token")
    if args.json is not None:
        check_writable_file(args.json, "--json")
    if args.revision is not None and args.model == "random":
        raise GenesisError("--revision pins a Hub download; --model random has none")
    bench(args.model, lengths, args.gen, args.reps, compare, args.json, revision=args.revision,
          dtype=args.dtype)
