"""The Redis tier of the prefix cache (DESIGN.md "Prefix cache in Redis").

- ``blob``: the versioned, checksummed block format (never pickle);
- ``store``: ``PrefixStore``, pipelined lookups, background write-back, circuit breaker, counters;
- ``tier``: local tier then Redis, as the workers use it;
- ``server``: a local redis-server process for ``tandem serve`` and the tests.
"""

from services.prefix_store.blob import BlobError, BlockLayout
from services.prefix_store.config import PrefixStoreConfig
from services.prefix_store.store import PrefixStore, block_key

__all__ = ["BlobError", "BlockLayout", "PrefixStore", "PrefixStoreConfig", "block_key"]
