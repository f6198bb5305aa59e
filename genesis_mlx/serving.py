"""``genesis-mlx serve``: mlx-lm's own OpenAI-compatible server (``mlx_lm.server``, its
batched path) on a converted Genesis directory, from any model source the other
commands take. mlx-lm's ``main`` parses the options and runs the server; it builds
its model provider, response generator, prompt cache and request handler from
subclasses here, which add:

- the model loads before the port opens, so a model that cannot load is a one-line
  error rather than a server whose generation thread died;
- requests may name only the served model (else HTTP 404): with
  ``--trust-remote-code``, a request naming another Hub repo would make mlx-lm
  download that repo and run its code;
- bounds on every request (``Limits``): tokens generated, prompt + completion tokens,
  seconds; a request whose client closed its connection stops decoding at its next
  token, so no request can hold the batch, or the requests queued behind it, for long;
- requests that mlx-lm would let end its generation thread (every later request then
  fails) or the whole process, or that it answers with 404, get HTTP 400: the prompt
  is rendered and checked in the request's own thread, and the generation thread
  reuses it;
- a prompt whose every token is in the prompt cache is answered: mlx-lm would hand
  its batch an empty prompt (only trimmable caches avoid that, and recurrent state
  cannot be trimmed), which ends its generation thread;
- ``/v1/models`` lists the served model (mlx-lm lists the Hugging Face cache's).
"""

import contextlib
import dataclasses
import json
import math
import select
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from .checks import MAX_SEED
from .conversion.convert import read_config
from .conversion.mlx_lm_files import FORMAT_VERSION, model_file_problem
from .errors import GenesisError
from .loading import check_model_dir, directory_format, has_tokenizer, resolve_model_dir

# What mlx-lm's server calls the model it was started with.
DEFAULT_MODEL = "default_model"


@dataclass(frozen=True)
class Limits:
    """What one request may take: tokens generated (a larger max_tokens is lowered
    to it), prompt + completion tokens (a longer prompt is refused), seconds from its
    arrival (its completion ends there, as if cut for length)."""
    max_tokens: int = 4096
    max_context: int = 8192
    timeout: float = 600.0


class ClientGone(ConnectionError):
    """The client closed its connection: no one will read the rest of the answer."""


def readable(connection) -> bool:
    if hasattr(select, "poll"):  # select() cannot watch descriptors past FD_SETSIZE
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([connection], [], [], 0)[0])


def client_gone(connection) -> bool:
    """Whether the client has closed its side of ``connection`` (a client that gave
    up): the socket is readable then, with nothing to read."""
    if connection is None:
        return False
    try:
        return readable(connection) and not connection.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):
        return True


def within_bounds(responses, request):
    """A request's responses, checked as each arrives: once its client has gone the
    request ends (ClientGone; its handler then stops it in the batch); past its
    deadline, the response at hand is its last, cut for length."""
    for response in responses:
        if client_gone(request.connection):
            raise ClientGone()
        if response.finish_reason is None and time.monotonic() > request.deadline:
            yield dataclasses.replace(response, finish_reason="length")
            return
        yield response


def servable_dir(src: str, revision: Optional[str] = None,
                 tokenizer: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """A converted directory mlx-lm's server can be told to trust: its model file
    is genesis-mlx's own, its format is one this version reads, its config fits its
    weights (mlx-lm builds the model from it unchecked)."""
    model_dir = resolve_model_dir(src, tokenizer, revision, dtype)
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
    check_model_dir(model_dir)
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


# Request fields mlx-lm checks for type and range but not for NaN or infinity, which
# JSON as Python reads it allows (NaN, Infinity) and which would sample garbage.
FINITE_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "xtc_probability", "xtc_threshold")
# Window sizes mlx-lm slices the tokens with (32-bit indices): past the longest
# sequence a request can reach, a window is the whole sequence anyway.
CONTEXT_FIELDS = ("repetition_context_size", "presence_context_size", "frequency_context_size")


