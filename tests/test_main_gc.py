"""`bridged run` imports the daemon's modules without the collector and freezes them
(bridged.__main__._import_quietly): a new interpreter's start is spared the collections
that walked the young objects of the imports again and again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_imports_run_no_collection_and_end_frozen_with_the_collector_on():
    """In a new interpreter: no collection while bridged.supervisor is imported, its
    objects in the permanent generation afterwards, the collector enabled again."""
    script = textwrap.dedent("""
        import gc
        import bridged.__main__ as main
        assert "bridged.supervisor" not in __import__("sys").modules
        collections = []
        gc.callbacks.append(lambda phase, info: collections.append(info["generation"]))
        main._import_quietly()
        gc.callbacks.clear()
        print(len(collections), gc.get_freeze_count(), gc.isenabled())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    collections, frozen, enabled = result.stdout.split()
    assert collections == "0"
    assert int(frozen) > 20_000  # about 50,000 containers
    assert enabled == "True"
