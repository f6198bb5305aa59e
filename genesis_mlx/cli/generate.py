import sys

from ..checks import check_kv_bits
from ..conversion.checkpoint import DEFAULT_REPO
from ..conversion.convert import DTYPES
from ..conversion.tokenizer import DEFAULT_SYSTEM_PROMPT
from ..errors import GenesisError
from ..generation.generate import (
    DEFAULT_REPETITION_PENALTY, DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P, SamplingOptions,
    print_stats, stream_generate,
)
from ..loading import load


TOKENIZER_HELP = ("GPT-NeoX tokenizer.json (or its directory), used instead of the model's "
                  "own (needed to convert a raw checkpoint offline, or for a model "
                  "directory without one)")


def add_revision_argument(p):
    p.add_argument("--revision", default=None,
                   help="for a Hub repo id: the commit, branch or tag to download "
                        "(default: the default branch)")


def add_dtype_argument(p):
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="what a Hub repo or a reference .safetensors is converted to on first "
                        "use (default: bfloat16 on a GPU, float32 on the CPU); a converted "
                        "directory keeps its own")


def add_model_arguments(p):
    p.add_argument("--model", default=DEFAULT_REPO,
                   help="Hub repo id, converted model directory or reference .safetensors "
                        "(default: %(default)s)")
    add_revision_argument(p)
    add_dtype_argument(p)
    p.add_argument("--adapter-path", default=None,
                   help="LoRA adapter directory, as genesis-mlx lora writes it "
                        "(default: none)")
    p.add_argument("--tokenizer", default=None,
                   help=TOKENIZER_HELP + " (default: the model's own)")
    p.add_argument("--ttt", choices=["on", "off"], default="on",
                   help="test-time training while decoding; off: as the reference's own "
                        "generate (default: %(default)s)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="store the FoX layers' K/V quantized to 4 or 8 bits (less memory, "
                        "small logit error; default: exact)")


def add_sampling_arguments(p):
    p.add_argument("--max-tokens", "-m", type=int, default=256,
                   help="the most tokens to generate; -1 for no limit (until the model "
                        "ends its answer) (default: %(default)s)")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                   help="nucleus sampling: the smallest set of tokens of this total "
                        "probability; 1 keeps all (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help="sample among this many most likely tokens; 0 keeps all "
                        "(default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the likeliest one's "
                        "probability; 0 keeps all (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY,
                   help="penalty on every token already in the sequence (its logit "
                        "divided by it, or multiplied if negative); 1 is none "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, 0 to 2**64-1 (default: a random one)")
    p.add_argument("--system-prompt", default=None,
                   help=f"the system turn of the chat template (default: "
                        f"{DEFAULT_SYSTEM_PROMPT!r})")


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default=None,
                   help="the prompt, or - to read it from stdin (required)")
    add_sampling_arguments(p)
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt as plain text, without the chat template")
    p.add_argument("--verbose", action="store_true",
                   help="print speed and memory after the text")


def sampling_from(args) -> SamplingOptions:
    """The sampling options, checked (with the cache options) before loading."""
    check_kv_bits(args.kv_bits)
    options = SamplingOptions(args.temp, args.top_p, args.top_k, args.min_p,
                              args.repetition_penalty, args.seed)
    options.validate()
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise GenesisError(f"--max-tokens {args.max_tokens}: must be positive (or -1 for no limit)")
    return options


def load_from(args):
    return load(args.model, adapter_path=args.adapter_path, tokenizer=args.tokenizer,
                model_config={"ttt_enabled": args.ttt == "on"}, revision=args.revision,
                dtype=args.dtype)


def read_prompt(value):
    if value is None:
        raise GenesisError("no prompt; pass --prompt TEXT (or --prompt - to read stdin)")
    if value != "-":
        return value
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenesisError(f"stdin is not UTF-8 text (byte {e.start}); convert it first, "
                           "e.g. with iconv") from None


def run(args):
    sampling = sampling_from(args)
    prompt = read_prompt(args.prompt)
    model, tokenizer = load_from(args)
    cache, last = model.make_cache(args.kv_bits), None
    for last in stream_generate(model, tokenizer, prompt, args.max_tokens, sampling,
                                prompt_cache=cache, system_prompt=args.system_prompt,
                                use_chat_template=not args.ignore_chat_template):
        print(last.text, end="", flush=True)
    print()
    if args.verbose and last is not None:
        print_stats(last)
        print(f"Cache: {sum(c.nbytes for c in cache) / 1e6:.3f} MB", file=sys.stderr)
