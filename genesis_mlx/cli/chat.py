"""Terminal chat. Commands: /reset, /system TEXT, /save FILE, /load FILE, /quit."""

import sys

from ..conversion.tokenizer import DEFAULT_SYSTEM_PROMPT
from ..errors import GenesisError
from ..generation.chat import ChatSession
from .generate import add_model_arguments, add_sampling_arguments, load_from, sampling_from

HELP = ("commands: /reset (forget the conversation), /system TEXT (new system prompt, "
        "resets), /save FILE, /load FILE, /quit; Ctrl-C stops an answer, Ctrl-D quits")


def add_arguments(p):
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(system_prompt=DEFAULT_SYSTEM_PROMPT)


def notice(text):
    print(f"[{text}]", flush=True)


def handle_command(session: ChatSession, line: str) -> bool:
    """Runs a /command; returns False when the user quits."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        notice("conversation reset")
    elif name == "system":
        session.system_prompt = arg or DEFAULT_SYSTEM_PROMPT
        session.reset()
        notice(f"system prompt set to {session.system_prompt!r}; conversation reset")
    elif name in ("save", "load") and not arg:
        notice(f"usage: /{name} FILE")
    elif name == "save":
        notice(f"session saved to {session.save(arg)}")
    elif name == "load":
        path = session.load(arg)
        notice(f"session loaded from {path} ({len(session.history) // 2} turns)")
    else:
        notice(HELP)
    return True


def answer(session: ChatSession, line: str):
    print("Assistant: ", end="", flush=True)
    try:
        for text in session.ask(line, notice=notice):
            print(text, end="", flush=True)
        print(flush=True)
    except KeyboardInterrupt:
        print(flush=True)
        notice("answer stopped")


NOT_UTF8 = "that line is not UTF-8 text; type it again (or set the terminal to UTF-8)"


def read_line() -> str:
    """The user's next line. Bytes that are not UTF-8 come through ``input`` as lone
    surrogates (or, where stdin is strict, as an error), which no tokenizer reads."""
    try:
        line = input("User: ")
        line.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise GenesisError(NOT_UTF8) from None
    return line.strip()


def run(args):
    sampling = sampling_from(args)
    model, tokenizer = load_from(args)
    session = ChatSession(model, tokenizer, sampling, args.system_prompt, args.max_tokens,
                          args.kv_bits)
    notice(HELP)
    while True:
        try:
            line = read_line()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        except GenesisError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not handle_command(session, line):
                    return 0
            elif line.lower() in ("quit", "exit"):
                return 0
            else:
                answer(session, line)
        except GenesisError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
