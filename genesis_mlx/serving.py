"""``genesis-mlx serve``: mlx-lm's own OpenAI-compatible server (``mlx_lm.server``, its
batched path) on a converted Genesis directory, from any model source the other
commands take. mlx-lm's ``main`` parses the options and runs the server; it builds
its model provider, response generator and prompt cache from subclasses here, which
add:

- the model loads before the port opens, so a model that cannot load is a one-line
  error rather than a server whose generation thread died;
- requests may name only the served model: with ``--trust-remote-code``, a request
  naming another Hub repo would make mlx-lm download that repo and run its code;
- requests that mlx-lm would let end its generation thread (every later request then
  fails) or the whole process get an HTTP error instead;
- a prompt whose every token is in the prompt cache is answered: mlx-lm would hand
  its batch an empty prompt (only trimmable caches avoid that, and recurrent state
  cannot be trimmed), which ends its generation thread.
"""

import contextlib
import sys
from pathlib import Path
from typing import Iterable, List, Optional

from .conversion.convert import read_config
from .conversion.mlx_lm_files import FORMAT_VERSION, model_file_problem
from .errors import GenesisError
from .loading import directory_format, has_tokenizer, resolve_model_dir

# What mlx-lm's server calls the model it was started with.
DEFAULT_MODEL = "default_model"


def servable_dir(src: str, revision: Optional[str] = None,
                 tokenizer: Optional[str] = None) -> Path:
    """A converted directory mlx-lm's server can be told to trust: its model file
    is genesis-mlx's own and its format is one this version reads."""
    model_dir = resolve_model_dir(src, tokenizer, revision)
    config = read_config(model_dir)
    written = directory_format(model_dir)
    if written > FORMAT_VERSION:
        raise GenesisError(f"{model_dir} was written by a newer genesis-mlx (format {written}, "
                           f"this one reads {FORMAT_VERSION}): pip install -U genesis-mlx")
    problem = model_file_problem(model_dir, config)
    if problem:
        raise GenesisError(problem)
    if not has_tokenizer(model_dir):
        raise GenesisError(f"{model_dir} has no tokenizer (tokenizer.json), which mlx-lm's "
                           "server needs; convert the checkpoint again with --tokenizer PATH")
    return model_dir


@contextlib.contextmanager
def quiet_transformers():
    # transformers warns that config.json's model_type is unknown to it: harmless.
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def check_sampling(args, vocab_size: int):
    """Sampling options mlx-lm's request handler lets through but its generation
    thread fails on (ValueError -> an HTTP error)."""
    sampling, bias = args.sampling, args.logits.logit_bias
    if sampling.top_k >= vocab_size:
        raise ValueError(f"top_k must be below the vocabulary size ({vocab_size})")
    if sampling.xtc_probability > 0 and sampling.xtc_threshold > 0.5:
        raise ValueError("xtc_threshold must be at most 0.5")
    # An index outside the logits is written out of bounds: the process crashes.
    if bias and any(not 0 <= token < vocab_size for token in bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")


def server_classes(names: Iterable[str], started: list) -> dict:
    """Subclasses of the classes mlx-lm's server builds, by the names it looks them
    up under; they serve only the model of the command line, known by any of
    ``names``. Each ResponseGenerator made (its generation thread running) is
    appended to ``started``."""
    from mlx_lm import server

    served = {DEFAULT_MODEL, *names}

    class ModelProvider(server.ModelProvider):
        def __init__(self, cli_args):
            super().__init__(cli_args)
            try:
                self.load(DEFAULT_MODEL)
            except Exception as e:
                raise GenesisError(
                    f"mlx-lm cannot load {cli_args.model}: {first_line(e)}") from None
            self.vocab_size = self.model.args.vocab_size

        def load(self, model_path, adapter_path=None, draft_model_path=None):
            if model_path not in served:
                raise ValueError(f"model {model_path!r} is not served here; this server "
                                 f"serves {self.cli_args.model} (or ask for {DEFAULT_MODEL!r})")
            if draft_model_path not in (None, DEFAULT_MODEL):
                raise ValueError("draft models are not supported by genesis-mlx serve")
            # Every name of the served model is mlx-lm's default model (its adapters too).
            with quiet_transformers():
                return super().load(DEFAULT_MODEL, adapter_path, draft_model_path)

    class ResponseGenerator(server.ResponseGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

        def generate(self, request, generation_args, progress_callback=None):
            check_sampling(generation_args, self.model_provider.vocab_size)
            # mlx-lm's batch refuses an empty prompt by raising in its generation thread.
            # A chat prompt never is one (the template writes a system turn), nor is
            # text of at least one character (GPT-NeoX's BPE encodes every byte).
            if request.request_type == "text" and not request.prompt:
                raise ValueError("the prompt is empty")
            return super().generate(request, generation_args, progress_callback)

    class LRUPromptCache(server.LRUPromptCache):
        def fetch_nearest_cache(self, model, tokens):
            cache, rest = super().fetch_nearest_cache(model, tokens)
            if tokens and not rest:
                # The whole prompt is cached, but the batch must read at least its
                # last token: take the cache of the prompt without it.
                cache, rest = super().fetch_nearest_cache(model, tokens[:-1])
                rest = rest + tokens[-1:]
            return cache, rest

    return {"ModelProvider": ModelProvider, "ResponseGenerator": ResponseGenerator,
            "LRUPromptCache": LRUPromptCache}


@contextlib.contextmanager
def mlx_lm_server(names: Iterable[str], argv: List[str]):
    """mlx-lm's server module, its ``main`` to run with ``argv`` and to build the
    classes above under the names it looks up. On the way out, a generation thread
    still running (the server failed to start) is stopped: it would keep the process
    alive."""
    from mlx_lm import server

    started = []
    classes = server_classes(names, started)
    saved = {name: getattr(server, name) for name in classes}, sys.argv
    for name, cls in classes.items():
        setattr(server, name, cls)
    sys.argv = ["mlx_lm.server", *argv]
    try:
        yield server
    finally:
        for name, cls in saved[0].items():
            setattr(server, name, cls)
        sys.argv = saved[1]
        for generator in started:
            generator.stop_and_join()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def serve(src: str, server_args: List[str], revision: Optional[str] = None,
          tokenizer: Optional[str] = None):
    """Runs mlx-lm's server on ``src`` (any model source) until Ctrl-C.
    ``server_args``: mlx-lm server options (--host, --port, --max-tokens, ...)."""
    model_dir = servable_dir(src, revision, tokenizer)
    names = {src, str(model_dir), str(model_dir.resolve())}
    argv = ["--model", str(model_dir), "--trust-remote-code", *server_args]
    print(f"[genesis-mlx] serving {model_dir} with mlx-lm's server", file=sys.stderr, flush=True)
    with mlx_lm_server(names, argv) as server:
        try:
            server.main()
        except OSError as e:  # the port: taken, or not ours to bind
            raise GenesisError(f"cannot serve on the given --host/--port ({first_line(e)}); "
                               "pick another --port") from None
