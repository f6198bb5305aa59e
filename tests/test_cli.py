"""The CLI as a user runs it: demo, generate, chat (through a pseudo-terminal)."""

import os
import pty
import select
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "genesis_mlx", *args], capture_output=True,
                          input=input, timeout=600)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory, tokenizer_path):
    work = tmp_path_factory.mktemp("demo")
    checkpoint = write_reference_checkpoint(work / "demo.safetensors", DEMO)
    return convert(str(checkpoint), str(work / "mlx"), tokenizer=tokenizer_path), checkpoint


def test_demo_runs_end_to_end(tokenizer_path, tmp_path):
    result = cli("demo", "--tokenizer", tokenizer_path, "--dir", str(tmp_path), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr.decode()
    assert b"[demo] ok" in result.stdout
    assert (tmp_path / "genesis-demo-mlx" / "config.json").exists()


def test_generate_is_deterministic_and_greedy_matches_api(demo_model):
    import genesis_mlx as g

    model_dir, _ = demo_model
    args = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--temp", "0",
            "--max-tokens", "12", "--verbose"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == second.stdout and first.stdout.strip()
    assert b"Generation: 12 tokens" in first.stderr and b"Peak memory" in first.stderr
    model, tokenizer = g.load(str(model_dir))
    text = g.generate(model, tokenizer, "Hello", 12, sampling=g.SamplingOptions(temp=0.0))
    assert first.stdout.decode().rstrip("\n") == text


def prompt_tokens(stderr: bytes) -> int:
    line = [l for l in stderr.decode().splitlines() if l.startswith("Prompt:")][0]
    return int(line.split()[1])


def test_generate_reads_stdin_and_raw_checkpoints(demo_model, tokenizer_path, tmp_path):
    """A prompt on stdin is the prompt (its tokens counted with --verbose), from a raw
    reference checkpoint (converted once into the cache) as from its directory."""
    import genesis_mlx as g

    model_dir, checkpoint = demo_model
    env = dict(os.environ, GENESIS_MLX_CACHE=str(tmp_path), GENESIS_MLX_TOKENIZER=tokenizer_path)
    text = "Once upon a time, in a land far away"
    options = ["--max-tokens", "3", "--temp", "0", "--verbose", "--ignore-chat-template"]
    result = subprocess.run(
        [sys.executable, "-m", "genesis_mlx", "generate", "--model", str(checkpoint),
         "--prompt", "-", *options],
        input=text.encode(), capture_output=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert list((tmp_path / "converted").iterdir()), "raw checkpoint was not converted into the cache"
    _, tokenizer = g.load(str(model_dir))
    assert prompt_tokens(result.stderr) == len(tokenizer.encode(text, add_special_tokens=False))
    same = cli("generate", "--model", str(model_dir), "--prompt", text, *options)
    assert same.stdout == result.stdout


def test_generate_system_prompt_is_the_first_turn(demo_model):
    import genesis_mlx as g

    model_dir, _ = demo_model
    greedy = ["--prompt", "Hello", "--max-tokens", "8", "--temp", "0", "--verbose"]
    result = cli("generate", "--model", str(model_dir), "--system-prompt", "Answer in French.",
                 *greedy)
    assert result.returncode == 0, result.stderr.decode()
    model, tokenizer = g.load(str(model_dir))
    want = g.generate(model, tokenizer, "Hello", 8, sampling=g.SamplingOptions(temp=0.0),
                      system_prompt="Answer in French.")
    assert result.stdout.decode().rstrip("\n") == want
    prompt = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    assert prompt_tokens(result.stderr) == n_prompt
    assert prompt_tokens(cli("generate", "--model", str(model_dir), *greedy).stderr) != n_prompt


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hi", "--temp", "-1"], "--temp"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["--prompt", "hi", "--kv-bits", "5"], "--kv-bits 5"),
    (["--prompt", "hi", "--model", "nobody/not-a-model"], "Hugging Face Hub"),
    (["--prompt", "hi", "--model", "./missing-dir"], "no such model"),
])
def test_generate_bad_input(demo_model, args, needle):
    model_dir, _ = demo_model
    full = ["generate", "--model", str(model_dir), *args]
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", *full], capture_output=True,
                            timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    err = result.stderr.decode().strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def in_process(capsys, *argv):
    """The CLI in this process (no start-up cost): (exit code, stdout, stderr)."""
    from genesis_mlx.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("option,value", [
    ("--temp", "nan"), ("--temp", "inf"), ("--top-p", "nan"), ("--min-p", "nan"),
    ("--repetition-penalty", "inf"), ("--seed", "-1"), ("--seed", str(2 ** 64)),
])
def test_generate_and_chat_refuse_non_finite_numbers_and_bad_seeds(demo_model, capsys,
                                                                   option, value):
    model_dir, _ = demo_model
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        code, out, err = in_process(capsys, *command, "--model", model_dir, "--max-tokens", "4",
                                    option, value)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and not out.strip(), (command, err)
        assert f"{option} {value}" in lines[0], lines[0]