def check_request(handler, vocab_size: int):
    """What mlx-lm's request handler lets through but its generation thread fails on,
    or computes garbage from (ValueError -> HTTP 400). ``handler``: the request's,
    its fields parsed and type-checked by mlx-lm."""
    for name in FINITE_FIELDS:
        if not math.isfinite(getattr(handler, name)):
            raise ValueError(f"{name} must be a finite number")
    if handler.top_k >= vocab_size:
        raise ValueError(f"top_k must be below the vocabulary size ({vocab_size}); 0 disables it")
    if handler.xtc_probability > 0 and handler.xtc_threshold > 0.5:
        raise ValueError("xtc_threshold must be at most 0.5")
    bias = handler.logit_bias
    # An index outside the logits is written out of bounds: the process crashes.
    if bias and any(not 0 <= token < vocab_size for token in bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if bias and not all(math.isfinite(value) for value in bias.values()):
        raise ValueError("logit_bias values must be finite numbers")
    if handler.seed is not None and not 0 <= handler.seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}]")
    if handler.requested_draft_model not in (None, DEFAULT_MODEL):
        raise ValueError("draft models are not supported by genesis-mlx serve")
    if handler.adapter is not None:
        raise ValueError("adapters cannot be chosen per request: the server serves the "
                         "--adapter-path it was started with; leave 'adapters' out")
    check_prompt_fields(handler.path, handler.body)


def check_prompt_fields(path: str, body: dict):
    if path.endswith("chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ValueError("each message must be an object with a 'role' string")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")


