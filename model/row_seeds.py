"""Random numbers of a caption that depend on its row alone: row `key`'s k-th caption draws from
seed(run seed, key, k), so a rerun, another batch size or another actor gives the same caption.

The same derivation as capfilt/stages/caption.py's BLIP captioner (blake2b of seed, key and k;
one torch generator per row), so every captioner family seeds alike.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, key: str, k: int) -> int:
    """A 63-bit seed for the k-th caption of row `key`, independent of batching and process."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """One uniform per row and step, each row from its own generator. -> [N, steps] float32 (CPU)"""
    out = torch.empty(len(seeds), steps)
    for i, seed in enumerate(seeds):
        out[i] = torch.rand(steps, generator=torch.Generator().manual_seed(seed))
    return out
