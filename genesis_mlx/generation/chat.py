"""A chat whose history lives in the decoding state: each turn feeds only its own
tokens. Rendering follows the reference CLI (ChatML with a newline before
``<|im_end|>``); the assistant's answers stay in the state as generated."""

import hashlib
import json
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from ..conversion.checkpoint import read_safetensors_header, safetensors_damage
from ..conversion.tokenizer import (ASSISTANT_START, DEFAULT_SYSTEM_PROMPT, chatml_turn,
                                     render_chat)
from ..errors import GenesisError
from ..model.cache import CACHE_LAYOUT
from .generate import SamplingOptions, stream_generate
from .steps import prefill


def snapshot(cache):
    """Cache arrays are immutable; keeping the state objects is a cheap snapshot."""
    return [(type(c), c.state) for c in cache]


def restore(saved):
    return [cls.from_state(state) for cls, state in saved]


def session_path(path: str) -> Path:
    """A session file's name, with the ``.safetensors`` that MLX needs (and appends
    when saving) added when it is missing."""
    target = Path(path).expanduser()
    if target.suffix != ".safetensors":
        target = target.with_name(target.name + ".safetensors")
    return target


def weights_fingerprint(model, samples: int = 16) -> str:
    """A hash of a few values of every parameter (adapters included), at fixed
    positions: a session's decoding state means something only to the weights that
    wrote it. Raw values, not sums, so every backend agrees."""
    names, picks = [], []
    for name, value in sorted(tree_flatten(model.parameters())):
        flat = value.reshape(-1)
        at = mx.array(np.linspace(0, flat.size - 1, min(samples, flat.size)).astype(np.int32))
        kind = mx.float32 if mx.issubdtype(value.dtype, mx.floating) else mx.int64
        names.append(name)
        picks.append(flat[at].astype(kind))
    mx.eval(picks)
    digest = hashlib.sha256()
    for name, values in zip(names, picks):
        digest.update(name.encode())
        digest.update(np.array(values).tobytes())
    return digest.hexdigest()[:32]


def session_metadata(path: Path) -> dict:
    """The metadata of a file /save wrote, or a one-line error saying what it is."""
    if not path.is_file():
        raise GenesisError(f"cannot load chat session {path}: no such file")
    damage = safetensors_damage(path)
    if damage:
        raise GenesisError(f"{path} is damaged or incomplete ({damage}); it cannot be loaded")
    metadata, _ = read_safetensors_header(path)
    if "0.history" not in metadata:
        raise GenesisError(f"{path} is not a chat session (a file /save writes); /load one "
                           "of those")
    return metadata


