"""One kernel body, three ways to run it: ``mx.fast.metal_kernel``,
``mx.fast.cuda_kernel``, and a CPU emulation that compiles the body as C++ and calls
it once per GPU thread. The bodies (``metal/*.inc``) use only what the three
preludes define (GLOBAL_THREAD_ID; THREADGROUP_ID, LOCAL_ID, BARRIER and SHARED for
threadgroups; EXP, NEG_INF, uint), so the emulation runs exactly the logic the GPU
runs. A kernel with barriers is emulated one threadgroup at a time, its threads as
real threads meeting at a std::barrier, its SHARED arrays shared by them."""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

SOURCE_DIR = Path(__file__).parent / "metal"
THREADGROUP = 128

PRELUDES = {
    "metal": ("#define GLOBAL_THREAD_ID thread_position_in_grid.x\n"
              "#define THREADGROUP_ID threadgroup_position_in_grid.x\n"
              "#define LOCAL_ID thread_position_in_threadgroup.x\n"
              "#define BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)\n"
              "#define SHARED threadgroup\n"
              "#define EXP metal::exp\n#define NEG_INF (-INFINITY)\n"),
    "cuda": ("typedef unsigned int uint;\n"
             "#define GLOBAL_THREAD_ID (blockIdx.x * blockDim.x + threadIdx.x)\n"
             "#define THREADGROUP_ID blockIdx.x\n#define LOCAL_ID threadIdx.x\n"
             "#define BARRIER __syncthreads()\n#define SHARED __shared__\n"
             "#define EXP expf\n#define NEG_INF (-__int_as_float(0x7f800000))\n"),
    # The emulation sets these per thread (see emulation_source). SHARED arrays are
    # function statics: one copy, seen by the one threadgroup that runs at a time.
    "cpu": ("#include <barrier>\n#include <cmath>\n#include <thread>\n#include <vector>\n"
            "typedef unsigned int uint;\n"
            "static thread_local uint emulated_group, emulated_lane;\n"
            "static std::barrier<>* emulated_barrier;\n"
            "#define THREADGROUP_ID emulated_group\n#define LOCAL_ID emulated_lane\n"
            "#define BARRIER emulated_barrier->arrive_and_wait()\n#define SHARED static\n"
            "#define EXP std::exp\n#define NEG_INF (-INFINITY)\n"),
}

# Thread attributes the Metal prelude's macros expand to. mx.fast.metal_kernel adds an
# attribute to the kernel's signature only when its name occurs in the source (the
# header is not searched), so the Metal source names them in a comment.
METAL_ATTRIBUTES = ("thread_position_in_grid", "threadgroup_position_in_grid",
                    "thread_position_in_threadgroup")


def gpu_backend() -> Optional[str]:
    """"metal", "cuda", None (ops path), or "emulate" (the kernel bodies on the CPU,
    for tests: ``GENESIS_MLX_KERNELS=emulate``). ``off`` forces the ops path."""
    choice = os.environ.get("GENESIS_MLX_KERNELS", "auto")
    if choice in ("off", "emulate"):
        return None if choice == "off" else "emulate"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


