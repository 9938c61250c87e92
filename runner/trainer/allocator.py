"""The CUDA caching allocator's settings for training: expandable segments.

With fixed-size segments, the blocks one step's backward frees stay cut up by
what is allocated next (AdamW's states, made at the first optimizer step), so a
card at its limit can hold gigabytes free in pieces too small for the next loss
buffer: on a 40 GB card that stopped jobs needing 5-10% less than the card.
With expandable segments the allocator maps physical pages into one growing
address range and, at the limit, unmaps its free pages and maps them again
where the request fits, so what a full card needs is the allocated peak
(``runner.plan.memory`` counts on that; measured in docs/benchmarks.md).
"""

from __future__ import annotations

import os

ALLOC_CONF = "expandable_segments:True"
# torch reads the first of these that is set; a user's own setting wins.
_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def configure(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Use expandable segments unless the allocator was configured already; before CUDA is first used."""
    if not any(environ.get(name) for name in _VARIABLES):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
