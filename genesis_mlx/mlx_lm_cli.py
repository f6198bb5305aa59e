"""mlx-lm's command line (``python -m genesis_mlx.mlx_lm_cli TOOL ...``, the tools of
``python -m mlx_lm``) with Genesis's cache classes registered first.

Needed by ``generate --prompt-cache-file``: mlx-lm rebuilds a prompt-cache file's
caches from the class names it records, looked up in its own cache module, and reads
the file before it loads the model, whose import would register Genesis's classes
there (``mlx_lm generate`` alone stops with ``KeyError: 'GLACache'``)."""

import genesis_mlx.model.cache  # noqa: F401  (registers GLACache, FoxCache, TTTCache, ...)
from mlx_lm.cli import main

if __name__ == "__main__":
    main()
