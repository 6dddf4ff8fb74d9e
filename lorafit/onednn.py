"""oneDNN cache bounds, set through the environment. Kept apart from `lorafit.fast` so that the CLI
can set them at start-up without importing torch."""

from __future__ import annotations

import os

ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Hold oneDNN's primitive cache and ideep's computation cache to `capacity` entries each
    (1,024 by default), unless the environment already sets them.

    CPU bf16 matmuls go through oneDNN, which builds a primitive for each input shape and caches
    it at about 0.3 MB an entry in each cache. Batches of new lengths at nearly every step fill both
    caches to 1,024 entries, about 0.6 GB kept for shapes that rarely come back (a standalone loop
    of 2,000 shapes: +556 MB live heap at the defaults, +19 MB at 16 entries, same time). The sizes
    are read once, at the first oneDNN call of the process, so this must run before it; afterwards
    it changes nothing.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))
