"""Ways to cut bytes into the feeds an incremental parser is given (test_http_parser.py,
test_proxy.py): byte by byte, or at chosen offsets."""

from __future__ import annotations

from collections.abc import Iterable


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (any order, duplicates allowed: empty feeds too)."""
    out, last = [], 0
    for point in sorted(cuts):
        out.append(data[last:point])
        last = point
    out.append(data[last:])
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]
