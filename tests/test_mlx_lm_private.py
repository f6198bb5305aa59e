"""What genesis-mlx takes from mlx-lm beyond its documented API, one test each, so
that a new mlx-lm that changes it fails here (pyproject.toml bounds mlx-lm at the
newest version tested; .ci/bounds runs these at both ends):

- ``mlx_lm.models.cache._BaseCache``, the base of Genesis's caches (model/cache.py):
  what they take from it unchanged;
- ``load_prompt_cache`` finding cache classes by name in mlx-lm's cache module,
  where model/cache.py registers Genesis's;
- ``mlx_lm.server``'s ``main``/``run`` building ModelProvider, LRUPromptCache and
  ResponseGenerator under their module names, which serving.py replaces;
- the one rich console (``cli_ui.make_console``) behind the LoRA trainer's display,
  which tuning/lora.py quiets;
- ``mlx_lm.utils.create_model_card``, called by mlx-lm's ``save`` through its module,
  which mlx_lm_cli.py replaces for Genesis directories;
- mlx-lm's list of tools, which ``genesis-mlx lm`` checks TOOL against;
- ``ResponseGenerator._tokenize`` (the server's prompt rendering, which serving.py
  runs in the request's own thread to refuse a bad prompt with HTTP 400) and
  ``server._run_http_server`` taking a handler class (the bounded request handler).
"""

import ast
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import mlx_model
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint
from genesis_mlx.model.cache import GENESIS_CACHES


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return mlx_model(write_reference_checkpoint(
        tmp_path_factory.mktemp("private") / "demo.safetensors", DEMO))


def test_genesis_caches_take_what_they_lack_from_mlx_lms_base_cache(model):
    from mlx_lm.models import cache as mlx_lm_cache

    base = mlx_lm_cache._BaseCache
    assert issubclass(mlx_lm_cache.KVCache, base) and issubclass(mlx_lm_cache.ArraysCache, base)
    assert all(issubclass(cls, base) for cls in GENESIS_CACHES)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    # Recurrent state cannot be trimmed: mlx-lm's server and prompt caches ask.
    assert not any(c.is_trimmable() for c in cache)
    assert not mlx_lm_cache.can_trim_prompt_cache(cache)
    # from_state builds a cache without __init__, then sets its state.
    for c in cache:
        rebuilt = type(c).from_state(c.state)
        for a, b in zip(rebuilt.state, c.state):
            assert a is b or np.array_equal(np.array(a), np.array(b))


def test_prompt_cache_files_find_genesis_caches_by_name(model, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    save_prompt_cache(str(tmp_path / "prompt.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "prompt.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    step = mx.array([[6]])
    want = np.array(model(step, cache=cache))
    assert np.array_equal(np.array(model(step, cache=loaded)), want)


def test_mlx_lm_server_builds_its_classes_under_their_module_names(monkeypatch):
    from mlx_lm import server

    built = []

    class Stop(Exception):
        pass

    class ModelProvider:
        def __init__(self, cli_args):
            built.append(("ModelProvider", cli_args.model))
            self.cli_args = cli_args

    class LRUPromptCache:
        def __init__(self, *args, **kwargs):
            built.append("LRUPromptCache")

    class ResponseGenerator:
        def __init__(self, model_provider, prompt_cache):
            built.append("ResponseGenerator")
            raise Stop  # before any port opens

    for cls in (ModelProvider, LRUPromptCache, ResponseGenerator):
        monkeypatch.setattr(server, cls.__name__, cls)
    monkeypatch.setattr(sys, "argv", ["mlx_lm.server", "--model", "some-model"])
    with pytest.raises(Stop):
        server.main()
    assert built == [("ModelProvider", "some-model"), "LRUPromptCache", "ResponseGenerator"]


def test_lora_quiets_the_trainers_display_through_mlx_lms_one_console(capsys):
    from mlx_lm.cli_ui import TrainUI

    from genesis_mlx.tuning.lora import without_mlx_lm_display

    def report():
        with TrainUI(10) as ui:
            ui.report_train(1, 2.5, 100.0, 1000)
            ui.report_val(1, 2.75, 0.5)

    report()
    assert "2.750" in capsys.readouterr().out  # the display this test would miss
    with without_mlx_lm_display():
        report()
    assert capsys.readouterr().out == ""


def test_mlx_lms_save_writes_the_model_card_through_its_module(tmp_path, monkeypatch):
    """mlx-lm's convert, fuse and quantizers write a directory with ``utils.save``."""
    import mlx.nn as nn
    import mlx_lm.utils

    from genesis_mlx.mlx_lm_cli import prepare_mlx_lm

    monkeypatch.setattr(mlx_lm.utils, "create_model_card", mlx_lm.utils.create_model_card)
    saved = []

    class Tokenizer:
        def save_pretrained(self, path):
            saved.append(path)

    prepare_mlx_lm()
    source, out = tmp_path / "source", tmp_path / "written"
    source.mkdir()
    mlx_lm.utils.save(out, str(source), nn.Linear(2, 2), Tokenizer(), {"model_type": "genesis"})
    assert saved == [out]
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and "genesis-mlx generate --model written" in card


def test_mlx_lms_tools_are_the_ones_genesis_mlx_lm_knows():
    from genesis_mlx.mlx_lm_cli import TOOLS

    result = subprocess.run([sys.executable, "-m", "mlx_lm", "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("The supported subcommands are", 1)[1].splitlines()[0]
    assert sorted(ast.literal_eval(listed.strip())) == sorted(TOOLS)


def test_the_servers_prompt_rendering_and_http_loop_take_what_serving_passes():
    """serving.py renders a request's prompt with ``_tokenize(tokenizer, request,
    args)`` (args: an object with ``chat_template_kwargs``) and starts the HTTP loop
    with its own handler class."""
    import inspect

    from mlx_lm import server

    params = list(inspect.signature(server.ResponseGenerator._tokenize).parameters)
    assert params == ["self", "tokenizer", "request", "args"]
    source = inspect.getsource(server.ResponseGenerator._tokenize)
    assert "args.chat_template_kwargs" in source
    run = inspect.signature(server._run_http_server)
    assert list(run.parameters)[:3] == ["host", "port", "response_generator"]
    assert "handler_class" in run.parameters
    assert isinstance(server.CompletionRequest, type) and hasattr(server, "ModelDescription")
