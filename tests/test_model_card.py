"""A converted directory, ready to publish and to use beyond genesis-mlx: its model
card and generation config, no local paths, a tokenizer that any transformers
consumer reads as ours (ChatML, a turn ends at <|im_end|>, the model's context), and
mlx-lm's upload checks passing on it (offline, up to the network call)."""

import json
import os

import huggingface_hub
import pytest

from conftest import assert_ready_to_publish
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint
from genesis_mlx.conversion.tokenizer import render_chat

REPO = "guiferrarib/genesis-152m-instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "bonjour"},
     {"role": "user", "content": "Ünïcödé, emoji 🙂 and <b>tags</b>"}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("card") / "demo.safetensors", DEMO)


@pytest.fixture(scope="module")
def local_dir(checkpoint, tokenizer_path, tmp_path_factory):
    return convert(str(checkpoint), str(tmp_path_factory.mktemp("local") / "genesis-demo"),
                   tokenizer=tokenizer_path)


@pytest.fixture
def hub_dir(checkpoint, tokenizer_path, tmp_path, monkeypatch):
    """Converted from a Hub repo id at a revision (the download faked: a snapshot
    directory holding the checkpoint)."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    os.symlink(checkpoint, snapshot / "genesis.safetensors")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, **kwargs: str(snapshot))
    return convert(REPO, str(tmp_path / "genesis-152m-mlx"), tokenizer=tokenizer_path,
                   revision="abc123")


def test_a_directory_converted_from_the_hub_names_its_base_model(hub_dir, checkpoint,
                                                                   tokenizer_path):
    card = assert_ready_to_publish(hub_dir, hub_dir, checkpoint, tokenizer_path)
    assert card.data.base_model == REPO and card.data.license == "apache-2.0"
    assert f"converted from [{REPO}](https://huggingface.co/{REPO}) (revision `abc123`)" \
        in card.text
    config = json.loads((hub_dir / "config.json").read_text())
    assert (config["genesis_source"], config["genesis_revision"]) == (REPO, "abc123")


def test_a_directory_converted_from_a_local_file_holds_no_local_path(local_dir, checkpoint,
                                                                      tokenizer_path):
    card = assert_ready_to_publish(local_dir, local_dir, checkpoint, tokenizer_path)
    assert card.data.base_model is None and "from a local Genesis checkpoint" in card.text
    assert "genesis_source" not in json.loads((local_dir / "config.json").read_text())


def test_any_transformers_consumer_reads_our_chat_format(local_dir):
    from transformers import AutoTokenizer

    config = json.loads((local_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    assert tokenizer.eos_token_id == 50278
    assert tokenizer.model_max_length == DEMO["block_size"]
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
            assert text == render_chat(messages, add_generation_prompt)


def test_the_models_own_loader_stops_where_a_turn_ends(local_dir):
    import genesis_mlx as g

    _, tokenizer = g.load(str(local_dir))
    assert {0, 50278} <= set(tokenizer.eos_token_ids)


def test_mlx_lm_upload_passes_its_checks_offline(local_dir, tmp_path, monkeypatch):
    """mlx_lm.upload reads the card (no card: 'Cannot load RepoCard'), rewrites its
    text, keeps its front matter, then creates the repo and uploads the folder: the
    Hub client is a fake that records those calls."""
    import shutil
    import sys

    from huggingface_hub import ModelCard
    from mlx_lm import upload

    directory = shutil.copytree(local_dir, tmp_path / local_dir.name)
    calls = []

    class OfflineHub:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_large_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", str(folder_path), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineHub)
    monkeypatch.setattr(sys, "argv", ["mlx_lm.upload", "--path", str(directory),
                                      "--upload-repo", "someone/genesis-demo"])
    upload.main()
    assert calls == [("create_repo", "someone/genesis-demo"),
                     ("upload", str(directory), "someone/genesis-demo")]
    card = ModelCard.load(directory / "README.md")
    assert card.data.library_name == "mlx" and "custom_code" in card.data.tags
