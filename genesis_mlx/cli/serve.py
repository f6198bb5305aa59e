"""``genesis-mlx serve``: mlx-lm's OpenAI-compatible server on any model source."""

import json
import math
import re

from ..errors import GenesisError
from ..generation.steps import PREFILL_STEP
from ..serving import Limits
from .generate import add_dtype_argument, add_revision_argument

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

# mlx-lm server options passed on as given; left out, mlx-lm's default holds.
# (flag, type, help); the counts among them must be positive.
PASSED_ON = [
    ("--max-tokens", int, "default max_tokens of a request (mlx-lm's default: 512)"),
    ("--temp", float, "default temperature (mlx-lm's default: 0, greedy)"),
    ("--top-p", float, "default top_p of a request (mlx-lm's default: 1, all tokens)"),
    ("--top-k", int, "default top_k of a request (mlx-lm's default: 0, all tokens)"),
    ("--min-p", float, "default min_p of a request (mlx-lm's default: 0, all tokens)"),
    ("--decode-concurrency", int, "requests decoded together (mlx-lm's default: 32)"),
    ("--prompt-concurrency", int, "prompts read together (mlx-lm's default: 8)"),
    ("--prompt-cache-size", int, "prompt caches kept for reuse (mlx-lm's default: 10)"),
    ("--prompt-cache-bytes", str, "memory cap of the kept prompt caches, e.g. 2GB "
                                  "(mlx-lm's default: none)"),
    ("--adapter-path", str, "LoRA adapters to serve the model with (default: none)"),
    ("--allowed-origins", str, "CORS origins, comma separated (mlx-lm's default: *)"),
    ("--chat-template-args", str, "JSON for the chat template, e.g. '{\"key\": 1}' "
                                  "(default: none)"),
]
POSITIVE = ("max_tokens", "decode_concurrency", "prompt_concurrency", "prefill_step_size",
            "max_tokens_limit", "max_context")


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="Hub repo id, converted model directory or reference .safetensors "
                        "(required)")
    add_revision_argument(p)
    add_dtype_argument(p)
    p.add_argument("--tokenizer", default=None,
                   help="GPT-NeoX tokenizer.json, to convert a raw checkpoint offline "
                        "(default: the model's own)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080,
                   help="port to listen on (default: %(default)s)")
    for flag, kind, text in PASSED_ON:
        p.add_argument(flag, type=kind, default=None, help=text)
    # Our generate's prompt piece (mlx-lm's 2048 holds twice the FoX scores in memory).
    p.add_argument("--prefill-step-size", type=int, default=PREFILL_STEP,
                   help="prompt tokens read per step (default: %(default)s)")
    # What one request may take (genesis-mlx's own bounds; mlx-lm's server has none).
    p.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens,
                   help="the most tokens one request may generate; a larger max_tokens is "
                        "lowered to it (default: %(default)s)")
    p.add_argument("--max-context", type=int, default=Limits.max_context,
                   help="the most tokens a request's prompt and completion may hold together: "
                        "a longer prompt is refused (HTTP 400), a completion stops there "
                        "(default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=Limits.timeout,
                   help="seconds a request may take from its arrival; its completion ends "
                        "there, with finish_reason 'length' (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                   help="how much mlx-lm's server logs (default: %(default)s)")


def check(args):
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GenesisError(f"--{name.replace('_', '-')} {value}: must be positive")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise GenesisError(f"--request-timeout {args.request_timeout}: must be a positive "
                           "number of seconds")
    if args.max_tokens is not None and args.max_tokens > args.max_tokens_limit:
        raise GenesisError(f"--max-tokens {args.max_tokens} is above --max-tokens-limit "
                           f"{args.max_tokens_limit}; lower it, or raise --max-tokens-limit")
    if not 0 < args.port < 65536:
        raise GenesisError(f"--port {args.port}: must be in 1-65535")
    # mlx-lm's own parser answers these with a traceback or a usage text.
    size = args.prompt_cache_bytes
    if size is not None and not re.fullmatch(r"[0-9.]+\s*([MG]B?)?", size, re.IGNORECASE):
        raise GenesisError(f"--prompt-cache-bytes {size}: a number of bytes, e.g. 500MB or 2GB")
    if args.chat_template_args is not None:
        try:
            valid = isinstance(json.loads(args.chat_template_args), dict)
        except ValueError:
            valid = False
        if not valid:
            raise GenesisError(f"--chat-template-args {args.chat_template_args}: must be a "
                               "JSON object, e.g. '{\"enable_thinking\": false}'")


def server_argv(args) -> list:
    """The mlx-lm server options of ``args``, as its command line takes them."""
    argv = ["--host", args.host, "--port", str(args.port),
            "--prefill-step-size", str(args.prefill_step_size), "--log-level", args.log_level]
    for flag, _, _ in PASSED_ON:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


def limits_of(args) -> Limits:
    return Limits(args.max_tokens_limit, args.max_context, args.request_timeout)


def run(args):
    from ..serving import serve

    check(args)
    serve(args.model, server_argv(args), args.revision, args.tokenizer, limits_of(args),
          args.dtype)
