from ..conversion.checkpoint import DEFAULT_REPO
from ..conversion.convert import DTYPES, convert
from .generate import add_revision_argument


def add_arguments(p):
    p.add_argument("--hf-path", default=DEFAULT_REPO,
                   help="Hub repo id, local directory or .safetensors (default: %(default)s)")
    add_revision_argument(p)
    p.add_argument("--mlx-path", default="genesis-mlx-model", help="output directory")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weight dtype (float32 reproduces the reference's numbers)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--tokenizer", default=None,
                   help="GPT-NeoX tokenizer.json or directory (default: EleutherAI/pythia-70m)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --mlx-path")


def run(args):
    out = convert(args.hf_path, args.mlx_path, args.dtype, args.quantize, args.q_bits,
                  args.q_group_size, args.tokenizer, args.force, revision=args.revision)
    print(f"[genesis-mlx] converted model written to {out}")
