"""A kernel body on the CPU: compiled as C++ with the "cpu" prelude and called once per
GPU thread, so the logic the GPU runs is checked on machines without one. A kernel
with barriers runs one threadgroup at a time, its threads as real threads meeting at
a ``std::barrier`` and sharing its ``SHARED`` arrays."""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from .launcher import PRELUDES, Kernel, first_error_line

HOST_TYPES = {"float": np.float32, "int": np.int32}


class KernelCompileError(RuntimeError):
    """A kernel body that does not compile; the message is the compiler's first error."""


def emulation_source(kernel: Kernel, template: Dict[str, int]) -> str:
    params = [f"const {t}* {n}" for n, t in kernel.inputs]
    params += [f"const int* {n}_shape" for n in kernel.shapes_of]
    params += [f"float* {n}" for n in kernel.outputs]
    args = [n for n, _ in kernel.inputs] + [f"{n}_shape" for n in kernel.shapes_of]
    args = ", ".join(args + kernel.outputs)
    consts = "".join(f"constexpr int {k} = {v};\n" for k, v in template.items())
    if kernel.barriers:  # each group's threads run together and meet at the barrier
        launch = (f"  for (uint g = 0; g * group < n_threads; ++g) {{\n"
                  f"    std::barrier<> meeting(group);\n    emulated_barrier = &meeting;\n"
                  f"    std::vector<std::thread> threads;\n"
                  f"    for (uint t = 0; t < group; ++t) threads.emplace_back([&, g, t] {{\n"
                  f"      emulated_group = g;\n      emulated_lane = t;\n"
                  f"      thread_body(g * group + t, {args});\n    }});\n"
                  f"    for (auto& thread : threads) thread.join();\n  }}\n")
    else:
        launch = f"  for (uint t = 0; t < n_threads; ++t) thread_body(t, {args});\n"
    return (f"{PRELUDES['cpu']}{consts}"
            f"static void thread_body(uint GLOBAL_THREAD_ID, {', '.join(params)}) {{\n"
            f"{kernel.body()}\n}}\n"
            f"extern \"C\" void run(uint n_threads, uint group, {', '.join(params)}) {{\n"
            f"{launch}}}\n")


@functools.lru_cache(maxsize=None)
def compiled_library(source: str, name: str):
    """The C++ source built once into a shared library (kept by the source's hash)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / "genesis-mlx-kernels"
    build.mkdir(exist_ok=True)
    library = build / f"{name}_{digest}.so"
    if not library.exists():
        build_library(source, library)
    return ctypes.CDLL(str(library))


def build_library(source: str, library: Path) -> None:
    """Compiles into a file of this process's own, then renames it into place, so a
    process loading the library never sees one half written by another."""
    src = library.with_suffix(f".{os.getpid()}.cpp")
    partial = library.with_suffix(f".{os.getpid()}.so")
    src.write_text(source)
    try:
        subprocess.run(["c++", "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", str(src),
                        "-o", str(partial)], check=True, capture_output=True, text=True,
                       env=dict(os.environ, LC_ALL="C"))  # plain quotes in its messages
    except subprocess.CalledProcessError as e:
        line = first_error_line(e.stderr).replace(str(src), f"{library.stem}.cpp")
        raise KernelCompileError(f"c++: {line}") from None
    finally:
        src.unlink(missing_ok=True)
    os.replace(partial, library)


def emulate(kernel: Kernel, inputs: List[mx.array], template: Dict[str, int], n_threads: int,
            output_shapes: List[tuple], threadgroup: int) -> List[mx.array]:
    host = [np.ascontiguousarray(np.array(a.astype(mx.float32 if t == "float" else mx.int32)),
                                 dtype=HOST_TYPES[t]) for a, (_, t) in zip(inputs, kernel.inputs)]
    by_name = dict(zip([n for n, _ in kernel.inputs], host))
    shapes = [np.array(by_name[n].shape, np.int32) for n in kernel.shapes_of]
    outs = [np.zeros(s, np.float32) for s in output_shapes]
    library = compiled_library(emulation_source(kernel, template), kernel.name)
    library.run(ctypes.c_uint(n_threads), ctypes.c_uint(threadgroup),
                *[a.ctypes.data_as(ctypes.c_void_p) for a in host + shapes + outs])
    return [mx.array(o) for o in outs]