def test_demo_refuses_a_negative_seed_before_writing(tmp_path, capsys):
    code, _, err = in_process(capsys, "demo", "--dir", tmp_path, "--seed", "-1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--seed -1" in err, err
    assert not list(tmp_path.iterdir())


def test_the_largest_seed_is_accepted(demo_model, capsys):
    model_dir, _ = demo_model
    code, out, err = in_process(capsys, "generate", "--model", model_dir, "--prompt", "hi",
                                "--max-tokens", "2", "--seed", str(2 ** 64 - 1))
    assert code == 0 and out.strip(), err


def test_a_truncated_model_file_says_convert_again(demo_model, tmp_path, capsys):
    import shutil

    model_dir, _ = demo_model
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code, _, err = in_process(capsys, "generate", "--model", broken, "--prompt", "hi")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert str(weights) in lines[0] and "convert again" in lines[0], lines[0]


def test_chat_survives_a_save_into_a_missing_directory(demo_model, tmp_path):
    model_dir, _ = demo_model
    session = tmp_path / "s"
    script = (f"Hello\n/save {tmp_path}/missing/x\n/save {session}\n/reset\n"
              f"/load {session}\n/quit\n")
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "chat", "--model",
                             str(model_dir), "--temp", "0", "--max-tokens", "2"],
                            input=script.encode(), capture_output=True, timeout=600)
    err = result.stderr.decode().strip()
    assert result.returncode == 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and f"{tmp_path}/missing" in err, err
    assert b"(1 turns)" in result.stdout, "the conversation did not survive the failed save"


def cache_megabytes(stderr: bytes) -> float:
    line = [l for l in stderr.decode().splitlines() if l.startswith("Cache:")][0]
    return float(line.split()[1])


def test_generate_with_a_quantized_fox_cache(demo_model):
    """--kv-bits 8 and 4 store the FoX layers' K and V in fewer bytes (said with
    --verbose), and still generate."""
    model_dir, _ = demo_model
    sizes = {}
    for bits in (None, 8, 4):
        flag = [] if bits is None else ["--kv-bits", str(bits)]
        result = cli("generate", "--model", str(model_dir), "--prompt", "Hello " * 40,
                     "--temp", "0", "--max-tokens", "10", "--verbose", *flag)
        assert result.returncode == 0, result.stderr.decode()
        assert b"Generation: 10 tokens" in result.stderr and result.stdout.strip()
        sizes[bits] = cache_megabytes(result.stderr)
    assert sizes[4] < sizes[8] < sizes[None], sizes


def test_generate_rejects_non_utf8_stdin(demo_model):
    model_dir, _ = demo_model
    result = cli("generate", "--model", str(model_dir), "--prompt", "-", input=b"caf\xe9 \xff")
    assert result.returncode == 2 and b"not UTF-8" in result.stderr


