"""What benchmarks/attn_gpu.py's stages (and flash_gpu.py) share: the arguments (parsed here,
known ones only: --cpu-smoke, set before Triton is imported, --stages, --quick), the head shapes,
emit / bench_ms, a ragged paged batch (Paged) and the check stage."""
from __future__ import annotations

import argparse
import json
import math
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
ap.add_argument("--stages", default="cudnn_shapes,micro,engine,long64,budget16k")
ap.add_argument("--skip-check", action="store_true", help="no correctness stage first (engine A/B runs only)")
ap.add_argument("--modes", default="", help="engine / long64 stages: attn_engine mode names (default: theirs)")
ap.add_argument("--quick", action="store_true", help="tail: the split rules only (no tile sweep, fewer shapes)")
ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim (llama-1b: 32,8,64)")
ap.add_argument("--tiles", default="", help="tail: the sweep's launches as TILE_N:WARPS:STAGES[:MAX_REGISTERS],... "
                                            "(default: its own)")
ap.add_argument("--chunk-keys", type=int, default=1024, help="tail: the tile sweep's split chunk in keys")
ap.add_argument("--tile-rule", default="chunked", choices=("chunked", "legacy"),
                help="tail: the tile sweep's split rule: chunked at --chunk-keys, or the engine's own (legacy: one "
                     "segment a sequence at thr512's shapes, the launch the decode graphs run)")
ap.add_argument("--order", default="random", help="tail: the rows' order by context: random, desc (longest first), asc")
ap.add_argument("--plans", default="", help="tail: forced split plans SEGMENTS:TILES_A_SEGMENT:TILE_N:WARPS:STAGES"
                                            "[:SHORT_TILES:LONE_TILES],... (the batch-1 shapes' segments and pipeline "
                                            "depth; without the last two, no short / lone thresholds)")
ap.add_argument("--shapes", default="", help="tail: only these shapes (labels of attn_tail.TAIL_SHAPES)")
args, _ = ap.parse_known_args()  # flash_gpu.py imports this module with its own arguments
SMOKE = args.cpu_smoke
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
STAGES = set(args.stages.split(","))

import torch  # noqa: E402
import triton  # noqa: E402

from pagedserve.attention.backend import TritonBackend  # noqa: E402
from pagedserve.attention.metadata import AttentionMetadata  # noqa: E402
from pagedserve.attention.torch_ref import paged_attention_ref  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from pagedserve.attention.sdpa_prefill import sdpa_prefill_sequence  # noqa: E402
from pagedserve.attention.triton_prefill_attention import prefill_attention  # noqa: E402

DEV = torch.device("cpu" if SMOKE else "cuda")
OUT = os.environ.get("OUT")
T_START = time.time()
HQ, HKV, D = (4, 2, 32) if SMOKE else tuple(int(v) for v in args.heads.split(","))
BS = 16


def emit(**kw) -> None:
    kw["t"] = round(time.time() - T_START, 1)
    line = json.dumps(kw)
    print("RESULT " + line, flush=True)
    if OUT:
        with open(os.path.join(OUT, "attn_gpu.jsonl"), "a") as f:
            f.write(line + "\n")


def bench_ms(fn) -> float:
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def causal_flop(query_lens: list[int], context_lens: list[int]) -> float:
    """QK^T and PV of every (query, visible key) pair: 4 * D * Hq per pair."""
    pairs = sum(q * c + q * (q + 1) / 2 for q, c in zip(query_lens, context_lens))
    return 4.0 * D * HQ * pairs


