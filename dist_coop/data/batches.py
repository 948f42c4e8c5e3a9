"""What the in-memory and the webdataset batches share: being read as one data shard of several.

Both are dataclasses whose constructor checks their settings; ``sharded`` copies one with another
``shard`` / ``num_shards`` through that constructor, so every other setting is kept, the check runs
again (a split too small for that many data shards is refused) and per-stream counters start afresh.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

B = TypeVar("B", bound="Sharded")


class Sharded:
    """Mixin for the batch dataclasses (``MemoryBatches``, ``ShardBatches``), which have ``shard`` and
    ``num_shards`` fields."""

    shard: int
    num_shards: int

    def sharded(self: B, shard: int, num_shards: int) -> B:
        """The same batches reading data shard ``shard`` of ``num_shards`` (how each class splits: its docstring)."""
        return dataclasses.replace(self, shard=shard, num_shards=num_shards)
