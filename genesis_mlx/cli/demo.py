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
    p.add_argument("--dir", default=None,
                   help="work directory, kept afterwards: its model directory then works "
                        "with generate, chat and serve (default: a temporary one, deleted "
                        "at the end)")
    p.add_argument("--tokenizer", default=None,
                   help="GPT-NeoX tokenizer.json (default: EleutherAI/pythia-70m's, from the "
                        "Hub)")
    p.add_argument("--prompt", default="Tell me about the ocean.",
                   help="the prompt (default: %(default)r)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights and of sampling (default: %(default)s)")


def run(args):
    check_seed(args.seed)
    if args.dir is None:
        print("[demo] working in a temporary directory, deleted at the end (--dir DIR "
              "keeps the files)")
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
    if args.dir is None:
        print("[demo] ok; the files above are deleted now. To keep them: genesis-mlx demo "
              "--dir DIR, then genesis-mlx chat --model DIR/genesis-demo-mlx (generate and "
              "serve take it too)")
    else:
        print(f"[demo] ok; the model stays in {model_dir}: genesis-mlx chat --model "
              f"{model_dir} (generate and serve take it too)")
