"""``freeze_startup_objects``: live objects leave the collected generations."""

import gc

from services.engine.gc_tuning import freeze_startup_objects


def test_live_objects_are_frozen_and_collections_skip_them():
    before = gc.get_freeze_count()
    keep = [[i] for i in range(5000)]  # 5,000 tracked objects alive across the call
    try:
        frozen = freeze_startup_objects()
        assert frozen >= before + 5000
        collected = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert not any(id(x) in collected for x in keep)  # none left where a collection looks
    finally:
        gc.unfreeze()  # leave the test process as it was
    del keep
