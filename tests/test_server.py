"""``genesis-mlx serve``: mlx-lm's own server, on its batched path, on a converted demo
model, driven by the openai client over 127.0.0.1. Concurrent answers (streamed or
not, prompts of very different lengths, rows starting from cached prompts) equal
the requests served alone and genesis-mlx's own greedy generation; bad requests get
HTTP errors (400, or 404 for another model) and the server goes on serving; every
request is bounded (tokens, prompt + completion, time) and one whose client gave up
stops decoding."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import namedtuple

import mlx.core as mx
import openai
import pytest

from genesis_mlx.cli.main import main
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

START_TIMEOUT = 300  # the CLI's imports and the model load, on a busy machine
REQUEST_TIMEOUT = 180
MAX_TOKENS = 10
LONGER = 32
# The module's server: what one request may take.
TOKENS_LIMIT, CONTEXT_LIMIT = 48, 4096
GREEDY = dict(temp=0.0, repetition_penalty=1.0)  # what the server does at temperature 0

# steps: (token, its logprob) per generated token (requests not streamed, ours)
Answer = namedtuple("Answer", "text finish_reason cached_tokens steps")
Server = namedtuple("Server", "url proc log")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    work = tmp_path_factory.mktemp("serve")
    checkpoint = write_reference_checkpoint(work / "demo.safetensors", DEMO)
    return convert(str(checkpoint), str(work / "model"), tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def reference(model_dir):
    import genesis_mlx as g

    return g.load(str(model_dir))


@pytest.fixture(scope="module")
def logprob_tolerance(reference):
    """Log-probabilities of two float32 evaluations (a batch in the server, ours
    alone): conftest.logprobs_tolerance, measured on the longest sequence these tests
    serve (the prompt past the context), whose rounding, over more positions and longer
    sums, is the largest."""
    from conftest import logprobs_tolerance

    model, tokenizer = reference
    ids = tokenizer.apply_chat_template(user(longest_prompt(model)), add_generation_prompt=True)
    return logprobs_tolerance(model, ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(model_dir, log_path, *options) -> Server:
    """``genesis-mlx serve`` in a subprocess; returns once /health answers."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genesis_mlx", "serve", "--model", str(model_dir),
         "--port", str(port), "--log-level", "WARNING", "--max-tokens", str(MAX_TOKENS),
         *options],
        stdout=log, stderr=subprocess.STDOUT,
        # Ctrl-C as a terminal delivers it, even where the test runner ignores SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if healthy(url):
            return Server(url, proc, log_path)
        time.sleep(0.5)
    stop(proc)
    pytest.fail(f"the server did not come up: {log_path.read_text()[-3000:]}")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = start_server(model_dir, tmp_path_factory.mktemp("log") / "server.log",
                           "--max-tokens-limit", str(TOKENS_LIMIT),
                           "--max-context", str(CONTEXT_LIMIT))
    yield running
    stop(running.proc)


def client_of(server, timeout=REQUEST_TIMEOUT) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=timeout,
                         max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def chat(client, messages, stream, max_tokens=MAX_TOKENS, **options) -> Answer:
    request = dict(model="default_model", messages=messages, max_tokens=max_tokens,
                   temperature=0, **options)
    if not stream:
        response = client.chat.completions.create(logprobs=True, **request)
        choice, usage = response.choices[0], response.usage
        steps = [(step.model_extra["id"], step.logprob) for step in choice.logprobs.content]
        return Answer(choice.message.content or "", choice.finish_reason,
                      usage.prompt_tokens_details.cached_tokens, steps)
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return Answer(text, finish, None, None)


def user(content, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]


def at_once(calls):
    """Runs the calls in threads released together; their results in order."""
    results, errors = [None] * len(calls), []
    start = threading.Barrier(len(calls))

    def worker(i):
        start.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # raised again below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT * 2)
    if errors:
        raise errors[0]
    assert all(not t.is_alive() for t in threads), "a request never returned"
    return results


def answer_of(responses) -> Answer:
    """An Answer from GenerationResponses (genesis-mlx's or mlx-lm's stream)."""
    text, steps, last = "", [], None
    for last in responses:
        text += last.text
        steps.append((last.token, float(last.logprobs[last.token])))
    return Answer(text, last.finish_reason, None, steps)


def ours(reference, content, system=None, max_tokens=MAX_TOKENS, **options) -> Answer:
    """genesis-mlx's own greedy answer to the same chat turn."""
    import genesis_mlx as g

    model, tokenizer = reference
    return answer_of(g.stream_generate(model, tokenizer, content, max_tokens,
                                       g.SamplingOptions(**GREEDY), system_prompt=system,
                                       **options))


