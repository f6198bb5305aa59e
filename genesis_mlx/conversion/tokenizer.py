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
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The reference (genesis/cli.py, GenesisChat.build_prompt) puts a newline before
# <|im_end|> and always starts with a system turn; this template does the same.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "\n<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}\n<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_prompt(messages, add_generation_prompt=True) -> str:
    """The same rendering as CHAT_TEMPLATE, without Jinja (used to check it)."""
    text = ""
    if not messages or messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}\n<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}\n<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


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
            tokenizer_file=str(path), bos_token="<|endoftext|>",
            eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        )
    except Exception as e:
        raise GenesisError(f"--tokenizer: {path} is not a tokenizers JSON file ({e})") from None


def build_tokenizer(source: Optional[str] = None):
    tokenizer = load_base_tokenizer(source)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_token_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]
