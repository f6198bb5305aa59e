"""Text generation: mlx-lm's ``stream_generate`` loop over this package's token loop
(``steps.generate_step``, which hands out the first token sooner); sampling, the
streaming detokenizer and the responses are mlx-lm's. The decoding state (GLA
recurrent state, FoX K/V, TTT statistics) is the model's own cache, so TTT stays on
while decoding."""

import sys
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generation_stream, wired_limit
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..checks import check_finite, check_seed
from ..errors import GenesisError
from .steps import generate_step

# mlx slices and indexes with 32-bit integers.
MAX_INDEX = 2**31 - 1

# The reference CLI's defaults (genesis/cli.py).
DEFAULT_TEMP = 0.7
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.05

@dataclass
class SamplingOptions:
    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = 0.0
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: Optional[int] = None

    def validate(self):
        for flag, value in (("--temp", self.temp), ("--top-p", self.top_p),
                            ("--min-p", self.min_p),
                            ("--repetition-penalty", self.repetition_penalty)):
            check_finite(flag, value)
        check_seed(self.seed)
        if self.temp < 0:
            raise GenesisError(f"--temp {self.temp}: temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise GenesisError(f"--top-p {self.top_p}: must be in (0, 1] (1 disables it)")
        if self.top_k < 0:
            raise GenesisError(f"--top-k {self.top_k}: must be >= 0 (0 disables it)")
        if not 0 <= self.min_p <= 1:
            raise GenesisError(f"--min-p {self.min_p}: must be in [0, 1] (0 disables it)")
        if self.repetition_penalty <= 0:
            raise GenesisError(
                f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 disables it)"
            )

    def sampler(self, vocab_size: Optional[int] = None):
        """mlx-lm's sampler. A top_k of ``vocab_size`` or more keeps every token, as
        0 does (mlx-lm refuses it)."""
        top_k = 0 if vocab_size is not None and self.top_k >= vocab_size else self.top_k
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=top_k)

    def logits_processors(self, context: int):
        if self.repetition_penalty == 1.0:
            return []
        # The reference penalises every token of the sequence, not a window.
        return [make_repetition_penalty(self.repetition_penalty, context_size=context)]


def render_prompt(tokenizer, prompt: str, system_prompt: Optional[str] = None,
                  use_chat_template: bool = True) -> List[int]:
    if not prompt:
        raise GenesisError("the prompt is empty; pass --prompt TEXT (or - to read stdin)")
    if not use_chat_template:
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def truncate_left(tokens: List[int], limit: int, warn=True) -> List[int]:
    """Keeps the last ``limit`` tokens, as the reference's generate does."""
    if len(tokens) <= limit:
        return tokens
    if warn:
        print(f"[genesis-mlx] warning: prompt has {len(tokens)} tokens, more than the "
              f"model's context ({limit}); keeping the last {limit}", file=sys.stderr)
    return tokens[-limit:]


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    sampling: Optional[SamplingOptions] = None,
    prompt_cache: Optional[list] = None,
    system_prompt: Optional[str] = None,
    use_chat_template: bool = True,
    kv_bits: Optional[int] = None,
) -> Iterator[GenerationResponse]:
    """Streams GenerationResponse chunks. ``prompt`` is text (rendered with the chat
    template unless ``use_chat_template`` is False) or token ids (used as given).
    Pass ``prompt_cache`` (``model.make_cache()``) to continue from earlier state:
    it is updated in place. ``kv_bits`` quantizes a new cache's FoX K/V."""
    sampling = sampling or SamplingOptions()
    sampling.validate()
    if max_tokens == 0 or max_tokens < -1:
        raise GenesisError(f"--max-tokens {max_tokens}: must be positive (or -1 for no limit)")
    if isinstance(prompt, str):
        tokens = render_prompt(tokenizer, prompt, system_prompt, use_chat_template)
    else:
        tokens = list(prompt)
        if not tokens:
            raise GenesisError("the prompt is empty")
    tokens = truncate_left(tokens, model.args.block_size)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    # The repetition penalty's window: every token there can be (past 2**31 - 1, the
    # window is the whole sequence anyway).
    context = min(model.args.block_size + max(max_tokens, 0) + 1_000_000, MAX_INDEX)
    steps = generate_step(
        mx.array(tokens), model, max_tokens=max_tokens,
        sampler=sampling.sampler(model.args.vocab_size),
        logits_processors=sampling.logits_processors(context),
        prompt_cache=prompt_cache if prompt_cache is not None else model.make_cache(kv_bits),
    )
    yield from responses(model, tokenizer, steps, len(tokens), max_tokens)


def responses(model, tokenizer, steps, n_prompt: int, max_tokens: int
              ) -> Iterator[GenerationResponse]:
    """mlx-lm's ``stream_generate`` loop (as of mlx-lm 0.32) over ``steps``: text by
    its streaming detokenizer, the stop at an end-of-sequence token or ``max_tokens``,
    the speeds. ``steps`` is closed before the final response, so the cache holds
    every token handed out by then, as with mlx-lm's loop."""
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    prompt_tps = 0.0

    def response(token, logprobs, n, finish_reason=None):
        return GenerationResponse(
            text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=False,
            prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=n / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason)

    with wired_limit(model, [generation_stream]), closing(steps):
        tic, token = time.perf_counter(), None
        for n, (token, logprobs) in enumerate(steps):
            if n == 0:
                prompt_tps = n_prompt / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield response(token, logprobs, n + 1)
        steps.close()
        if token is None:  # no token at all (max_tokens 0)
            return
        detokenizer.finalize()
        finish = "stop" if token in tokenizer.eos_token_ids else "length"
        yield response(token, logprobs, n + 1, finish)


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False,
             **kwargs) -> str:
    """Generates and returns the whole completion text."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def print_stats(response: GenerationResponse, file=sys.stderr):
    print("=" * 10, file=file)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
          file=file)
    print(f"Generation: {response.generation_tokens} tokens, "
          f"{response.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=file)