def assert_same(served: Answer, expected: Answer, what: str, tol: float):
    """The text; for answers not streamed, each token and its logprob too (the
    logprobs show a row's state is right where a random model's text would not)."""
    assert served.text == expected.text, what[:30]
    if served.steps is not None:
        assert [t for t, _ in served.steps] == [t for t, _ in expected.steps], what[:30]
        for (_, got), (_, want) in zip(served.steps, expected.steps):
            assert abs(got - want) <= tol, (what[:30], got, want)


def longest_prompt(model) -> str:
    """Past the model's context (block_size): the longest prompt served here."""
    return "word " * (model.args.block_size + 50)


# Chat turns of 23, 222, 28 and 522 tokens; the first and last streamed.
PROMPTS = [("Hi", True),
           ("The quick brown fox jumps over the lazy dog. " * 20, False),
           ("Why is the sky blue?", False),
           ("Tell me about the ocean " * 100, True)]


def test_concurrent_chats_equal_each_served_alone_and_our_generate(server, client, reference,
                                                                  logprob_tolerance):
    """First on a fresh server: the four prompts are read in one batch, right-padded
    to the longest, and decoded together; then each again alone."""
    together = at_once([lambda p=p, s=s: chat(client, user(p), s) for p, s in PROMPTS])
    alone = [chat(client, user(p), s) for p, s in PROMPTS]
    for (prompt, _), a, b in zip(PROMPTS, together, alone):
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason), prompt[:30]
        assert_same(a, b, prompt, logprob_tolerance)
        assert_same(a, ours(reference, prompt), prompt, logprob_tolerance)
    assert len({a.text for a in together}) > 1  # the rows differ: no row answers for all


def test_rows_from_cached_prompts_join_a_batch_correctly(server, client, reference,
                                                          logprob_tolerance):
    """System prompts read once are cached by the server; requests that share one
    start from a copy of its cache, batched with requests that start from another
    one or from nothing (caches of different lengths, merged left-padded). Longer
    answers: rows that come late join the others while they decode."""
    short, long = ("You are a terse assistant. " * 2,
                   "You are a helpful assistant who answers in riddles. " * 12)
    for system in (short, long):
        chat(client, user("Hello", system), False)
    turns = [("What is the capital of France?", short, False),
             ("Count to five. " * 30, long, True),
             ("Name a colour.", None, False),
             ("Why do cats purr? " * 6, long, False)]
    answers = at_once([lambda c=c, s=s, st=st: chat(client, user(c, s), st, LONGER)
                       for c, s, st in turns])
    for (content, system, _), answer in zip(turns, answers):
        assert_same(answer, ours(reference, content, system, LONGER), content, logprob_tolerance)
    assert 0 < answers[0].cached_tokens < answers[3].cached_tokens
    assert answers[2].cached_tokens == 0


def test_a_prompt_wholly_in_the_prompt_cache_is_answered(server, client, reference):
    """A text completion whose every token is cached (here: the first piece of an
    earlier prompt). mlx-lm 0.32's own server hands its batch an empty prompt then,
    which ends its generation thread for good, with caches that cannot be trimmed."""
    longer, prompt = "The quick brown fox jumps", "The quick brown fox"
    for text in (longer, prompt):
        response = client.completions.create(model="default_model", prompt=text,
                                             max_tokens=MAX_TOKENS, temperature=0)
        expected = ours(reference, text, use_chat_template=False)
        assert response.choices[0].text == expected.text
    assert healthy(server.url)


def test_a_prompt_longer_than_the_context_is_read_whole(server, client, reference,
                                                        logprob_tolerance):
    """mlx-lm reads the whole prompt, past the model's context (block_size: nothing
    in the model stops there), where genesis-mlx's generate keeps the last
    block_size tokens: the answer is the model's own on the whole prompt."""
    from mlx_lm.generate import stream_generate

    model, tokenizer = reference
    messages = user(longest_prompt(model))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert len(ids) > model.args.block_size
    alone = answer_of(stream_generate(model, tokenizer, mx.array(ids), MAX_TOKENS,
                                      prompt_cache=model.make_cache()))
    assert_same(chat(client, messages, False), alone, "past the context", logprob_tolerance)
    assert_same(chat(client, user("Hi"), False), ours(reference, "Hi"), "Hi", logprob_tolerance)


def http_error(call) -> int:
    with pytest.raises(openai.APIStatusError) as error:
        call()
    return error.value.status_code


