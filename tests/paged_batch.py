"""A ragged mixed batch over a paged KV cache, as a step's metadata gives it: the attention
tests' input (the Triton kernels' tests and the CPU backend's; no Triton needed here)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_PAD_TOKENS = 3


@dataclass
class Batch:
    query: torch.Tensor  # [num_tokens + NUM_PAD_TOKENS, num_heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    scale: float


def make_batch(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, seed: int, device: torch.device = DEVICE) -> Batch:
    """Sequence s has context_lens[s] cached tokens and query_lens[s] new ones (already stored)."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks full of junk
    block_ids = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 2, dtype=torch.int32)
    used = 0
    for s, count in enumerate(blocks_per_seq):
        block_tables[s, :count] = block_ids[used:used + count]
        used += count
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens + NUM_PAD_TOKENS, num_heads, head_dim, generator=generator)
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Batch(
        query=query.to(device, dtype),
        k_cache=torch.randn(cache_shape, generator=generator).to(device, dtype),
        v_cache=torch.randn(cache_shape, generator=generator).to(device, dtype),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), scale=head_dim ** -0.5)