def test_long_prompt_is_truncated_from_the_left_with_a_warning(demo_model):
    model_dir, _ = demo_model
    long_prompt = "word " * 2100
    result = cli("generate", "--model", str(model_dir), "--prompt", long_prompt,
                 "--ignore-chat-template", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr.decode()
    assert b"keeping the last 2048" in result.stderr
    # transformers' own warning (the tokenizer's model_max_length) would say it fails
    assert b"Token indices sequence length" not in result.stderr, result.stderr.decode()


class Terminal:
    """Drives a program through a pseudo-terminal, as a person at a keyboard."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvp(argv[0], argv)
        self.buffer = b""

    def read_until(self, needle: bytes, timeout=120):
        end = time.time() + timeout
        while needle not in self.buffer:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.buffer += os.read(self.fd, 4096)
                except OSError:
                    break
        found = self.buffer
        self.buffer = b""
        return found

    def read_more(self, timeout=120):
        """Waits for output beyond what was read."""
        end = time.time() + timeout
        while not self.buffer:
            if time.time() > end:
                raise AssertionError("timed out waiting for more output")
            if select.select([self.fd], [], [], 0.2)[0]:
                self.buffer += os.read(self.fd, 4096)

    def send(self, data: bytes):
        os.write(self.fd, data)

    def wait(self):
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_chat_repl_multi_turn_reset_interrupt_save_load(demo_model, tmp_path):
    model_dir, _ = demo_model
    term = Terminal([sys.executable, "-m", "genesis_mlx", "chat", "--model", str(model_dir),
                     "--temp", "0", "--max-tokens", "2000"])
    term.read_until(b"User: ")
    term.send(b"Hello there\r")
    term.read_until(b"Assistant: ")
    term.read_more()  # the answer has started streaming
    term.send(b"\x03")  # Ctrl-C during a long answer stops it, not the program
    out = term.read_until(b"User: ")
    assert b"answer stopped" in out
    term.send(b"/save " + str(tmp_path / "s.safetensors").encode() + b"\r")
    assert b"session saved" in term.read_until(b"User: ")
    term.send(b"/reset\r")
    assert b"conversation reset" in term.read_until(b"User: ")
    term.send(b"/load " + str(tmp_path / "s.safetensors").encode() + b"\r")
    assert b"(1 turns)" in term.read_until(b"User: ")
    term.send(b"/quit\r")
    assert term.wait() == 0
    assert (tmp_path / "s.safetensors").exists()


def test_chat_save_never_overwrites_another_file(demo_model, tmp_path):
    import genesis_mlx as g
    from genesis_mlx.errors import GenesisError
    from genesis_mlx.generation.chat import ChatSession

    model, tokenizer = g.load(str(demo_model[0]))
    first = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), max_tokens=3)
    "".join(first.ask("Hi"))
    assert first.save(str(tmp_path / "mine")) == tmp_path / "mine.safetensors"
    "".join(first.ask("Again"))
    first.save(str(tmp_path / "mine.safetensors"))  # its own file: updated
    other = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), max_tokens=3)
    with pytest.raises(GenesisError, match="exists"):
        other.save(str(tmp_path / "mine.safetensors"))
    precious = tmp_path / "notes.safetensors"
    precious.write_bytes(b"keep me")
    with pytest.raises(GenesisError, match="exists"):
        first.save(str(precious))
    assert precious.read_bytes() == b"keep me"
    other.load(str(tmp_path / "mine"))  # loading makes it the session's file
    assert len(other.history) == 4
    other.save(str(tmp_path / "mine.safetensors"))


def test_chat_session_turns_cost_only_their_own_tokens(demo_model):
    import genesis_mlx as g
    from genesis_mlx.generation.chat import ChatSession

    model_dir, _ = demo_model
    model, tokenizer = g.load(str(model_dir))
    session = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), max_tokens=8)
    "".join(session.ask("Hi"))
    before = session.n_tokens
    calls = []
    original = type(model).__call__
    type(model).__call__ = lambda self, x, *a, **k: calls.append(x.shape[1]) or original(self, x, *a, **k)
    try:
        "".join(session.ask("And again"))
    finally:
        type(model).__call__ = original
    turn = tokenizer.encode(session.turn_text("And again"), add_special_tokens=False)
    assert calls[0] <= len(turn), "the second turn re-read the history"
    assert session.n_tokens > before and len(session.history) == 4


def test_chat_context_overflow_keeps_the_recent_turns(demo_model):
    """When a turn would not fit the context, the oldest turns are dropped and the
    rest re-read: the chat goes on within the context, and after a rebuild the state
    is a fresh read of the kept history."""
    import genesis_mlx as g
    from genesis_mlx.conversion.tokenizer import render_chat
    from genesis_mlx.generation.chat import ChatSession
    from genesis_mlx.generation.steps import prefill

    model_dir, _ = demo_model
    model, tokenizer = g.load(str(model_dir))
    model.args.block_size = 160
    notices = []
    session = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), max_tokens=8)
    for turn in range(8):
        "".join(session.ask(f"Tell me about the number {turn}, please", notice=notices.append))
        assert session.n_tokens <= model.args.block_size, turn
    assert notices and notices[0].startswith("context full: dropped")
    kept = [m["content"] for m in session.history if m["role"] == "user"]
    assert kept[-1] == "Tell me about the number 7, please" and len(kept) < 8
    assert [m["role"] for m in session.history] == ["user", "assistant"] * len(kept)
    session.rebuild(notices.append)
    system = {"role": "system", "content": session.system_prompt}
    ids = tokenizer.encode(render_chat([system, *session.history], add_generation_prompt=False),
                           add_special_tokens=False)[:-1]  # the next turn adds the newline
    fresh = model.make_cache()
    prefill(model, ids, fresh)
    probe = mx.array([tokenizer.encode(session.turn_text("next"), add_special_tokens=False)])
    assert session.n_tokens == len(ids)
    from conftest import logits_tolerance

    assert np.abs(np.array(model(probe, cache=session.cache))
                  - np.array(model(probe, cache=fresh))).max() <= logits_tolerance(model, ids)


def test_chat_system_command_sets_the_first_turn(demo_model, tmp_path):
    """/system TEXT resets the chat with TEXT as its system turn: the state the REPL
    saves after a turn is the state of a session with that system prompt."""
    import genesis_mlx as g
    from mlx_lm.models.cache import load_prompt_cache

    from genesis_mlx.generation.chat import ChatSession

    model_dir, _ = demo_model
    term = Terminal([sys.executable, "-m", "genesis_mlx", "chat", "--model", str(model_dir),
                     "--temp", "0", "--max-tokens", "6"])
    term.read_until(b"User: ")
    term.send(b"/system Answer in French.\r")
    assert b"system prompt set to 'Answer in French.'; conversation reset" in term.read_until(b"User: ")
    term.send(b"Hello\r")
    term.read_until(b"User: ")
    term.send(b"/save " + str(tmp_path / "s").encode() + b"\r")
    assert b"session saved" in term.read_until(b"User: ")
    term.send(b"/quit\r")
    assert term.wait() == 0
    saved, meta = load_prompt_cache(str(tmp_path / "s.safetensors"), return_metadata=True)
    assert meta["system_prompt"] == "Answer in French."
    from conftest import logits_rounding
    from genesis_mlx.conversion.tokenizer import render_chat

    model, tokenizer = g.load(str(model_dir))
    states = {}
    for system in ("Answer in French.", "You are a helpful assistant."):
        session = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), system, 6)
        "".join(session.ask("Hello"))
        states[system] = np.array(session.cache[0].kv_state)
        if system == "Answer in French.":  # the tokens the state has read
            read = render_chat([{"role": "system", "content": system}, *session.history],
                               add_generation_prompt=False)
            tol = logits_rounding(model, tokenizer.encode(read, add_special_tokens=False)
                                  ).tolerance_for(states[system])
    got = np.array(saved[0].kv_state)
    assert np.abs(got - states["Answer in French."]).max() <= tol
    assert np.abs(got - states["You are a helpful assistant."]).max() > tol


def test_chat_session_of_an_older_cache_layout_is_refused(demo_model, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    import genesis_mlx as g
    from genesis_mlx.errors import GenesisError
    from genesis_mlx.generation.chat import ChatSession

    model_dir, _ = demo_model
    model, tokenizer = g.load(str(model_dir))
    session = ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0), max_tokens=4)
    "".join(session.ask("Hi"))
    saved = session.save(str(tmp_path / "s"))
    ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0)).load(str(saved))
    cache, meta = load_prompt_cache(str(saved), return_metadata=True)
    del meta["cache_layout"]
    save_prompt_cache(str(tmp_path / "old.safetensors"), cache, meta)
    with pytest.raises(GenesisError, match="older genesis-mlx.*new session"):
        ChatSession(model, tokenizer, g.SamplingOptions(temp=0.0)).load(str(tmp_path / "old"))


@pytest.mark.parametrize("variable,value,needle", [
    ("GENESIS_MLX_FORMS", "fast", "use gpu"), ("GENESIS_MLX_KERNELS", "metal", "auto, off, emulate")])
def test_a_wrong_setting_is_one_line_before_any_work(demo_model, variable, value, needle):
    model_dir, _ = demo_model
    env = dict(os.environ, **{variable: value})
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "generate", "--model",
                             str(model_dir), "--prompt", "hi", "--max-tokens", "2"],
                            capture_output=True, text=True, timeout=600, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{variable}={value}" in lines[0] and needle in lines[0]
    assert result.stdout == ""


def test_the_gpu_forms_generate_what_the_cpu_forms_do(demo_model):
    """GENESIS_MLX_FORMS=gpu: the model on the CPU takes the forms it takes on a GPU;
    greedy text is the same as with the CPU's own forms."""
    model_dir, _ = demo_model
    texts = []
    for forms in ("gpu", "cpu"):
        env = dict(os.environ, GENESIS_MLX_FORMS=forms)
        result = subprocess.run([sys.executable, "-m", "genesis_mlx", "generate", "--model",
                                 str(model_dir), "--prompt", "The sky", "--temp", "0",
                                 "--max-tokens", "12"],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr
        texts.append(result.stdout)
    assert texts[0] == texts[1] and texts[0].strip()


def test_demo_without_dir_says_its_files_are_deleted_and_how_to_keep_them(tokenizer_path):
    result = cli("demo", "--tokenizer", tokenizer_path, "--max-tokens", "2")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    converted = [l for l in out.splitlines() if l.startswith("[demo] converted to ")]
    model_dir = converted[0].removeprefix("[demo] converted to ")
    assert not os.path.exists(model_dir)
    last = out.strip().splitlines()[-1]
    assert "deleted" in last and "--dir DIR" in last and "chat --model DIR/genesis-demo-mlx" in last


def test_chat_goes_on_past_a_line_that_is_not_utf8(demo_model):
    """Such bytes reach input() as lone surrogates, which the tokenizer refuses with
    a traceback (generate reads stdin as bytes and says so in one line)."""
    model_dir, _ = demo_model
    result = cli("chat", "--model", model_dir, "--temp", "0", "--max-tokens", "2",
                 input=b"caf\xe9 ole\nHello\n/quit\n")
    err = result.stderr.decode().strip()
    assert result.returncode == 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and "not UTF-8" in err, err
    assert result.stdout.count(b"Assistant:") == 1, result.stdout  # "Hello" was answered


def test_chat_loads_only_its_own_models_sessions(demo_model, tmp_path, tokenizer_path):
    """A session saved with other weights (same shape: the state loads, and means
    nothing to this model), or a file that is no session at all."""
    import genesis_mlx as g
    from genesis_mlx.errors import GenesisError
    from genesis_mlx.generation.chat import ChatSession

    model_dir, _ = demo_model
    other_dir = convert(str(write_reference_checkpoint(tmp_path / "other.safetensors", DEMO,
                                                       seed=1)),
                        str(tmp_path / "other"), tokenizer=tokenizer_path)
    greedy = g.SamplingOptions(temp=0.0)
    model, tokenizer = g.load(str(model_dir))
    other, _ = g.load(str(other_dir))
    session = ChatSession(model, tokenizer, greedy, max_tokens=4)
    "".join(session.ask("Hi"))
    saved = session.save(str(tmp_path / "s"))
    ChatSession(model, tokenizer, greedy).load(str(saved))
    with pytest.raises(GenesisError, match="another model's weights"):
        ChatSession(other, tokenizer, greedy).load(str(saved))
    with pytest.raises(GenesisError, match="is not a chat session"):
        ChatSession(model, tokenizer, greedy).load(str(model_dir / "model.safetensors"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(GenesisError, match="damaged or incomplete"):
        ChatSession(model, tokenizer, greedy).load(str(truncated))
