"""mlx-lm's own tools on a converted directory, run as users run them
(``python -m mlx_lm TOOL ... --trust-remote-code``, offline), each checked against
genesis-mlx's own computation on the same model: generate, chat, lora + fuse,
convert -q, cache_prompt + generate --prompt-cache-file, benchmark, perplexity and
evaluate (lm-eval, through mlx-lm's MLXLM: its CLI resolves only lm-eval's
registered tasks, and this task is defined here)."""

import json
import math
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import genesis_mlx as g
from conftest import assert_ready_to_publish, logits_tolerance, logprobs_tolerance, max_difference
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

GREEDY = g.SamplingOptions(temp=0.0, repetition_penalty=1.0)
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def write_demo_checkpoint(path):
    """The demo model with its TTT head's output scale at 1 (random init: 1e-4, which
    leaves TTT, and so the difference between cached and whole-sequence TTT,
    invisible in the logits)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    write_reference_checkpoint(path, DEMO)
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    weights = load_file(str(path))
    weights["metacognition.ttt.layer_scale.scale"][:] = 1.0
    save_file(weights, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx_lm_tools")


@pytest.fixture(scope="module")
def checkpoint(work):
    return write_demo_checkpoint(work / "demo.safetensors")


@pytest.fixture(scope="module")
def model_dir(work, checkpoint, tokenizer_path):
    return convert(str(checkpoint), str(work / "model"), tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def ours(model_dir):
    return g.load(str(model_dir))


# What transformers says of a model type it does not know (the model file tells it ours).
UNKNOWN_MODEL_TYPE = "to instantiate a model of type"


def mlx_lm(*args, stdin=None, timeout=300, module="mlx_lm", env=None):
    """One mlx-lm tool in its own process, as a user runs it (``module="genesis_mlx"``
    with args "lm", TOOL, ...: through genesis-mlx lm)."""
    result = subprocess.run([sys.executable, "-m", module, *map(str, args), "--trust-remote-code"],
                            input=stdin, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, **OFFLINE, **(env or {})))
    assert result.returncode == 0, result.stderr[-3000:]
    assert UNKNOWN_MODEL_TYPE not in result.stderr, result.stderr[-3000:]
    return result.stdout


def no_cache_logprobs(model, tokens):
    """log-softmax of the last position of the no-cache forward over ``tokens``."""
    logits = model(mx.array(tokens)[None])[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits))


# --- generate, chat ---

@pytest.mark.parametrize("prompt,template", [("Why is the sky blue?", True), ("1 2 3 4", False)])
def test_generate_equals_our_greedy_generate(model_dir, ours, prompt, template):
    model, tokenizer = ours
    flags = [] if template else ["--ignore-chat-template"]
    out = mlx_lm("generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", 16,
                 "--temp", 0, "--verbose", "False", *flags)
    want = g.generate(model, tokenizer, prompt, max_tokens=16, sampling=GREEDY,
                      use_chat_template=template)
    assert out == want + "\n"


def test_chat_two_turns_then_quit(model_dir, ours):
    """mlx-lm's chat keeps one cache across turns, each turn its own templated
    message: the same as our generate continuing one cache."""
    model, tokenizer = ours
    questions = ["What colour is the sky?", "And the sea?"]
    out = mlx_lm("chat", "--model", model_dir, "--max-tokens", 8,
                 stdin="".join(q + "\n" for q in questions) + "q\n")
    cache = model.make_cache()
    for question in questions:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True)
        answer = g.generate(model, tokenizer, turn, max_tokens=8, sampling=GREEDY,
                            prompt_cache=cache)
        assert answer in out
    assert out.count("8 tokens") == 2 and "bye" in out, out[-1500:]


def test_genesis_mlx_lm_runs_them_with_the_fast_blas(model_dir, work):
    """``genesis-mlx lm TOOL`` is ``mlx_lm TOOL`` in a process with the CLI's BLAS
    preload (Linux, OpenBLAS and a C compiler: CI has them, test_blas.py requires
    them). Seen from inside: a copy of the model directory whose model file also
    prints what the process preloaded (mlx-lm runs it; serve would not)."""
    import shutil

    probe = shutil.copytree(model_dir, work / "blas_probe")
    with open(probe / "genesis.py", "a") as f:
        # (numpy's wheels bundle an OpenBLAS of their own: the preload is told apart
        # by LD_PRELOAD, the forwarding by its library)
        f.write("import os\nmaps = open('/proc/self/maps').read()\n"
                "print('blas:', 'openblas' in os.environ.get('LD_PRELOAD', ''), "
                "'gemv_forward-' in maps, file=sys.stderr)\n")

    def blas(*runner):
        result = subprocess.run(
            [sys.executable, "-m", *runner, "generate", "--model", str(probe),
             "--trust-remote-code", "--prompt", "Hi", "--max-tokens", "4", "--temp", "0"],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, **OFFLINE))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "==========" in result.stdout, result.stdout
        return [line for line in result.stderr.splitlines() if line.startswith("blas:")]

    assert blas("mlx_lm") == ["blas: False False"]
    assert blas("genesis_mlx", "lm") == ["blas: True True"], "apt install libopenblas0-pthread"


# --- lora + fuse ---

def write_text_data(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        with open(directory / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": r}) + "\n" for r in records)
    return directory


def test_lora_then_fuse_equals_base_plus_adapter(model_dir, work):
    data = write_text_data(work / "lora_data", [f"Fact {i}: the sky is blue." for i in range(8)])
    adapters, fused_dir = work / "mlx_lm_adapters", work / "fused"
    mlx_lm("lora", "--model", model_dir, "--train", "--data", data, "--iters", 6,
           "--batch-size", 2, "--learning-rate", "1e-4", "--num-layers", 4,
           "--adapter-path", adapters, "--steps-per-eval", 100, "--val-batches", 1)
    mlx_lm("fuse", "--model", model_dir, "--adapter-path", adapters, "--save-path", fused_dir)
    assert_ready_to_publish(fused_dir, work, adapters)  # the Genesis card, not mlx-lm's

    base, _ = g.load(str(model_dir))
    adapted, _ = g.load(str(model_dir), adapter_path=str(adapters))
    fused, _ = g.load(str(fused_dir))
    ids = mx.array(np.random.RandomState(3).randint(0, 50000, (1, 24)))
    want = np.array(adapted(ids))
    tol = logits_tolerance(adapted, np.array(ids))  # as in test_lora's fuse test
    assert max_difference(fused(ids), want) <= tol
    assert max_difference(base(ids), want) > tol, "the adapters changed nothing"
    # decoding (the one-token fast path) sees the adapters as the fused weights
    steps = []
    for model in (adapted, fused):
        cache = model.make_cache()
        model(ids[:, :-1], cache=cache)
        steps.append(np.array(model(ids[:, -1:], cache=cache)))
    assert max_difference(steps[0], steps[1]) <= tol


# --- convert -q ---

def test_convert_q_in_both_tools_gives_the_same_quantized_model(model_dir, checkpoint, work,
                                                                 tokenizer_path):
    """mlx-lm asks the model's quant_predicate only about layers its group size
    divides (the demo's 96-wide inputs: not 64), so it is given 32; genesis-mlx's
    default 64 falls back to 32 per layer. Same layers, same bits per weight."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import compute_bits_per_weight

    theirs_dir = work / "q_mlx_lm"
    mlx_lm("convert", "--hf-path", model_dir, "--mlx-path", theirs_dir, "-q",
           "--q-group-size", 32)
    card = assert_ready_to_publish(theirs_dir, work, checkpoint, tokenizer_path)
    assert "quantized to 4 bits (group size 32)" in card.text
    ours_dir = convert(str(checkpoint), str(work / "q_genesis"), quantize_model=True,
                       tokenizer=tokenizer_path)
    ids = mx.array([[5, 17, 300, 2000, 42]])
    logits, bits = [], []
    for directory in (theirs_dir, ours_dir):
        for model, _ in (g.load(str(directory)), mlx_lm_load(str(directory), trust_remote_code=True)):
            logits.append(np.array(model(ids)))
            bits.append(compute_bits_per_weight(model))
    assert all(np.array_equal(logits[0], x) for x in logits[1:])
    # 4-bit groups with float32 scales and biases, some layers in full precision
    assert len(set(bits)) == 1 and 5 < bits[0] < 8, bits
    model, _ = g.load(str(ours_dir))
    quantized = {p for p, m in model.named_modules() if hasattr(m, "scales")}
    assert {"tok_emb", "blocks.3.attn.o_proj", "blocks.0.ffn.up_proj"} <= quantized
    # no group size divides the demo's FFN or GLA output widths; gates and the TTT
    # head stay full precision
    assert not {"blocks.0.ffn.down_proj", "blocks.0.attn.o_proj"} & quantized
    assert not any(p.startswith("metacognition") or p.endswith("gk_proj") for p in quantized)


# --- cache_prompt + generate --prompt-cache-file ---

def test_prompt_cache_file_continues_as_the_whole_prompt(model_dir, ours, work):
    from mlx_lm.models.cache import load_prompt_cache

    model, tokenizer = ours
    prefix_text, query = "Remember the code word: kiwi.\n", "What is the code word?"
    cache_file = work / "prompt.safetensors"
    mlx_lm("cache_prompt", "--model", model_dir, "--prompt", prefix_text,
           "--prompt-cache-file", cache_file)

    def template(content, **kwargs):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], **kwargs)

    # what the two tools feed the model: the user message cut after the prefix,
    # then the rest of the templated prompt
    prefix = template(prefix_text, add_generation_prompt=False, continue_final_message=True)
    marked = template("<query>", add_generation_prompt=True, tokenize=False)
    suffix = tokenizer.encode(template(query, add_generation_prompt=True, tokenize=False)
                              [marked.index("<query>"):], add_special_tokens=False)
    whole = template(prefix_text + query, add_generation_prompt=True)
    assert prefix + suffix == whole

    cache = load_prompt_cache(str(cache_file))
    assert cache[-1].seen.tolist() == [len(prefix)]
    got = np.array(model(mx.array(suffix)[None], cache=cache)[0, -1])
    want = np.array(model(mx.array(whole)[None])[0, -1])
    assert np.abs(got - want).max() <= logits_tolerance(model, whole)

    # mlx-lm reads the file before the model that registers Genesis's cache classes
    args = ["--model", model_dir, "--max-tokens", 12, "--temp", 0, "--verbose", "False"]
    with_file = mlx_lm("lm", "generate", *args, "--prompt", query, "--prompt-cache-file",
                       cache_file, module="genesis_mlx")
    assert with_file == mlx_lm("generate", *args, "--prompt", prefix_text + query)


