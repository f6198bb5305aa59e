"""--revision pins Hub downloads: every command that downloads passes it to
huggingface_hub's snapshot_download (faked here: no network), and conversions of
different revisions never share a cache directory."""

import json
import os

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from genesis_mlx.cli.main import main
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

REPO = "someone/genesis-test"


@pytest.fixture
def offline_hub(monkeypatch):
    """snapshot_download recording what it is asked, then failing as offline."""
    asked = []

    def snapshot(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append((repo_id, revision))
        raise LocalEntryNotFoundError("offline (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return asked


def lora_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    adapters = tmp_path / "adapters"  # --test checks they exist before the download
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    (adapters / "adapters.safetensors").write_bytes(b"")
    return data


COMMANDS = {
    "convert": lambda t: ["convert", "--hf-path", REPO, "--mlx-path", str(t / "out")],
    "generate": lambda t: ["generate", "--model", REPO, "--prompt", "hi"],
    "chat": lambda t: ["chat", "--model", REPO],
    "lora": lambda t: ["lora", "--model", REPO, "--test", "--data", str(lora_data(t)),
                       "--batch-size", "1", "--adapter-path", str(t / "adapters")],
    "fuse": lambda t: ["fuse", "--model", REPO, "--adapter-path", str(t / "a"),
                       "--save-path", str(t / "fused")],
    "serve": lambda t: ["serve", "--model", REPO, "--port", "8080"],
    "bench": lambda t: ["bench", "--model", REPO, "--prompt-lengths", "8", "--gen", "1",
                        "--reps", "1", "--compare", "reference"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_downloading_command_passes_the_revision(command, offline_hub, tmp_path, capsys):
    assert main([*COMMANDS[command](tmp_path), "--revision", "v1.2"]) == 2
    assert offline_hub == [(REPO, "v1.2")]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{REPO}' at revision 'v1.2'" in err[0], err


def test_without_a_revision_the_default_branch_is_asked_for(offline_hub, tmp_path, capsys):
    assert main(COMMANDS["generate"](tmp_path)) == 2
    assert offline_hub == [(REPO, None)]
    assert "at revision" not in capsys.readouterr().err


def test_a_revision_for_a_local_source_is_refused(offline_hub, tmp_path, capsys):
    checkpoint = write_reference_checkpoint(tmp_path / "demo.safetensors", DEMO)
    assert main(["generate", "--model", str(checkpoint), "--revision", "main",
                 "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Hub repo id" in err[0], err
    assert offline_hub == []


@pytest.fixture
def hub_of_one_blob(tmp_path, monkeypatch):
    """A fake Hub cache where every revision's checkpoint is a link to the same blob
    (as huggingface_hub stores identical files); -> the revisions asked for."""
    blob = write_reference_checkpoint(tmp_path / "blobs" / "0123abcd", DEMO)
    asked = []

    def snapshot(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append(revision)
        snapshot_dir = tmp_path / "snapshots" / str(revision)
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        link = snapshot_dir / "genesis.safetensors"
        if not link.exists():
            os.symlink(blob, link)
        return str(snapshot_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return asked


def test_revisions_convert_into_their_own_cache_dirs(hub_of_one_blob, tokenizer_path, tmp_path,
                                                     monkeypatch):
    from genesis_mlx import loading

    monkeypatch.setattr(loading, "CACHE_ROOT", tmp_path / "cache")
    dirs = {rev: loading.resolve_model_dir(REPO, tokenizer_path, revision=rev)
            for rev in ["v1", "v2", None]}
    assert hub_of_one_blob == ["v1", "v2", None]
    assert len(set(dirs.values())) == 3
    assert all(loading.is_current(d) and d.parent == tmp_path / "cache" / "converted"
               for d in dirs.values())
    converted_at = (dirs["v1"] / "config.json").stat().st_mtime_ns
    assert loading.resolve_model_dir(REPO, tokenizer_path, revision="v1") == dirs["v1"]
    assert (dirs["v1"] / "config.json").stat().st_mtime_ns == converted_at  # converted once


def test_convert_records_the_revision(hub_of_one_blob, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "--hf-path", REPO, "--revision", "abc123", "--mlx-path", str(out),
                 "--tokenizer", tokenizer_path]) == 0
    config = json.loads((out / "config.json").read_text())
    assert hub_of_one_blob == ["abc123"]
    assert (config["genesis_source"], config["genesis_revision"]) == (REPO, "abc123")
