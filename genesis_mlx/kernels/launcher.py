"""One kernel body (``metal/*.inc``), three launchers: ``mx.fast.metal_kernel``,
``mx.fast.cuda_kernel``, and the CPU emulation (``emulation.py``), which compiles the
same body as C++ and calls it once per GPU thread. The bodies use only what the three
preludes define (GLOBAL_THREAD_ID; THREADGROUP_ID, LOCAL_ID, BARRIER and SHARED for
threadgroups; EXP, NEG_INF, uint), so the emulation runs exactly the logic the GPU
runs."""

import copy
import functools
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

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
    # The emulation sets these per thread (see emulation.py). SHARED arrays are
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


class Kernel:
    """A kernel body and its signature. ``inputs``: (name, "float" or "int");
    ``shapes_of``: inputs whose shapes the body reads (``NAME_shape``);
    ``templates``: integer constants fixed per launch; ``barriers``: the threads of a
    group must run together (the emulation then runs them as real threads)."""

    def __init__(self, name: str, source: str, inputs: Sequence[Tuple[str, str]],
                 outputs: Sequence[str], shapes_of: Sequence[str], templates: Sequence[str],
                 barriers: bool = False):
        self.name, self.source = name, source
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.shapes_of = list(shapes_of)
        self.templates = list(templates)
        self.barriers = barriers
        self.text: Optional[str] = None

    def body(self) -> str:
        return self.text if self.text is not None else (SOURCE_DIR / self.source).read_text()

    def with_body(self, text: str) -> "Kernel":
        """The same kernel with another body (tests inject faults with it), under a
        name of its own: MLX keeps a compiled GPU kernel by name, and some versions
        would run the old body for the new."""
        other = copy.copy(self)
        other.name = f"{self.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        other.text = text
        return other

    def gpu_source(self, backend: str) -> str:
        if backend == "metal":
            return f"// thread attributes: {' '.join(METAL_ATTRIBUTES)}\n{self.body()}"
        return self.body()

    @functools.lru_cache(maxsize=None)
    def compiled(self, backend: str):
        """Built once per kernel and backend; the GPU compiles the source when the
        first launch is evaluated, so an error in it surfaces there."""
        factory = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        return factory(name=self.name, input_names=[n for n, _ in self.inputs],
                       output_names=self.outputs, source=self.gpu_source(backend),
                       header=PRELUDES[backend])

    def __call__(self, backend: str, inputs: List[mx.array], template: Dict[str, int],
                 n_threads: int, output_shapes: List[tuple],
                 threadgroup: int = THREADGROUP) -> List[mx.array]:
        """Runs ``n_threads`` threads (rounded up to whole threadgroups; a kernel that
        uses THREADGROUP_ID must get a multiple of its ``threadgroup``). Outputs are
        float32."""
        if backend == "emulate":
            from .emulation import emulate

            return emulate(self, inputs, template, n_threads, output_shapes, threadgroup)
        groups = (n_threads + threadgroup - 1) // threadgroup
        return self.compiled(backend)(
            inputs=inputs, template=list(template.items()),
            grid=(groups * threadgroup, 1, 1), threadgroup=(threadgroup, 1, 1),
            output_shapes=output_shapes, output_dtypes=[mx.float32] * len(output_shapes))


def first_error_line(message: str) -> str:
    """The line of a compiler's (or MLX's) message that says what went wrong: the
    first one naming an error, else the first non-empty one."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for marker in ("error:", "error"):
        errors = [line for line in lines if marker in line.lower()]
        if errors:
            return errors[0]
    return lines[0] if lines else "(no message)"
