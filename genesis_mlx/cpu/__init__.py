"""The CPU arrangement: what exists only because of how MLX's CPU backend runs the
model, used only when the default device is the CPU (``genesis_mlx.forms`` decides).

- ``fastmath``: exp, sigmoid, SiLU and softmax in forms that are fast there (powers
  of two, fused polynomials), where MLX evaluates an elementwise op on one thread.
- ``fox``: FoX attention for long prompts spread over CPU streams (one per core),
  and a decoding token against the FoX cache's buffers as one compiled graph.
- ``decode``: the one-token layout of a block (few graph nodes: every node costs the
  thread that dispatches it time it shares with the BLAS threads), reading arrays
  derived once from the parameters.
- ``blas``: a fast BLAS (OpenBLAS, preloaded by the CLI on Linux) and the GEMV
  forwarding that streams the weights of decoding's vector products.

On a GPU none of this runs: the model takes MLX's own ops and fused kernels.
"""
