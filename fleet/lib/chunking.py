"""Where the plane cuts an artifact into chunks: at content-defined boundaries (FastCDC).

Fixed-size chunks fail a delta as soon as an edit changes a length: ONNX keeps the
model's doc string and producer ahead of the weights, so editing either shifts every
byte after it and every fixed chunk changes. A content-defined cut point depends only
on the bytes around it, so chunks away from an edit keep their boundaries and
hashes, and an agent that holds the previous version fetches only the chunks near
the edit. bench/delta.py measures both ways on MiniLM; docs/benchmarks.md has the
figures.

The cut points are the plane's alone: the agent only reads the lengths from the
manifest. They stay comparable between versions only while the parameters (and the
fastcdc release, pinned in requirements/plane.txt) stay the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastcdc import fastcdc

from agent.contract.wire import MAX_CHUNK_BYTES

FIXED: Final = "fixed"
CONTENT_DEFINED: Final = "cdc"
CHUNKINGS: Final = (FIXED, CONTENT_DEFINED)


def cdc_lengths(path: Path, average: int) -> list[int]:
    """The lengths of ``path``'s content-defined chunks: at least a quarter, at most four times ``average``."""
    if path.stat().st_size == 0:
        return []
    largest = min(average * 4, MAX_CHUNK_BYTES)
    chunks = fastcdc(str(path), min_size=max(64, average // 4), avg_size=average, max_size=largest)
    return [chunk.length for chunk in chunks]


def chunk_lengths(path: Path, *, chunking: str, average: int) -> list[int]:
    """The lengths to cut ``path`` at; empty for fixed-size chunks."""
    if chunking == FIXED:
        return []
    if chunking == CONTENT_DEFINED:
        return cdc_lengths(path, average)
    raise ValueError(f"unknown chunking {chunking!r}: use one of {', '.join(CHUNKINGS)}")
