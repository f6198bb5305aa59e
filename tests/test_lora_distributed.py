"""genesis-mlx lora, data-parallel over MLX's own distributed backend: ``mlx.launch
--backend ring -n 2`` starts two processes on loopback, each training on its half of
every batch while mlx-lm's trainer averages their gradients. The loss curve equals
one process's at the same global batch size; only the first process writes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

WORDS = "the a cat dog sat ran on in red blue big small house tree river sky sun moon".split()
ITERS = 8
# Relative tolerance of each reported loss. Two processes each average the loss of
# their half of a batch (the trainer then averages the two), one process the whole
# batch at once: the same number when the halves hold as many tokens, summed in
# another order in float32, so the curves agree to float32 rounding. Adam turns that
# rounding in near-zero gradient components into steps of the learning rate's size,
# so the gap grows with the learning rate and the steps: at the default rate and
# these few steps it stays well inside this bound; an unstable rate would not.
RTOL = 1e-5


def equal_length_texts(tokenizer, n, seed):
    """Texts of one token count each, so that both halves of every batch hold the
    same number of tokens (the condition for equal losses, see RTOL)."""
    rng = np.random.RandomState(seed)
    texts = ["The " + " ".join(rng.choice(WORDS, 12)) for _ in range(n)]
    assert len({len(tokenizer.encode(t)) for t in texts}) == 1
    return texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    from genesis_mlx.loading import load

    work = tmp_path_factory.mktemp("lora_distributed")
    checkpoint = write_reference_checkpoint(work / "demo.safetensors", DEMO)
    model_dir = convert(str(checkpoint), str(work / "model"), tokenizer=tokenizer_path)
    _, tokenizer = load(str(model_dir))
    data = work / "data"
    data.mkdir()
    for split, n, seed in (("train", 32, 0), ("valid", 8, 1)):
        with open(data / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in equal_length_texts(tokenizer, n, seed))
    return work, model_dir, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora(model_dir, data, adapters, processes=1):
    args = ["-m", "genesis_mlx", "lora", "--model", str(model_dir), "--train", "--data",
            str(data), "--iters", str(ITERS), "--batch-size", "4", "--num-layers", "8",
            "--steps-per-report", "1", "--steps-per-eval", "1000", "--val-batches", "1",
            "--adapter-path", str(adapters)]
    command = [sys.executable, *args]
    if processes > 1:
        launcher = Path(sys.executable).parent / "mlx.launch"
        command = [str(launcher), "--backend", "ring", "-n", str(processes), "--starting-port",
                   str(free_port()), "--python", sys.executable, "--", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = [json.loads(line) for line in (adapters / "train_log.jsonl").read_text().splitlines()]
    return result.stdout, log


def test_two_processes_follow_one_process_loss_curve(setup):
    import mlx.core as mx

    work, model_dir, data = setup
    _, alone = lora(model_dir, data, work / "one")
    out, together = lora(model_dir, data, work / "two", processes=2)

    curves = []
    for log in (alone, together):
        curves.append([(r["iteration"], r.get("train_loss", r.get("val_loss"))) for r in log])
    assert [i for i, _ in curves[0]] == [i for i, _ in curves[1]]
    assert sum("train_loss" in r for r in alone) == ITERS
    losses = np.array([[loss for _, loss in c] for c in curves])
    print(f"\n[lora ring x2] max relative loss difference "
          f"{np.max(np.abs(losses[1] - losses[0]) / losses[0]):.1e}")
    assert np.allclose(losses[1], losses[0], rtol=RTOL, atol=0), losses
    assert losses[0].min() < losses[0][0], "training did not move the loss"

    # only the first process reports and writes
    assert out.count(f"[genesis-mlx] iter {ITERS}: train loss") == 1, out[-2000:]
    assert sorted(p.name for p in (work / "two").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "train_log.jsonl"]
    one = mx.load(str(work / "one" / "adapters.safetensors"))
    two = mx.load(str(work / "two" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    # The same adapters but for the few entries where Adam's rounding flip (see RTOL)
    # moved them apart by a fraction of one step (lr 1e-4); training moved them more.
    gaps = np.concatenate([np.abs(np.array(one[k] - two[k])).ravel() for k in one])
    assert gaps.max() < 1e-4 and np.mean(gaps > 1e-6) < 1e-3, (gaps.max(), np.mean(gaps > 1e-6))
    assert max(float(mx.abs(one[k]).max()) for k in one if k.endswith("lora_b")) > 1e-3
