"""Seeds derived from names: every random draw (noise, caption dropout, clip order, LoRA init) is a
pure function of its parts, so a resumed run or another rank draws exactly what it would have drawn.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: stable across processes (unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
