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

from conftest import SPREAD, U32
from genesis_mlx.conversion.convert import convert
from genesis_mlx.conversion.reference_format import DEMO, write_reference_checkpoint

WORDS = "the a cat dog sat ran on in red blue big small house tree river sky sun moon".split()
ITERS = 8
# Two processes each average the loss of their half of a batch (the trainer then
# averages the two gradients), one process the whole batch at once: the same numbers
# when the halves hold as many tokens, summed in another order in float32. Plain SGD
# keeps that rounding the size it is: Adam divides each gradient component by its own
# size, so that rounding in near-zero components becomes steps of the learning rate's
# size, and it would not see gradients summed where they should be averaged (it is
# blind to their scale). The yardstick is measured: one process again, on the model
# with every weight moved one float32 spacing (one more rounding of each); the
# two-process run must stay as close to the one-process run as that (within
# 2 * SPREAD, conftest's, of it).
OPTIMIZER = ("--optimizer", "sgd", "--learning-rate", "0.01")


def equal_length_texts(tokenizer, n, seed):
    """Texts of one token count each, so that both halves of every batch hold the
    same number of tokens (the condition for equal losses, see ITERS)."""
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


def nudged_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` with every float32 weight moved one spacing up or down (seeded)."""
    import shutil

    import mlx.core as mx

    shutil.copytree(model_dir, out)
    rng = np.random.default_rng(0)
    for path in out.glob("*.safetensors"):
        weights, metadata = mx.load(str(path), return_metadata=True)
        for name, w in weights.items():
            if w.dtype == mx.float32:
                w = np.array(w)
                away = np.where(rng.random(w.shape) < 0.5, np.inf, -np.inf).astype(np.float32)
                weights[name] = mx.array(np.nextafter(w, away))
        mx.save_safetensors(str(path), weights, metadata=metadata)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora(model_dir, data, adapters, processes=1):
    args = ["-m", "genesis_mlx", "lora", "--model", str(model_dir), "--train", "--data",
            str(data), "--iters", str(ITERS), "--batch-size", "4", "--num-layers", "8",
            "--steps-per-report", "1", "--steps-per-eval", "1000", "--val-batches", "1",
            "--adapter-path", str(adapters), *OPTIMIZER]
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
    _, nudged = lora(nudged_copy(model_dir, work / "nudged_model"), data, work / "nudged")

    curves = []
    for log in (alone, together, nudged):
        curves.append([(r["iteration"], r.get("train_loss", r.get("val_loss"))) for r in log])
    assert [i for i, _ in curves[0]] == [i for i, _ in curves[1]] == [i for i, _ in curves[2]]
    assert sum("train_loss" in r for r in alone) == ITERS
    assert json.loads((work / "one" / "adapter_config.json").read_text())["optimizer"] == "sgd"
    losses = np.array([[loss for _, loss in c] for c in curves])
    gap, rounding = (np.max(np.abs(losses[i] - losses[0]) / losses[0]) for i in (1, 2))
    print(f"\n[lora ring x2] max relative loss difference {gap:.1e}, "
          f"one rounding of the weights: {rounding:.1e}")
    assert gap <= 2 * SPREAD * max(rounding, U32), losses
    assert losses[0].min() < losses[0][0], "training did not move the loss"

    # only the first process reports and writes
    assert out.count(f"[genesis-mlx] iter {ITERS}: train loss") == 1, out[-2000:]
    assert sorted(p.name for p in (work / "two").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "train_log.jsonl"]
    one, two, nudge = (mx.load(str(work / d / "adapters.safetensors"))
                       for d in ("one", "two", "nudged"))
    assert one.keys() == two.keys() == nudge.keys()
    # As close as one more rounding of the weights leaves them (see ITERS); training
    # moved them (B starts at 0) farther.
    gaps, rounding = ([np.abs(np.array(one[k] - other[k])).max() for k in one]
                      for other in (two, nudge))
    tol = 2 * SPREAD * max(rounding)
    assert max(gaps) <= tol, (max(gaps), max(rounding))
    assert max(float(mx.abs(one[k]).max()) for k in one if k.endswith("lora_b")) > tol