class SharedKernel:
    def __init__(self, name: str, source: str, inputs: Sequence[Tuple[str, str]],
                 outputs: Sequence[str], shapes_of: Sequence[str], templates: Sequence[str],
                 barriers: bool = False):
        self.name, self.source = name, source
        self.inputs = list(inputs)  # (name, "float" or "int")
        self.outputs = list(outputs)
        self.shapes_of = list(shapes_of)
        self.templates = list(templates)
        self.barriers = barriers  # threads of a group must run together (emulation)

    def body(self) -> str:
        return (SOURCE_DIR / self.source).read_text()

    def gpu_source(self, backend: str) -> str:
        if backend == "metal":
            return f"// thread attributes: {' '.join(METAL_ATTRIBUTES)}\n{self.body()}"
        return self.body()

    @functools.lru_cache(maxsize=None)
    def compiled(self, backend: str):
        factory = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        return factory(name=self.name, input_names=[n for n, _ in self.inputs],
                       output_names=self.outputs, source=self.gpu_source(backend),
                       header=PRELUDES[backend])

    def __call__(self, backend: str, inputs: List[mx.array], template: Dict[str, int],
                 n_threads: int, output_shapes: List[tuple],
                 threadgroup: int = THREADGROUP) -> List[mx.array]:
        """``n_threads`` is rounded up to whole threadgroups; a kernel that uses
        THREADGROUP_ID must get a multiple of its ``threadgroup``."""
        if backend == "emulate":
            return self.emulate(inputs, template, n_threads, output_shapes, threadgroup)
        groups = (n_threads + threadgroup - 1) // threadgroup
        return self.compiled(backend)(
            inputs=inputs, template=list(template.items()),
            grid=(groups * threadgroup, 1, 1), threadgroup=(threadgroup, 1, 1),
            output_shapes=output_shapes, output_dtypes=[mx.float32] * len(output_shapes))

    # --- CPU emulation ---

    def emulation_source(self, template: Dict[str, int]) -> str:
        params = [f"const {t}* {n}" for n, t in self.inputs]
        params += [f"const int* {n}_shape" for n in self.shapes_of]
        params += [f"float* {n}" for n in self.outputs]
        args = [n for n, _ in self.inputs] + [f"{n}_shape" for n in self.shapes_of] + self.outputs
        consts = "".join(f"constexpr int {k} = {v};\n" for k, v in template.items())
        if self.barriers:  # each group's threads run together and meet at the barrier
            launch = (f"  for (uint g = 0; g * group < n_threads; ++g) {{\n"
                      f"    std::barrier<> meeting(group);\n    emulated_barrier = &meeting;\n"
                      f"    std::vector<std::thread> threads;\n"
                      f"    for (uint t = 0; t < group; ++t) threads.emplace_back([&, g, t] {{\n"
                      f"      emulated_group = g;\n      emulated_lane = t;\n"
                      f"      thread_body(g * group + t, {', '.join(args)});\n    }});\n"
                      f"    for (auto& thread : threads) thread.join();\n  }}\n")
        else:
            launch = (f"  for (uint t = 0; t < n_threads; ++t) "
                      f"thread_body(t, {', '.join(args)});\n")
        return (f"{PRELUDES['cpu']}{consts}"
                f"static void thread_body(uint GLOBAL_THREAD_ID, {', '.join(params)}) {{\n"
                f"{self.body()}\n}}\n"
                f"extern \"C\" void run(uint n_threads, uint group, {', '.join(params)}) {{\n"
                f"{launch}}}\n")

    @functools.lru_cache(maxsize=None)
    def library(self, template_items: tuple):
        source = self.emulation_source(dict(template_items))
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        build = Path(tempfile.gettempdir()) / "genesis-mlx-kernels"
        build.mkdir(exist_ok=True)
        library = build / f"{self.name}_{digest}.so"
        if not library.exists():
            src = library.with_suffix(".cpp")
            src.write_text(source)
            subprocess.run(["c++", "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", str(src),
                            "-o", str(library)], check=True, capture_output=True)
        return ctypes.CDLL(str(library))

    def emulate(self, inputs, template, n_threads, output_shapes, threadgroup=THREADGROUP):
        dtypes = {"float": np.float32, "int": np.int32}
        host = [np.ascontiguousarray(np.array(a.astype(mx.float32 if t == "float" else mx.int32)),
                                     dtype=dtypes[t]) for a, (_, t) in zip(inputs, self.inputs)]
        by_name = dict(zip([n for n, _ in self.inputs], host))
        shapes = [np.array(by_name[n].shape, np.int32) for n in self.shapes_of]
        outs = [np.zeros(s, np.float32) for s in output_shapes]
        ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
        self.library(tuple(sorted(template.items()))).run(
            ctypes.c_uint(n_threads), ctypes.c_uint(threadgroup),
            *[ptr(a) for a in host + shapes + outs])
        return [mx.array(o) for o in outs]
