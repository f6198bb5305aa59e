from ..conversion.checkpoint import DEFAULT_REPO
from ..conversion.convert import DTYPES, convert
from ..errors import GenesisError
from .generate import add_revision_argument

Q_BITS, Q_GROUP_SIZE = 4, 64


def add_arguments(p):
    p.add_argument("--hf-path", default=DEFAULT_REPO,
                   help="Hub repo id, local directory or .safetensors (default: %(default)s)")
    add_revision_argument(p)
    p.add_argument("--mlx-path", default="genesis-mlx-model",
                   help="output directory (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weight dtype (default: bfloat16 on a GPU, float32 on the CPU; "
                        "float32 reproduces the reference's numbers)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the weights (see --q-bits, --q-group-size)")
    p.add_argument("--q-bits", type=int, default=None,
                   help=f"bits per weight with -q: 2-6 or 8 (default {Q_BITS})")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"quantization group size with -q: 32, 64 or 128 (default {Q_GROUP_SIZE})")
    p.add_argument("--tokenizer", default=None,
                   help="GPT-NeoX tokenizer.json or directory (default: EleutherAI/pythia-70m's, "
                        "from the Hub)")
    p.add_argument("--force", action="store_true",
                   help="replace the model already in --mlx-path (files genesis-mlx did not "
                        "write are kept; a directory of other files is refused)")


def run(args):
    given = [flag for flag, value in (("--q-bits", args.q_bits),
                                      ("--q-group-size", args.q_group_size)) if value is not None]
    if given and not args.quantize:
        raise GenesisError(f"{' and '.join(given)} only apply when quantizing; add -q "
                           "(--quantize)")
    bits = Q_BITS if args.q_bits is None else args.q_bits
    group_size = Q_GROUP_SIZE if args.q_group_size is None else args.q_group_size
    out = convert(args.hf_path, args.mlx_path, args.dtype, args.quantize, bits, group_size,
                  args.tokenizer, args.force, revision=args.revision)
    print(f"[genesis-mlx] converted model written to {out}")
