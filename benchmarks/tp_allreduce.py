"""The all-reduce check of benchmarks/tp_gpu.py (`tp_gpu.py allreduce [RANKS]`): the engine's custom
all-reduces (layers/custom_all_reduce.py) against NCCL on RANKS GPUs of this machine, sums and
in-graph latencies. Needs CUDA; under DRY=1 it only says so."""
import os

from tp_profile import emit

DRY = os.environ.get("DRY") == "1"


def _allreduce_rank(rank: int, world: int, port: int) -> None:
    """Each custom all-reduce (torch's one-shot, the push kernel) against NCCL: exact sums of
    bf16/fp32 up to 1024 rows, a misaligned view, a chain of 8 in a CUDA graph replayed on new
    data, then in-graph latency per all-reduce (64 in one graph, as a decode step's 65). More
    than two ranks: the one-shot op only (push is for two), and since NCCL's ring adds in
    another order, `exact` may be False by rounding: what must hold is the same bits on every
    rank (same_on_every_rank) and a small max |diff|."""
    import torch
    import torch.distributed as dist
    from pagedserve.layers.custom_all_reduce import init_symm_mem_all_reduce
    torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    reducers = {}
    for kind, name in (("one_shot", "custom"), ("push", "push"))[:1 if world > 2 else 2]:
        # larger than the engine's 1 MiB: find the crossover
        reducers[name] = init_symm_mem_all_reduce(device, buffer_bytes=16 << 20, kind=kind)
    if rank == 0:
        emit(workload="custom_allreduce_setup", **{name: r is not None for name, r in reducers.items()})
    reducers = {name: r for name, r in reducers.items() if r is not None}
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    stream = torch.cuda.Stream()
    for name, reducer in reducers.items():
        checks, agree = [], []
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 2, 3, 8, 16, 64, 128, 256, 512, 1024):
                numel = rows * 4096
                x = torch.randn(numel, generator=gen, device=device, dtype=torch.float32).to(dtype)
                if not reducer.can_reduce(x):
                    checks.append((str(dtype), rows, "nccl (too big)", 0.0))
                    continue
                ref = x.clone()
                dist.all_reduce(ref)
                got = reducer(x)
                agree.append(_same_on_every_rank(got))
                checks.append((str(dtype), rows, bool(torch.equal(got, ref)),
                               float((got.float() - ref.float()).abs().max())))
        # a misaligned input (a view one element in)
        x = torch.randn(16 * 4096 + 8, generator=gen, device=device).to(torch.bfloat16)[1:1 + 16 * 4096]
        ref = x.clone()
        dist.all_reduce(ref)
        checks.append(("misaligned bf16", 16, bool(torch.equal(reducer(x), ref)), 0.0))
        # inside a CUDA graph: a chain of 8 all-reduces (each the next one's input), replayed on new data
        x = torch.zeros(16 * 4096, device=device, dtype=torch.bfloat16)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            y = x
            for _ in range(8):
                y = reducer(y) * 0.5
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y = x
                for _ in range(8):
                    y = reducer(y) * 0.5
        torch.cuda.current_stream().wait_stream(stream)
        ok_graph = True
        for trial in range(3):
            x.copy_(torch.randn(x.numel(), generator=gen, device=device).to(torch.bfloat16))
            ref = x.clone()
            for _ in range(8):
                dist.all_reduce(ref)
                ref = ref * 0.5
            graph.replay()
            torch.cuda.synchronize()
            ok_graph &= bool(torch.equal(y, ref))
            agree.append(_same_on_every_rank(y))
        errors = int(reducer.error.sum()) if hasattr(reducer, "error") else 0
        if rank == 0:
            bad = [c for c in checks if c[2] is False]
            emit(workload="custom_allreduce_check", reducer=name, ranks=world,
                 exact=all(c[2] is not False for c in checks), in_graph_exact=ok_graph,
                 same_on_every_rank=all(agree), max_abs_diff=max(c[3] for c in checks), spin_timeouts=errors,
                 checks=checks, mismatches=bad)
    # latency: 64 all-reduces captured in one graph (a decode step of llama-8b has 65)
    lat = {}
    for rows in (1, 16, 64, 128, 256, 512, 1024, 2048):
        t = torch.randn(rows * 4096, generator=gen, device=device).to(torch.bfloat16)
        for name in ("nccl", *reducers):
            if name != "nccl" and not reducers[name].can_reduce(t):
                continue

            def chain():
                out = t
                for _ in range(64):
                    if name == "nccl":
                        dist.all_reduce(out)   # in place, as RowParallelLinear's fallback
                    else:
                        out = reducers[name](out)
                return out
            with torch.cuda.stream(stream):
                chain()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    chain()
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            lat[f"{name}_{rows}rows_us"] = round(start.elapsed_time(end) * 1e3 / 640, 2)
    if rank == 0:
        emit(workload="allreduce_latency_in_graph", **lat)
    dist.barrier()
    dist.destroy_process_group()


def _same_on_every_rank(tensor):
    """Whether every rank holds the same bits in `tensor` (collective)."""
    import torch
    import torch.distributed as dist
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return all(torch.equal(part, parts[0]) for part in parts)


def check_allreduce(world: int = 2) -> None:
    if DRY:
        emit(workload="custom_allreduce_check", ranks=world, skipped=f"DRY: needs {world} GPUs")
        return
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_allreduce_rank, args=(world, port), nprocs=world)