# --- benchmark ---

def test_benchmark_batch_of_two(model_dir):
    out = mlx_lm("benchmark", "--model", model_dir, "-p", 32, "-g", 8, "-b", 2, "-n", 1)
    assert "batch_size=2" in out, out
    averages = dict(re.findall(r"(\w+)=([\d.]+)", out.split("Averages:")[1]))
    assert set(averages) == {"prompt_tps", "generation_tps", "peak_memory"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in averages.values()), averages


# --- perplexity ---

WORDS = "the a cat dog sat ran on in red blue big small house tree river sky sun moon".split()


def test_perplexity_equals_our_no_cache_forward(model_dir, ours, work):
    """One long record: mlx-lm's sampling order cannot change which tokens it reads
    (the first sequence_length * num_samples of the record)."""
    pytest.importorskip("datasets")  # mlx-lm's perplexity reads text files through it
    model, tokenizer = ours
    rng = np.random.RandomState(0)
    text = " ".join(rng.choice(WORDS, 200))
    data = work / "ppl_data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
    out = mlx_lm("perplexity", "--model", model_dir, "--data-path", data,
                 "--sequence-length", 32, "--num-samples", 4, "--batch-size", 2)
    reported = float(re.search(r"Perplexity: ([\d.]+)", out).group(1))

    rows = np.array(tokenizer.encode(text)[: 32 * 4]).reshape(4, 32)
    losses = []
    for row in rows:  # one row at a time: a model mixing rows of a batch would differ
        logits = model(mx.array(row[None, :-1])).astype(mx.float32)
        losses.append(np.array(mx.logsumexp(logits, axis=-1)
                               - mx.take_along_axis(logits, mx.array(row[None, 1:, None]),
                                                    axis=-1)[..., 0]))
    want = math.exp(float(np.mean(losses)))
    print(f"\n[perplexity] mlx-lm {reported:.3f}, ours {want:.3f}")
    # A token's loss (logsumexp minus a logit) moves by at most twice the logits, so
    # does their mean, and exp turns that into a relative change; printed with 3
    # decimals.
    loss_tol = 2 * logits_tolerance(model, rows[:, :-1])
    assert math.isfinite(reported)
    assert abs(reported - want) <= want * math.expm1(loss_tol) + 0.5e-3, (reported, want)


