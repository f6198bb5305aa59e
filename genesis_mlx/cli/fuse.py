from ..loading import load, resolve_model_dir
from ..tuning.adapters import fuse
from .generate import add_revision_argument


def add_arguments(p):
    p.add_argument("--model", required=True, help="the base model the adapters were trained on")
    add_revision_argument(p)
    p.add_argument("--adapter-path", required=True)
    p.add_argument("--save-path", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --save-path")


def run(args):
    model_dir = resolve_model_dir(args.model, args.tokenizer, args.revision)
    model, _ = load(str(model_dir), adapter_path=args.adapter_path)
    out = fuse(model, model_dir, args.save_path, args.force)
    print(f"[genesis-mlx] fused model written to {out}")