BAD_REQUESTS = {  # what the request changes, the HTTP status it gets
    "unknown model": (dict(model="someone/else"), 404),
    "negative max_tokens": (dict(max_tokens=-1), 400),
    "a draft model": (dict(extra_body={"draft_model": "someone/draft"}), 400),
    "adapters of its own": (dict(extra_body={"adapters": "someone/adapters"}), 400),
    "top_k past the vocabulary": (dict(temperature=0.5, extra_body={"top_k": 10**6}), 400),
    "logit_bias outside the vocabulary": (dict(logit_bias={"99999999": 5}), 400),
    "xtc_threshold over 0.5": (dict(temperature=0.5, extra_body={
        "xtc_probability": 1.0, "xtc_threshold": 0.9}), 400),
    "a negative seed": (dict(seed=-1), 400),
    "empty messages": (dict(messages=[]), 400),
    "a message without a role": (dict(messages=[{"content": "Hi"}]), 400),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_an_http_error_and_serving_goes_on(server, client, reference,
                                                              logprob_tolerance, case):
    request = dict(model="default_model", messages=user("Hi"), max_tokens=MAX_TOKENS,
                   temperature=0)
    changes, status = BAD_REQUESTS[case]
    request.update(changes)
    assert http_error(lambda: client.chat.completions.create(**request)) == status
    assert healthy(server.url)
    assert_same(chat(client, user("Hi"), False), ours(reference, "Hi"), "Hi", logprob_tolerance)


def post_raw(server, path, body: bytes):
    """(status, JSON body) of a POST with a body the openai client would not send."""
    request = urllib.request.Request(f"{server.url}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_numbers_are_refused(server, field):
    """Python's JSON reads NaN and Infinity, which mlx-lm's range checks let through."""
    for value in ("NaN", "Infinity"):
        body = (f'{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 3, '
                f'"{field}": {value}}}').encode()
        status, answer = post_raw(server, "/v1/chat/completions", body)
        assert status == 400 and field in answer["error"], (status, answer)
    assert healthy(server.url)


def test_an_empty_prompt_gets_an_http_error(server, client):
    status = http_error(lambda: client.completions.create(model="default_model", prompt="",
                                                          max_tokens=MAX_TOKENS))
    assert status == 400 and healthy(server.url)


def test_the_models_endpoint_lists_the_served_model(server, client, model_dir):
    """mlx-lm's lists the Hugging Face cache's models (an empty body where it has none)."""
    assert [m.id for m in client.models.list()] == [str(model_dir)]
    assert client.models.retrieve("default_model").id == "default_model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("someone/else")


def test_max_tokens_is_lowered_to_the_servers_limit(server, client):
    answer = client.chat.completions.create(model="default_model", messages=user("Hi"),
                                            max_tokens=10**12, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == TOKENS_LIMIT


def test_prompt_and_completion_stay_within_the_servers_context(server, client, reference):
    """--max-context bounds prompt + completion: the completion stops there, a
    prompt that fills it is refused."""
    _, tokenizer = reference
    text = "word " * (CONTEXT_LIMIT - 8)
    n_prompt = len(tokenizer.encode(text))
    assert CONTEXT_LIMIT - TOKENS_LIMIT < n_prompt < CONTEXT_LIMIT - 2
    answer = client.completions.create(model="default_model", prompt=text,
                                       max_tokens=TOKENS_LIMIT, temperature=0)
    assert answer.usage.prompt_tokens == n_prompt
    assert answer.usage.completion_tokens == CONTEXT_LIMIT - n_prompt
    assert answer.choices[0].finish_reason == "length"
    too_long = "word " * CONTEXT_LIMIT
    assert http_error(lambda: client.completions.create(
        model="default_model", prompt=too_long, max_tokens=MAX_TOKENS)) == 400


def test_a_window_past_any_sequence_is_the_whole_sequence(server, client, logprob_tolerance):
    """mlx-lm slices the tokens with the penalty windows (32-bit indices)."""
    answers = [chat(client, user("Why is the sky blue?"), False, extra_body={
        "repetition_penalty": 1.5, "repetition_context_size": size}) for size in (10**12, 10**5)]
    assert_same(answers[0], answers[1], "window", logprob_tolerance)


def test_the_model_is_known_by_its_path_too(server, client, model_dir, reference):
    answer = client.chat.completions.create(model=str(model_dir), messages=user("Hi"),
                                            max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == ours(reference, "Hi").text


def test_ctrl_c_stops_the_server_cleanly(server):
    """Last in this module: it stops the module's server."""
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(60) == 0
    assert "Traceback" not in server.log.read_text()


# A server whose requests may run long, but for a few seconds at most.
TIME_LIMIT = 5.0


@pytest.fixture(scope="module")
def timed_server(model_dir, tmp_path_factory):
    running = start_server(model_dir, tmp_path_factory.mktemp("log") / "timed.log",
                           "--request-timeout", str(TIME_LIMIT),
                           "--max-tokens-limit", "1000000", "--max-context", "2000000")
    yield running
    stop(running.proc)


def cpu_seconds(pid) -> float:
    """CPU time a process has used (Linux: /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_time_limit_ends_cut_for_length(timed_server, stream):
    bound = TIME_LIMIT + 30  # a step past the limit, on a busy machine
    client = client_of(timed_server, timeout=bound)
    request = dict(model="default_model", messages=user("Hi"), max_tokens=10**12,
                   temperature=0)
    start = time.monotonic()
    if stream:
        chunks = []
        for chunk in client.chat.completions.create(stream=True, **request):
            chunks.append(chunk)
            assert time.monotonic() - start < bound, "the answer went on past the time limit"
        finish = chunks[-1].choices[0].finish_reason
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    else:
        answer = client.chat.completions.create(**request)
        finish = answer.choices[0].finish_reason
        assert answer.usage.completion_tokens > 1
    assert finish == "length"
    assert TIME_LIMIT <= time.monotonic() - start < bound


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="needs /proc")
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_gave_up_stops_and_blocks_nothing(timed_server, reference,
                                                                 stream):
    """A request for endless tokens whose client gives up after a second: the server
    stops decoding it (mlx-lm's decodes on, and a seeded request, which mlx-lm
    serves alone once the batch has drained, then waits for it forever)."""
    impatient = client_of(timed_server, timeout=1.0)
    request = dict(model="default_model", messages=user("Hi"), max_tokens=10**12,
                   temperature=0)
    start = time.monotonic()
    if stream:
        chunks = impatient.chat.completions.create(stream=True, **request)
        next(iter(chunks))
        chunks.close()  # the client hangs up mid-answer
    else:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(**request)
    time.sleep(0.5)
    before = cpu_seconds(timed_server.proc.pid)
    time.sleep(2.0)
    busy = cpu_seconds(timed_server.proc.pid) - before
    assert time.monotonic() - start < TIME_LIMIT, "too slow to tell giving up from the limit"
    assert busy < 0.3, f"the server used {busy:.2f} s of CPU in 2 s with no request to serve"
    served = client_of(timed_server).chat.completions.create(
        model="default_model", messages=user("Hi"), max_tokens=MAX_TOKENS, temperature=0,
        seed=0)
    assert served.choices[0].message.content == ours(reference, "Hi").text


def one_line_refusal(args, capsys, *needles):
    assert main(["serve", *args, "--port", "8080"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def test_serve_refuses_a_directory_whose_model_file_is_not_ours(model_dir, tmp_path, capsys):
    """config.json naming another model file: mlx-lm would run it (we pass
    --trust-remote-code), so serve refuses before starting anything."""
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, model_file="evil.py")))
    one_line_refusal(["--model", str(copy)], capsys, "'evil.py'", "convert the checkpoint again")
    assert not marker.exists()

    (copy / "config.json").write_text(json.dumps(config))  # ours by name, changed inside
    (copy / "genesis.py").write_text((copy / "genesis.py").read_text() + "\nimport os\n")
    one_line_refusal(["--model", str(copy)], capsys, "genesis.py is not the model file")


def test_serve_refuses_older_and_newer_directories(model_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["model_file"]
    (copy / "config.json").write_text(json.dumps(dict(config, genesis_mlx_format=2)))
    one_line_refusal(["--model", str(copy)], capsys, "older genesis-mlx")
    (copy / "config.json").write_text(json.dumps(dict(config, genesis_mlx_format=99)))
    one_line_refusal(["--model", str(copy)], capsys, "newer genesis-mlx", "pip install -U")


@pytest.mark.parametrize("option,value", [
    ("--decode-concurrency", "0"), ("--max-tokens", "-5"),
    ("--prompt-cache-bytes", "2TB"), ("--chat-template-args", "{oops"),
    ("--max-tokens-limit", "0"), ("--max-context", "-1"), ("--request-timeout", "nan"),
    ("--request-timeout", "0"), ("--max-tokens", "5000"),  # above the default limit
])
def test_serve_checks_its_options_before_loading(model_dir, capsys, option, value):
    """mlx-lm's server takes these as they come (a batch of 0, a traceback)."""
    one_line_refusal(["--model", str(model_dir), option, value], capsys, f"{option} {value}")


def test_serve_takes_a_raw_checkpoint(tokenizer_path, tmp_path, monkeypatch):
    """A reference .safetensors is converted once into the cache, and the
    conversion is a directory serve hands to mlx-lm."""
    from genesis_mlx import loading
    from genesis_mlx.serving import servable_dir

    monkeypatch.setattr(loading, "CACHE_ROOT", tmp_path / "cache")
    checkpoint = write_reference_checkpoint(tmp_path / "demo.safetensors", DEMO)
    served = servable_dir(str(checkpoint), tokenizer=tokenizer_path)
    assert served.parent == tmp_path / "cache" / "converted"
    assert servable_dir(str(checkpoint)) == served  # no tokenizer needed the second time
