"""What the proxy's runner does once at startup (pure logic, no server)."""

from __future__ import annotations

import gc
import sys

from pgleap.proxy.runner import _ENGINE_MODULES, freeze_startup_objects


def test_startup_freezes_the_engine_out_of_the_collectors_walks() -> None:
    gc.unfreeze()
    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        # The engine is loaded before the freeze, or its modules (pglast, asyncpg) would be walked at every
        # full collection for the life of the process: the stall this avoids.
        missing = [name for name in _ENGINE_MODULES if name not in sys.modules]
        assert not missing, f"not imported before the freeze: {missing}"
        assert "pglast" in sys.modules
        frozen = gc.get_freeze_count()
        assert frozen > before + 10_000, f"only {frozen - before} objects frozen"
        # What a full collection still walks is what came after startup, a small part of it.
        gc.collect()
        assert len(gc.get_objects(generation=2)) < frozen // 2
    finally:
        gc.unfreeze()
