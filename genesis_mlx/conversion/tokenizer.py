"""The Genesis tokenizer: GPT-NeoX (EleutherAI/pythia-70m) plus the two ChatML
tokens, added as the reference adds them (``additional_special_tokens``), and a chat
template that renders prompts exactly as the reference CLI builds them."""

from pathlib import Path
from typing import Optional

from ..errors import GenesisError
from .checkpoint import download_repo

BASE_TOKENIZER_REPO = "EleutherAI/pythia-70m"
# config.json too: AutoTokenizer reads it from a local directory when the tokenizer
# config does not name its class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json")
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
END_OF_TEXT = "<|endoftext|>"
# What ends a chat turn, and so the model's answer: the tokenizer's eos token for
# every consumer (transformers' generate, mlx-lm's datasets and stop lists).
END_OF_TURN = CHAT_TOKENS[1]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as the reference CLI (genesis/cli.py, GenesisChat.build_prompt) renders it: a
# newline before <|im_end|>, and always a system turn first. The one definition of a
# turn: the chat template below and every prompt built in Python derive from it.
TURN = "<|im_start|>{role}\n{content}\n<|im_end|>\n"
ASSISTANT_START = "<|im_start|>assistant\n"


def chatml_turn(role: str, content: str) -> str:
    return TURN.format(role=role, content=content)


def render_chat(messages, add_generation_prompt: bool = True) -> str:
    """What CHAT_TEMPLATE renders, in Python (tests check the two agree)."""
    text = ""
    if not messages or messages[0]["role"] != "system":
        text += chatml_turn("system", DEFAULT_SYSTEM_PROMPT)
    text += "".join(chatml_turn(m["role"], m["content"]) for m in messages)
    return text + (ASSISTANT_START if add_generation_prompt else "")


CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    + chatml_turn("system", DEFAULT_SYSTEM_PROMPT)
    + "{% endif %}{% for message in messages %}"
    + chatml_turn("{{ message['role'] }}", "{{ message['content'] }}")
    + "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT_START + "{% endif %}"
)


def load_base_tokenizer(source: Optional[str]):
    """GPT-NeoX from a tokenizer.json, a directory, or the Hub (default)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source is None:
        # Its files only, through the same download as checkpoints: offline, that
        # fails at once (transformers' own download retries for ~50 s first).
        source = download_repo(BASE_TOKENIZER_REPO, TOKENIZER_FILES,
                               "pass --tokenizer PATH to a GPT-NeoX tokenizer.json")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(path))
        path = path / "tokenizer.json"
    if not path.is_file():
        raise GenesisError(f"--tokenizer: no such file: {path}")
    try:
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path), bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
            unk_token=END_OF_TEXT,
        )
    except Exception as e:
        raise GenesisError(f"--tokenizer: {path} is not a tokenizers JSON file ({e})") from None


def build_tokenizer(source: Optional[str] = None, context: Optional[int] = None):
    """``context``: the model's (its block_size), as the tokenizer's model_max_length."""
    tokenizer = load_base_tokenizer(source)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.pad_token = END_OF_TEXT
    tokenizer.eos_token = END_OF_TURN
    tokenizer.chat_template = CHAT_TEMPLATE
    if context is not None:
        tokenizer.model_max_length = context
    return tokenizer


def stop_token_ids(tokenizer) -> list:
    """Generation stops at <|im_end|> (end of a chat turn) or <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TURN, END_OF_TEXT)]