def server_classes(model_id: str, names: Iterable[str], limits: Limits, started: list) -> dict:
    """Subclasses of the classes mlx-lm's server builds, and its ``run``, by the names
    its ``main`` looks them up under. They serve only the model of the command line,
    listed as ``model_id`` and known by any of ``names``, within ``limits``. Each
    ResponseGenerator made (its generation thread running) is appended to
    ``started``."""
    from mlx_lm import server

    served = {DEFAULT_MODEL, model_id, *names}
    served_model = server.ModelDescription(model=DEFAULT_MODEL, draft=DEFAULT_MODEL, adapter=None)

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
                                 f"serves {model_id!r} (or ask for {DEFAULT_MODEL!r})")
            if draft_model_path not in (None, DEFAULT_MODEL):
                raise ValueError("draft models are not supported by genesis-mlx serve")
            # Every name of the served model is mlx-lm's default model (its adapters too).
            with quiet_transformers():
                return super().load(DEFAULT_MODEL, adapter_path, draft_model_path)

    @dataclass
    class BoundedRequest(server.CompletionRequest):
        """A request with its rendered prompt (``ResponseGenerator._tokenize``'s
        result), its deadline and its client's socket."""
        tokenized: tuple = ()
        deadline: float = math.inf
        connection: Optional[socket.socket] = None

    class ResponseGenerator(server.ResponseGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tokenizer_lock = threading.Lock()
            started.append(self)

        def tokenize(self, request, chat_template_kwargs):
            """mlx-lm's prompt rendering, in the calling (request) thread."""
            args = types.SimpleNamespace(chat_template_kwargs=chat_template_kwargs)
            with self.tokenizer_lock:
                return super()._tokenize(self.model_provider.tokenizer, request, args)

        def _tokenize(self, tokenizer, request, args):
            tokenized = getattr(request, "tokenized", ()) or super()._tokenize(
                tokenizer, request, args)
            # mlx-lm's batch refuses an empty prompt by raising in its generation thread.
            if not tokenized[0]:
                raise ValueError("the prompt is empty")
            return tokenized

        def generate(self, request, generation_args, progress_callback=None):
            # The handler checked the names: one description for the model keeps
            # requests naming it differently in one batch (mlx-lm drains the batch
            # for another model).
            generation_args.model = served_model

            def progress(done, total):
                if client_gone(getattr(request, "connection", None)):
                    raise ClientGone()
                if progress_callback is not None:
                    progress_callback(done, total)

            ctx, responses = super().generate(request, generation_args, progress)
            if isinstance(request, BoundedRequest):
                responses = within_bounds(responses, request)
            return ctx, responses

    class LRUPromptCache(server.LRUPromptCache):
        def fetch_nearest_cache(self, model, tokens):
            cache, rest = super().fetch_nearest_cache(model, tokens)
            if tokens and not rest:
                # The whole prompt is cached, but the batch must read at least its
                # last token: take the cache of the prompt without it.
                cache, rest = super().fetch_nearest_cache(model, tokens[:-1])
                rest = rest + tokens[-1:]
            return cache, rest

    class APIHandler(server.APIHandler):
        # A client that stops sending or reading mid-request is dropped after this.
        timeout = limits.timeout

        def do_POST(self):
            self.arrived = time.monotonic()
            try:
                super().do_POST()
            except (ConnectionError, TimeoutError):  # the client went away (or stalled)
                self.close_connection = True

        def validate_model_parameters(self):
            super().validate_model_parameters()
            check_request(self, self.response_generator.model_provider.vocab_size)
            for name in CONTEXT_FIELDS:
                setattr(self, name, min(getattr(self, name), limits.max_context))

        def reply_error(self, status: int, message: str):
            self._set_completion_headers(status)
            self.end_headers()
            self.wfile.write(json.dumps({"error": message}).encode())

        def handle_completion(self, request, stop_words):
            if self.requested_model not in served:
                return self.reply_error(404, f"model {self.requested_model!r} is not served "
                                        f"here; ask for {model_id!r} (or {DEFAULT_MODEL!r})")
            try:
                tokenized = self.response_generator.tokenize(request, self.chat_template_kwargs)
            except Exception as e:
                return self.reply_error(400, f"cannot render the prompt: {first_line(e)}")
            prompt = tokenized[0]
            if not prompt:
                return self.reply_error(400, "the prompt is empty")
            if len(prompt) >= limits.max_context:
                return self.reply_error(
                    400, f"the prompt has {len(prompt)} tokens; this server takes prompts of "
                    f"fewer than {limits.max_context} (its --max-context, prompt and "
                    "completion together)")
            self.max_tokens = min(self.max_tokens, limits.max_tokens,
                                  limits.max_context - len(prompt))
            fields = {f.name: getattr(request, f.name)
                      for f in dataclasses.fields(server.CompletionRequest)}
            bounded = BoundedRequest(**fields, tokenized=tokenized,
                                     deadline=self.arrived + limits.timeout,
                                     connection=self.connection)
            super().handle_completion(bounded, stop_words)

        def handle_models_request(self):
            model = {"id": model_id, "object": "model", "created": self.created,
                     "owned_by": "genesis-mlx"}
            wanted = self.path[len("/v1/models"):].strip("/")
            if wanted and wanted not in served:
                return self.reply_error(404, f"model {wanted!r} is not served here")
            body = dict(model, id=wanted) if wanted else {"object": "list", "data": [model]}
            self._set_completion_headers(200)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

    def run(host, port, model_provider):
        """mlx-lm's ``run`` (one process), with the handler above."""
        prompt_cache = LRUPromptCache(model_provider.cli_args.prompt_cache_size)
        generator = ResponseGenerator(model_provider, prompt_cache)
        server._run_http_server(host, port, generator, handler_class=APIHandler)

    return {"ModelProvider": ModelProvider, "ResponseGenerator": ResponseGenerator,
            "LRUPromptCache": LRUPromptCache, "APIHandler": APIHandler, "run": run}


@contextlib.contextmanager
def mlx_lm_server(model_id: str, names: Iterable[str], limits: Limits, argv: List[str]):
    """mlx-lm's server module, its ``main`` to run with ``argv`` and to build the
    classes above under the names it looks up. On the way out, a generation thread
    still running (the server failed to start) is stopped: it would keep the process
    alive."""
    from mlx_lm import server

    started = []
    classes = server_classes(model_id, names, limits, started)
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
          tokenizer: Optional[str] = None, limits: Limits = Limits(),
          dtype: Optional[str] = None):
    """Runs mlx-lm's server on ``src`` (any model source) until Ctrl-C.
    ``server_args``: mlx-lm server options (--host, --port, --max-tokens, ...);
    ``limits``: what one request may take; ``dtype``: what a first-use conversion
    converts to."""
    model_dir = servable_dir(src, revision, tokenizer, dtype)
    names = {src, str(model_dir), str(model_dir.resolve())}
    argv = ["--model", str(model_dir), "--trust-remote-code", *server_args]
    print(f"[genesis-mlx] serving {model_dir} with mlx-lm's server", file=sys.stderr, flush=True)
    with mlx_lm_server(src, names, limits, argv) as server:
        try:
            server.main()
        except OSError as e:  # the port: taken, or not ours to bind
            raise GenesisError(f"cannot serve on the given --host/--port ({first_line(e)}); "
                               "pick another --port") from None