class Paged:
    """A ragged step: sequence s has context_lens[s] cached tokens and query_lens[s] new ones,
    all stored in a paged cache with a shuffled block table; key/value are the new tokens' K/V."""

    def __init__(self, query_lens: list[int], context_lens: list[int], dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.query_lens, self.context_lens = query_lens, context_lens
        seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
        nblocks = [-(-n // BS) for n in seq_lens]
        total = sum(nblocks) + 2
        perm = torch.randperm(total, generator=g, device=DEV).to(torch.int32)
        self.block_tables = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32, device=DEV)
        used = 0
        for s, n in enumerate(nblocks):
            self.block_tables[s, :n] = perm[used:used + n]
            used += n
        self.k_cache = torch.randn(total, BS, HKV, D, generator=g, device=DEV).to(dtype)
        self.v_cache = torch.randn(total, BS, HKV, D, generator=g, device=DEV).to(dtype)
        self.num_tokens = sum(query_lens)
        self.query = torch.randn(self.num_tokens, HQ, D, generator=g, device=DEV).to(dtype)
        # the new tokens' positions -> slots; their K/V read back from the cache (as stored)
        rows = torch.repeat_interleave(torch.arange(len(seq_lens), device=DEV),
                                       torch.tensor(query_lens, device=DEV))
        pos = torch.cat([torch.arange(c, c + q, device=DEV) for q, c in zip(query_lens, context_lens)])
        slots = self.block_tables[rows, pos // BS].long() * BS + pos % BS
        self.key = self.k_cache.view(-1, HKV, D)[slots].contiguous()
        self.value = self.v_cache.view(-1, HKV, D)[slots].contiguous()
        self.slot_mapping = slots
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        self.qsl = torch.tensor([0] + query_lens, dtype=torch.int32, device=DEV).cumsum(0, dtype=torch.int32)
        self.max_q, self.max_s = max(query_lens), max(seq_lens)
        self.num_decodes = 0
        while self.num_decodes < len(query_lens) and query_lens[self.num_decodes] == 1:
            self.num_decodes += 1
        self.scale = D ** -0.5

    def as_fused_qkv_views(self) -> None:
        """query/key/value as views into one [T, (Hq + 2 Hkv) * D] buffer, as the model passes them."""
        t = self.num_tokens
        fused = torch.cat([self.query.reshape(t, -1), self.key.reshape(t, -1), self.value.reshape(t, -1)], dim=1)
        self.query = fused[:, :HQ * D].view(t, HQ, D)
        self.key = fused[:, HQ * D:(HQ + HKV) * D].view(t, HKV, D)
        self.value = fused[:, (HQ + HKV) * D:].view(t, HKV, D)

    def meta(self, host_lists: bool = False) -> AttentionMetadata:
        host = (self.qsl.tolist(), self.seq_lens.tolist()) if host_lists else (None, None)
        return AttentionMetadata(self.slot_mapping, self.qsl, self.seq_lens, self.block_tables, self.max_q,
                                 self.max_s, self.num_decodes, self.num_decodes, *host)

    def triton_by_sequence(self, out):
        """Single-sequence cases: the prefill kernel on a contiguous copy of the context (gather included)."""
        from pagedserve.attention.sdpa_prefill import gather_context
        context = gather_context(self.k_cache, self.v_cache, self.block_tables[0], self.context_lens[0]) \
            if self.context_lens[0] else None
        return prefill_attention(self.query, self.key, self.value, self.k_cache, self.v_cache, self.block_tables,
                                 self.seq_lens, self.qsl, self.scale, out, 0, 1, self.query_lens[0], context=context)

    def sdpa_by_sequence(self, out):
        """Single-sequence cases: torch's cuDNN attention (new part + gathered context, LSE merge)."""
        return sdpa_prefill_sequence(self.query, self.key, self.value, self.k_cache, self.v_cache,
                                     self.block_tables[0], 0, self.query_lens[0], self.context_lens[0], self.scale, out)

    def paged(self, out=None, num_splits=None):
        return paged_attention(self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.qsl,
                               self.scale, self.max_q, self.max_s, num_decodes=self.num_decodes, out=out,
                               num_splits=num_splits)

    def prefill(self, out, tiles=None, from_cache=False):
        key, value = (None, None) if from_cache else (self.key, self.value)
        return prefill_attention(self.query, key, value, self.k_cache, self.v_cache, self.block_tables,
                                 self.seq_lens, self.qsl, self.scale, out, self.num_decodes, len(self.query_lens),
                                 self.num_tokens - self.num_decodes, tiles=tiles)

    def reference_fp32(self):
        return paged_attention_ref(self.query.float(), self.k_cache.float(), self.v_cache.float(),
                                   self.block_tables, self.seq_lens, self.qsl, self.scale, self.num_decodes)


# ---------------------------------------------------------------------------------------- check
def stage_check() -> bool:
    ok = True
    cases = ([1, 1, 40, 7, 90], [30, 3, 17, 50, 0]) if SMOKE else \
        ([1, 1, 1, 300, 1000, 37, 2048, 513], [500, 20, 4000, 0, 3000, 100, 1500, 129])
    backend = TritonBackend()
    backend.prefill_min_query_len = 32 if SMOKE else 256
    backend.sdpa_min_query_len = 40 if SMOKE else 512  # the 513/1000/2048 chunks through cuDNN
    if SMOKE:
        backend._sdpa_available = lambda device, dtype, head_dim: True  # math stand-in on CPU
    for dtype in ([torch.float32] if SMOKE else [torch.bfloat16, torch.float32]):
        b = Paged(cases[0], cases[1], dtype, seed=1)
        b.as_fused_qkv_views()
        ref = b.reference_fp32()
        got_backend = backend.attend(b.query, b.key, b.value, b.k_cache, b.v_cache, b.meta(), b.scale)
        got_sdpa = backend.attend(b.query, b.key, b.value, b.k_cache, b.v_cache, b.meta(host_lists=True), b.scale)
        backend.long_chunk_path = "triton"
        got_gathered = backend.attend(b.query, b.key, b.value, b.k_cache, b.v_cache, b.meta(host_lists=True),
                                      b.scale)
        backend.long_chunk_path = "cudnn"
        got_paged = b.paged()
        tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
        errs = {name: float((got.float() - ref).abs().max())
                for name, got in (("backend_prefill_kernel", got_backend), ("backend_sdpa_by_sequence", got_sdpa),
                                  ("backend_triton_by_sequence", got_gathered), ("paged_kernel", got_paged))}
        passed = {name: e <= tol and math.isfinite(e) for name, e in errs.items()}
        emit(stage="check", dtype=str(dtype), max_abs_err=errs, tol=tol, passed=passed,
             sdpa_path_still_on=TritonBackend.use_sdpa)
        if not passed["backend_sdpa_by_sequence"]:  # measure the rest without it rather than stop
            print("SDPA-BY-SEQUENCE PATH WRONG: turned off for the rest of the run", flush=True)
            TritonBackend.use_sdpa = False
        ok &= passed["backend_prefill_kernel"] and passed["paged_kernel"] and passed["backend_triton_by_sequence"]
    # fresh long prompt, bf16: the prefill kernel against the paged kernel (both bf16)
    n = 300 if SMOKE else 16384
    b = Paged([n], [0], torch.float32 if SMOKE else torch.bfloat16, seed=2)
    paged = b.paged().float()
    for from_cache in (False, True):
        diff = float((b.prefill(torch.empty_like(b.query), from_cache=from_cache).float() - paged).abs().max())
        emit(stage="check", case=f"fresh{n}", kv_from_cache=from_cache, prefill_vs_paged_max_abs=diff,
             passed=diff <= 3e-2)
        ok &= diff <= 3e-2
    return ok
