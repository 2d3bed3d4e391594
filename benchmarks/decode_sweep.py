"""decode_gpu.py's sweep stage: the M = 1 matmuls of llama-1b / llama-8b, cuBLAS against the
Triton gemv over a grid of launch shapes, each launch checked first; fills SWEPT (variant "swept")."""
from __future__ import annotations

import inspect

from decode_common import RESULTS, SMOKE, log, stage, time_us, weight_shapes
import torch

from pagedserve.layers.triton_gemv import GemvConfig, config_for, gemv, silu_and_mul_gemv


ROLES: list[str] = []   # --roles: the sweep's matmuls (all when empty), over QUICK_CONFIGS
# launch shapes around the current ones, and the narrow slabs (more programs) and whole-K slices
# (every load of a program issued at once) that the small-N matmuls (qkv, o) may want
QUICK_CONFIGS = [GemvConfig(*c) for c in (
    (8, 512, 4, 4), (16, 256, 4, 4), (8, 1024, 4, 4), (16, 512, 4, 4), (4, 1024, 4, 4), (4, 2048, 4, 2),
    (2, 2048, 4, 2), (4, 512, 4, 4), (8, 2048, 4, 2), (8, 512, 8, 4), (8, 256, 4, 4), (4, 1024, 2, 4),
    (8, 512, 2, 4), (16, 1024, 4, 4), (8, 1024, 4, 2))]


def sweep_configs(n: int, k: int) -> list[GemvConfig]:
    """M = 1 launch shapes (the FMA variant: block_n may be below 16) for weight [n, k]: tiles
    around the table's, narrower ones for the narrow matmuls. (Split K, summed in the same
    launch by each tile's last program, lost on all ten llama shapes by 0.8-6.1 us a call:
    benchmarks/RESULTS.md, session 9.)"""
    if SMOKE:
        return [GemvConfig(16, 64, 4, 2), GemvConfig(8, 64, 4, 2), GemvConfig(8, 32, 4, 2)]
    if ROLES:   # and wider slabs: fewer programs to normalise the row in a chained prologue
        return QUICK_CONFIGS + [GemvConfig(*c) for c in ((16, 256, 4, 3), (16, 128, 4, 4), (32, 128, 4, 4),
                                                         (32, 256, 4, 3), (16, 512, 8, 4), (32, 256, 8, 4))]
    tiles = ((4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))
    tiles += () if n >= 16384 else ((2, 1024), (4, 256))   # narrower slabs: more programs
    return [GemvConfig(bn, bk, w, st) for bn, bk in tiles for w, st in ((4, 4), (4, 3), (8, 4)) if bk <= k]


SWEPT: dict[tuple[int, int], GemvConfig] = {}   # the sweep's best launch per weight shape (variant "swept")


def check_launches(run, x: torch.Tensor, weights: list, refs: list, cfg: GemvConfig) -> str | None:
    """None if `run(x, w, cfg)` is within bf16 rounding of the fp32 reference (refs) on each weight,
    launched back to back over all of them twice (a launch reading state another left would
    show another weight's values), and the same bits both times; else what failed."""
    outs = [[run(x, w, cfg) for w in weights] for _ in range(2)]
    for i, ref in enumerate(refs):
        err = (outs[0][i].float() - ref).abs()
        bad = (err > ref.abs() * 2.0 ** -7 + 1e-3 * ref.abs().max()).sum().item()
        if bad:
            return f"weight {i}: {bad} outputs off (max err {err.max().item():.3g})"
        if not torch.equal(outs[0][i], outs[1][i]):
            return f"weight {i}: two launches differ"
    return None