class ChatSession:
    def __init__(self, model, tokenizer, sampling: Optional[SamplingOptions] = None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_tokens: int = 256,
                 kv_bits: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.kv_bits = kv_bits
        self.sampling = sampling or SamplingOptions()
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.session_file: Optional[Path] = None  # the file this session saved or loaded
        self.weights = weights_fingerprint(model)
        self.reset()

    def reset(self):
        self.history: List[dict] = []
        self.cache = self.model.make_cache(self.kv_bits)
        self.n_tokens = 0
        self.open_answer = False  # the last answer did not end with <|im_end|>

    @property
    def im_end(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def turn_text(self, user_text: str) -> str:
        """What this turn adds to the state: the rest of the previous answer's turn
        (the model generates its text and <|im_end|>, not the newlines around it),
        the user's turn, the assistant's start."""
        if self.n_tokens == 0:
            text = chatml_turn("system", self.system_prompt)
        else:
            text = "\n<|im_end|>\n" if self.open_answer else "\n"
        return text + chatml_turn("user", user_text) + ASSISTANT_START

    def rebuild(self, notice):
        """Drops the oldest turns until the context has room, then re-reads the rest
        (what the reference does on every turn, here only on overflow)."""
        limit = self.model.args.block_size - self.max_tokens
        history = list(self.history)
        while history:
            history = history[2:]
            system = {"role": "system", "content": self.system_prompt}
            text = render_chat([system, *history], add_generation_prompt=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < limit // 2:
                break
        dropped = (len(self.history) - len(history)) // 2
        notice(f"context full: dropped the {dropped} oldest turn(s)")
        self.reset()
        self.history = history
        if history:
            ids = ids[:-1]  # the trailing newline is re-added by the next turn
            prefill(self.model, ids, self.cache)
            self.n_tokens = len(ids)

    def ask(self, user_text: str, notice=print) -> Iterator[str]:
        if not user_text.strip():
            raise GenesisError("empty message")
        ids = self.tokenizer.encode(self.turn_text(user_text), add_special_tokens=False)
        if self.n_tokens + len(ids) + self.max_tokens > self.model.args.block_size and self.history:
            self.rebuild(notice)
            ids = self.tokenizer.encode(self.turn_text(user_text), add_special_tokens=False)
        saved, answer_ids, answer = snapshot(self.cache), [], ""
        try:
            for response in stream_generate(self.model, self.tokenizer, ids, self.max_tokens,
                                             self.sampling, prompt_cache=self.cache):
                stopped = response.finish_reason == "stop"
                if not stopped:
                    answer_ids.append(response.token)
                answer += response.text
                yield response.text
            self.open_answer = not (stopped and response.token == self.im_end)
            # Every token handed out is fed to the model by the time the stream ends
            # (the stop token too), as in mlx-lm's loop.
            self.n_tokens += len(ids) + len(answer_ids) + int(stopped)
        except KeyboardInterrupt:
            # The state may be mid-update: roll back and re-read what was shown.
            self.cache = restore(saved)
            replay = ids + answer_ids
            prefill(self.model, replay, self.cache)
            self.n_tokens += len(replay)
            self.open_answer = True
            answer = self.tokenizer.decode(answer_ids)
            raise
        finally:
            self.history += [{"role": "user", "content": user_text},
                             {"role": "assistant", "content": answer.strip()}]

    def save(self, path: str) -> Path:
        """Saves the session; returns the file (``.safetensors`` is appended when
        missing, as MLX does). Overwrites only the file this session saved to or
        loaded from, never another existing file."""
        target = session_path(path)
        if target.exists() and target.resolve() != self.session_file:
            raise GenesisError(f"{target} exists and is not this session's file; save "
                               "under another name (or delete it first)")
        if not target.parent.is_dir():
            raise GenesisError(f"cannot save to {target}: there is no directory "
                               f"{target.parent}; create it first, or save elsewhere")
        meta = {"history": json.dumps(self.history), "system_prompt": self.system_prompt,
                "n_tokens": str(self.n_tokens), "open_answer": str(int(self.open_answer)),
                "cache_layout": str(CACHE_LAYOUT), "weights": self.weights}
        try:
            save_prompt_cache(str(target), self.cache, meta)
        except (OSError, RuntimeError) as e:  # MLX says RuntimeError for an unwritable file
            raise GenesisError(f"cannot save to {target} ({e}); save elsewhere") from None
        self.session_file = target.resolve()
        return target

    def load(self, path: str) -> Path:
        path = session_path(path)
        session_metadata(path)
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:
            raise GenesisError(f"cannot load chat session {path} ({e})") from None
        if len(cache) != len(self.cache) or "history" not in meta:
            raise GenesisError(f"{path} is not a chat session saved for this model")
        if meta.get("cache_layout") != str(CACHE_LAYOUT):
            raise GenesisError(f"{path} was saved by an older genesis-mlx, whose decoding "
                               "state this version lays out differently; start a new session")
        if meta.get("weights") != self.weights:
            raise GenesisError(f"{path} was saved with another model's weights (or adapters), "
                               "whose decoding state means nothing to this one; load it into "
                               "the model it was saved with, or start a new session")
        self.cache, self.history = cache, json.loads(meta["history"])
        self.system_prompt = meta["system_prompt"]
        self.n_tokens, self.open_answer = int(meta["n_tokens"]), meta["open_answer"] == "1"
        self.session_file = path.resolve()
        return path
