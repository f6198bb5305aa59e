"""genesis-mlx doctor as a user runs it: exit code, what it prints, its JSON report;
and a kernel body that does not compile shows up there with the compiler's error."""

import json
import subprocess
import sys
import time

import mlx.core as mx

from genesis_mlx import __version__
from genesis_mlx.kernels import guard
from genesis_mlx.kernels.backend import device_gpu


def doctor(*args):
    return subprocess.run([sys.executable, "-m", "genesis_mlx", "doctor", "--quick", *args],
                          capture_output=True, text=True, timeout=600)


def test_doctor_checks_every_kernel_and_writes_its_report(tmp_path):
    path = tmp_path / "doctor.json"
    result = doctor("--json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(path.read_text())
    assert report["ok"] and result.stdout.strip().endswith(f"report written to {path}")

    system = report["system"]
    assert system["mlx"] == mx.__version__ and system["genesis_mlx"] == __version__
    assert system["gpu_backend"] == device_gpu() and system["cpu_cores"] >= 1
    assert report["memory_bandwidth_gb_s"] > 0.1

    kernels = report["kernels"]
    assert kernels["checked_on"] == (device_gpu() or "emulate")
    if device_gpu() is None:
        assert "not used on this device" in result.stdout and not kernels["used_by_model"]
    results = kernels["results"]
    assert {(r["kernel"], r["dtype"]) for r in results} == {
        (title, dtype) for title in guard.guards() for dtype in ("float32", "bfloat16")}
    for r in results:
        assert r["ok"] and 0 <= r["max_rel_error"] <= guard.TOLERANCE, r
        assert r["kernel_ms"] > 0 and r["ops_ms"] > 0, r

    parity = report["model_parity"]
    assert parity["ok"] and parity["max_logit_diff"] <= parity["allowed"]
    assert parity["kernel_states"]["GLA recurrent"] == "checked"
    assert parity["kernel_states"]["FoX tiled attention"] == "checked"

    paths = report["paths"]
    assert paths["forms"]["arrangement"] == ("cpu" if device_gpu() is None else "gpu")
    assert paths["forms"]["why"] in result.stdout
    for when in ("decode", "prefill pieces of 1024 tokens"):
        for layer in ("gla", "fox"):
            path_taken = report["paths"][when][layer]
            assert path_taken["path"] and path_taken["why"], (when, layer)
            assert f"{path_taken['path']} ({path_taken['why']})" in result.stdout
            if device_gpu() is None:
                assert "kernel" not in path_taken["path"]
    if device_gpu() is None:
        assert paths["decode"]["gla"] == {
            "path": "step", "why": "one token against a cache; no GPU here, so no kernels"}
        assert paths["decode"]["fox"]["path"] == "decode step"


def test_doctor_reports_a_kernel_that_does_not_compile(tmp_path, inject_fault, capsys):
    """In process, with the GLA body broken: exit code 1, the compiler's first error
    line in the report, the model still right (the guard switched the kernel off, with
    one warning line), the other kernels passing."""
    from genesis_mlx.cli.main import main

    inject_fault("gla", "syntax")
    path = tmp_path / "doctor.json"
    assert main(["doctor", "--quick", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    assert not report["ok"]
    for r in report["kernels"]["results"]:
        if r["kernel"] == "GLA recurrent":
            assert not r["ok"] and "error" in r["reason"] and r["max_rel_error"] is None, r
        else:
            assert r["ok"], r
    parity = report["model_parity"]
    assert parity["ok"] and parity["kernel_states"]["GLA recurrent"].startswith("disabled: ")
    out, err = capsys.readouterr()
    assert "check(s) failed" in out and str(path) in out
    assert len([line for line in err.splitlines() if "genesis-mlx doctor" in line]) == 1


def test_doctor_writes_a_report_only_where_json_says(tmp_path):
    result = subprocess.run([sys.executable, "-m", "genesis_mlx", "doctor", "--quick"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
    assert result.stdout.strip().endswith("--json PATH writes a report")


def test_doctor_refuses_a_report_path_it_cannot_write_before_any_check(tmp_path, capsys):
    from genesis_mlx.cli.main import main

    (tmp_path / "file").write_text("")
    for path, needle in [(tmp_path / "missing" / "r.json", "no directory"),
                         (tmp_path, "is a directory"),
                         (tmp_path / "file" / "r.json", "no directory")]:
        start = time.monotonic()
        assert main(["doctor", "--quick", "--json", str(path)]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--json" in lines[0] and needle in lines[0], err
        assert not out and time.monotonic() - start < 5  # no check ran
