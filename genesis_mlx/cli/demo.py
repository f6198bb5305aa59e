"""Offline end-to-end path: a random-weight checkpoint in the reference's own format
is written, converted and loaded, and generates (gibberish, but through every
stage a real model goes through)."""

import tempfile
from pathlib import Path

from ..checks import check_seed
from ..conversion.convert import convert
from ..conversion.reference_format import DEMO, write_reference_checkpoint
from ..generation.generate import SamplingOptions, generate
from ..loading import load


def add_arguments(p):
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--tokenizer", default=None,
                   help="GPT-NeoX tokenizer.json (default: EleutherAI/pythia-70m from the Hub)")
    p.add_argument("--prompt", default="Tell me about the ocean.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def run(args):
    check_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        checkpoint = write_reference_checkpoint(work / "genesis-demo.safetensors", DEMO, args.seed)
        print(f"[demo] wrote a random-weight reference checkpoint: {checkpoint}")
        model_dir = convert(str(checkpoint), str(work / "genesis-demo-mlx"),
                            tokenizer=args.tokenizer, force=True)
        print(f"[demo] converted to {model_dir}")
        model, tokenizer = load(str(model_dir))
        print(f"[demo] generating {args.max_tokens} tokens (random weights: expect gibberish)")
        generate(model, tokenizer, args.prompt, args.max_tokens, verbose=True,
                 sampling=SamplingOptions(temp=0.0, seed=args.seed))
    print("[demo] ok")