@stage("sweep")
def sweep(dev: torch.device, dtype: torch.dtype, models: list[str]) -> None:
    """Every launch shape of sweep_configs, compiled ahead in parallel, checked (check_launches;
    as the model runs them: at TP=1 qkv / gate_up with the norm chain's RMSNorm prologue, gate_up with
    its SiLU-and-mul epilogue and down plain; sharded, down with its SiLU-and-mul prologue; each fused
    launch also bit for bit its unfused kernels and the same launch), then timed on weights cycled past the L2 in CUDA graphs;
    the same bits again after the timing. Fills SWEPT."""
    from pagedserve.layers import triton_ops
    from pagedserve.worker.compile_ahead import compile_ahead
    rows, best = [], {}
    failed: list[str] = []
    for model in (["tiny"] if SMOKE else models):
        name, _, tp = model.partition("-tp")   # MODEL-tpN: one rank's shards under tensor parallelism
        for role, (n, k) in weight_shapes(name, int(tp or 1)).items():
            if ROLES and role not in ROLES:
                continue
            configs = sweep_configs(n, k)
            nbytes = n * k * 2
            copies = 1 if SMOKE else max(3, -(-600 * 2**20 // nbytes))
            weights = [(torch.randn(n, k, device=dev) * 0.02).to(dtype) for _ in range(copies)]
            # as the model runs them: at TP=1 the norm chain (qkv / gate_up normalise in their prologue,
            # gate_up's epilogue takes silu(gate) * up, down reads that: a plain gemv); sharded, down
            # takes SiLU-and-mul in its prologue
            from pagedserve.layers import triton_gemv as tg   # an older tree's (ab_gpu.sh): down with the prologue
            chained = not tp and "silu_out" in inspect.signature(tg.rms_norm_gemv).parameters
            silu_in = role == "down" and not chained
            x = torch.randn(1, 2 * k if silu_in else k, device=dev).to(dtype)
            act = triton_ops.silu_and_mul(x) if silu_in else x
            run = silu_and_mul_gemv if silu_in else gemv
            epilogue = None   # what the launch applies to the gemv's output (checked bit for bit)
            if role in ("qkv", "gate_up") and not tp:   # the norm chain's prologue, as a TP=1 model runs it
                from pagedserve.layers.triton_gemv import rms_norm_gemv   # (here: ab_gpu.sh runs older trees)
                norm_w = (1 + 0.1 * torch.randn(k, device=dev)).to(dtype)
                sum_sq = x.double().square().sum().reshape(1)
                act = triton_ops.rms_norm(x, norm_w, 1e-5)
                silu_out = role == "gate_up" and chained
                epilogue = triton_ops.silu_and_mul if silu_out else None
                run = lambda x_, w, c, nw=norm_w, s=sum_sq, so=silu_out: (  # noqa: E731
                    rms_norm_gemv(x_, nw, 1e-5, s, w, c, silu_out=True) if so else rms_norm_gemv(x_, nw, 1e-5, s, w, c))
            refs = [act.float() @ w.float().T for w in weights[:3]]
            if epilogue is not None:
                refs = [epilogue(r.to(dtype)).float() for r in refs]
            if not SMOKE:
                try:
                    compile_ahead(lambda w0=weights[0]: [run(x, w0, c) for c in configs])
                except Exception as exc:   # each launch then compiles (or fails) on its own
                    log(f"  compile_ahead: {type(exc).__name__}: {str(exc)[:200]}")
            cublas = time_us(lambda w: torch.nn.functional.linear(act, w), [(w,) for w in weights])
            timed = []
            for cfg in configs:
                try:
                    why = check_launches(run, x, weights[:3], refs, cfg)
                    if why is None and run is not gemv:
                        unfused = gemv(act, weights[0], cfg)
                        if not torch.equal(run(x, weights[0], cfg), unfused if epilogue is None else epilogue(unfused)):
                            why = "the fused launch differs from its kernels (SiLU-and-mul / RMSNorm) and the gemv"
                    if why is None:
                        first = run(x, weights[0], cfg)
                        us = time_us(lambda w, c=cfg: run(x, w, c), [(w,) for w in weights])
                        if not torch.equal(run(x, weights[0], cfg), first):
                            why = "bits differ after the timed graph replays"
                    if why is not None:
                        failed.append(f"{model}.{role} {cfg}: {why}")
                        log(f"  CHECK FAILED {failed[-1]}")
                        continue
                    timed.append((us, cfg))
                except Exception as exc:   # e.g. out of shared memory / registers for a big tile
                    log(f"  {model}.{role} {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
            timed.sort(key=lambda t: t[0])
            cur = config_for(1, n, k)
            cur_us = time_us(lambda w: run(x, w, cur), [(w,) for w in weights])
            row = dict(shape=f"{model}.{role}", n=n, k=k, mbytes=round(nbytes / 2**20, 1),
                       cublas_us=round(cublas, 2), cublas_tb_s=round(nbytes / cublas / 1e6, 2),
                       current_us=round(cur_us, 2), current_tb_s=round(nbytes / cur_us / 1e6, 2),
                       best_us=round(timed[0][0], 2), best_tb_s=round(nbytes / timed[0][0] / 1e6, 2),
                       best=timed[0][1].__dict__,
                       top5=[(round(t, 2), c.__dict__) for t, c in timed[:5]], configs=len(configs),
                       all=[(round(t, 2), list(c.__dict__.values())) for t, c in timed])
            best[(n, k)] = (timed[0][1], timed[0][0] < cublas)
            SWEPT[(n, k)] = timed[0][1]
            rows.append(row)
            log(f"{row['shape']:16s} {row['mbytes']:7.1f} MiB  cuBLAS {cublas:8.2f} us ({row['cublas_tb_s']:.2f} TB/s)"
                f"  current {cur_us:8.2f} ({row['current_tb_s']:.2f})  best {timed[0][0]:8.2f} "
                f"({row['best_tb_s']:.2f}) {timed[0][1]}")
            del weights
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    RESULTS["sweep"] = rows
    RESULTS["sweep_check_failed"] = failed
    log(f"CHECK_SUMMARY failed={len(failed)} of {sum(r['configs'] for r in rows)} launches")
    log("CONFIGS = {  # the best launch shape per weight shape; # cuBLAS: where cuBLAS was faster\n" + "\n".join(
        f"    ({n}, {k}): GemvConfig({c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}),"
        + ("" if wins else "  # cuBLAS") for (n, k), (c, wins) in best.items()) + "\n}")