# --- evaluate (lm-eval) ---

QUESTIONS = [
    ("What colour is the sky?", ["blue sky", "green grass", "red fire"], 0),
    ("What do cows drink?", ["cold water", "hot oil"], 0),
    ("Where is Paris?", ["in Spain", "in France", "in Peru"], 1),
    ("Name a prime number.", ["eight", "seven or eleven", "nine", "four"], 1),
    ("Which animal barks?", ["a cat", "a dog"], 1),
    ("What rises in the east?", ["the moon tonight", "a river", "the sun"], 2),
]
TASK = """task: genesis_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def continuation_loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(token | everything before it) over the continuation's tokens,
    each from our no-cache forward over the tokens before it."""
    start = len(tokenizer.encode(context))
    tokens = tokenizer.encode(context + continuation)
    return sum(float(no_cache_logprobs(model, tokens[:t])[tokens[t]])
               for t in range(start, len(tokens)))


def test_lm_eval_multiple_choice_equals_our_loglikelihoods(model_dir, ours, work, monkeypatch):
    for name, value in OFFLINE.items():  # before datasets reads them
        monkeypatch.setenv(name, value)
    pytest.importorskip("datasets")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from mlx_lm.evaluate import MLXLM

    task_dir = work / "lm_eval_task"
    task_dir.mkdir()
    data = task_dir / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (task_dir / "genesis_toy.yaml").write_text(TASK.format(data=data))
    lm = MLXLM(str(model_dir), use_chat_template=False, trust_remote_code=True)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["genesis_toy"], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))

    model, tokenizer = ours
    samples = sorted(results["samples"]["genesis_toy"], key=lambda s: s["doc_id"])
    correct = []
    for (question, choices, answer), sample in zip(QUESTIONS, samples):
        context = f"Question: {question}\nAnswer:"
        want = [continuation_loglikelihood(model, tokenizer, context, " " + c) for c in choices]
        got = [ll for ll, _ in sample["filtered_resps"]]
        # a sum of log-probabilities: each within logprobs_tolerance
        sequences = [tokenizer.encode(context + " " + c) for c in choices]
        step_tol = logprobs_tolerance(model, max(sequences, key=len))
        counts = [len(s) - len(tokenizer.encode(context)) for s in sequences]
        assert all(abs(g - w) <= n * step_tol for g, w, n in zip(got, want, counts)), \
            (question, got, want)
        correct.append(int(np.argmax(want)) == answer)
    accuracy = results["results"]["genesis_toy"]["acc,none"]
    print(f"\n[lm-eval] accuracy {accuracy:.3f} (by hand {np.mean(correct):.3f})")
    assert accuracy == pytest.approx(np.mean(correct))
