"""Progress bars for long work (tqdm on a terminal, plain log lines otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    # mininterval keeps logs of non-interactive runs (Dagster, CI) short.
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
