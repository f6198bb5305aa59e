from ..loading import load, resolve_model_dir
from ..tuning.adapters import check_fuse_target, fuse
from .generate import TOKENIZER_HELP, add_revision_argument


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="the base model the adapters were trained on (required)")
    add_revision_argument(p)
    p.add_argument("--adapter-path", required=True,
                   help="the adapters, as genesis-mlx lora wrote them (required)")
    p.add_argument("--save-path", required=True,
                   help="output directory of the fused model (required)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP + "; the fused model "
                   "gets it (default: the model's own)")
    p.add_argument("--force", action="store_true",
                   help="replace the model already in --save-path (files genesis-mlx did not "
                        "write are kept; a directory of other files is refused)")


def run(args):
    model_dir = resolve_model_dir(args.model, args.tokenizer, args.revision)
    check_fuse_target(model_dir, args.save_path, args.force)  # before the model loads
    model, _ = load(str(model_dir), adapter_path=args.adapter_path, tokenizer=args.tokenizer)
    out = fuse(model, model_dir, args.save_path, args.force, args.tokenizer)
    print(f"[genesis-mlx] fused model written to {out}")
