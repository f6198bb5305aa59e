"""A converted directory is an mlx-lm model directory: mlx-lm's own loader opens it
through its model file (with --trust-remote-code), which imports the installed
package; genesis-mlx's loader never runs that file."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    work = tmp_path_factory.mktemp("mlx_lm")
    checkpoint = write_reference_checkpoint(work / "demo.safetensors", DEMO)
    return convert(str(checkpoint), str(work / "model"), tokenizer=tokenizer_path)


def run_mlx_lm(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def test_mlx_lm_loads_the_directory_as_genesis_does(model_dir):
    from mlx_lm import load as mlx_lm_load

    import genesis_mlx as g

    theirs, their_tokenizer = mlx_lm_load(str(model_dir), trust_remote_code=True)
    ours, tokenizer = g.load(str(model_dir))
    assert type(theirs).__module__ == "genesis_mlx.model.genesis"
    ids = mx.array([tokenizer.encode("The sky is blue because")])
    assert np.array_equal(np.array(theirs(ids)), np.array(ours(ids)))
    messages = [{"role": "user", "content": "Hi"}]
    assert (their_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_tokenizer_files_carry_the_chat_template_in_their_config(model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert not (model_dir / "chat_template.jinja").exists()


@pytest.mark.parametrize("package,needle", [
    ("raise ImportError('No module named genesis_mlx')", "pip install genesis-mlx"),
    ("__version__ = '0.1.0'", "newer genesis-mlx than the installed 0.1.0"),
])
def test_a_missing_or_older_package_is_one_line(model_dir, tmp_path, package, needle):
    import os

    fake = tmp_path / "genesis_mlx"  # found first: the directory it runs in
    fake.mkdir()
    (fake / "__init__.py").write_text(package)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = run_mlx_lm("generate", "--model", str(model_dir), "--trust-remote-code",
                        "--prompt", "hi", "--max-tokens", "2", env=env, cwd=tmp_path)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and err == [err[0]] and needle in err[0], result.stderr


def test_our_loader_never_runs_the_directory_code(model_dir, tmp_path):
    """A model_file pointing elsewhere: genesis-mlx loads the model with its own
    classes, and the foreign file does not run."""
    import shutil

    import genesis_mlx as g

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((copy / "config.json").read_text())
    config["model_file"] = "evil.py"
    (copy / "config.json").write_text(json.dumps(config))
    model, tokenizer = g.load(str(copy))
    ids = mx.array([tokenizer.encode("Hello")])
    assert np.array_equal(np.array(model(ids)), np.array(g.load(str(model_dir))[0](ids)))
    assert not marker.exists()


def test_a_loaded_model_copies_and_pickles(model_dir):
    """As mlx-lm's own model tests require of every model: a model loaded through
    mlx-lm deep-copies and pickles, fresh and after decoding (its compiled steps are
    rebuilt, not copied), with LoRA layers and quantized; the copy computes the same
    logits, decoding included."""
    import copy
    import pickle

    import mlx.nn as nn
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = mlx_lm_load(str(model_dir), trust_remote_code=True)
    ids = mx.array([tokenizer.encode("The sky is blue because")])

    def logits(m):
        cache = m.make_cache()
        prompt = m(ids[:, :-2], cache=cache)
        steps = [m(ids[:, t : t + 1], cache=cache) for t in (ids.shape[1] - 2, ids.shape[1] - 1)]
        return np.concatenate([np.array(m(ids)), np.array(prompt), *map(np.array, steps)], axis=1)

    copies = [copy.deepcopy(model)]
    want = logits(model)  # the original has decoded: its steps are compiled now
    copies += [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
    changed = logits(model)
    assert np.abs(changed - want).max() > 1e-3, "fixture too weak: quantizing changed nothing"
    for other in copies:
        assert np.array_equal(logits(other), want)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert np.array_equal(logits(other), changed)


def test_mlx_lm_kv_bits_quantizes_the_fox_cache(model_dir):
    """mlx-lm's generate_step with kv_bits asks every cache that can to quantize itself:
    the FoX layers' caches switch to QuantizedFoxCache (the others hold no growing
    K/V, as mlx-lm's ArraysCache), at the start and mid-way, and the log-probabilities
    stay within the 8-bit cache's bound (README)."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    from genesis_mlx.model.cache import FoxCache, QuantizedFoxCache

    model, tokenizer = mlx_lm_load(str(model_dir), trust_remote_code=True)
    prompt = mx.array(tokenizer.encode("Why is the sky blue? Tell me about light and air."))

    def run(**options):
        cache = model.make_cache()
        steps = generate_step(prompt, model, max_tokens=12, prompt_cache=cache,
                              sampler=lambda lp: mx.argmax(lp, axis=-1), **options)
        return [np.array(lp) for _, lp in steps], cache

    exact, exact_cache = run()
    assert not any(isinstance(c, QuantizedFoxCache) for c in exact_cache)
    for start in (0, prompt.size + 4):
        quantized, cache = run(kv_bits=8, kv_group_size=32, quantized_kv_start=start)
        fox = [c for c in cache if isinstance(c, FoxCache)]
        assert fox and all(type(c) is QuantizedFoxCache and c.bits == 8 for c in fox)
        assert all(type(a) is type(b) for a, b in zip(cache, exact_cache)
                   if not isinstance(a, FoxCache))
        errors = [np.abs(q - e).max() / max(1.0, np.abs(e).max()) for q, e in zip(quantized, exact)]
        assert 0 < max(errors) <= 5e-3, errors
