"""Seeds in one place: every derived seed in the package is ``mix_seed(run seed, what it is for, ...)``."""

from __future__ import annotations

import hashlib


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, rank, step, …): distinct tuples give unrelated seeds."""
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
