"""The C++ GGUF kernels (gguf_cpu*.cpp) against the dequantize-then-fp32 reference, every type:
GEMV within fp32 rounding (relative to sum |x| |w|), the fused RMSNorm / SiLU-and-mul
prologues against the torch ops, dequantize (fp32 within one rounding, bf16 = RNE of it); the
Q8-activation GEMV (Q4_0, Q4_1, Q8_0) bit for bit against a torch reference of its arithmetic."""
import os
import shutil

import pytest
import torch

from pagedserve.layers.quantization import gguf_cpu
from pagedserve.layers.quantization.gguf_kernels import FORMATS, dequantize
from tests.unit.test_gguf_kernels import random_blocks

pytest.importorskip("gguf")
if gguf_cpu.extension() is None:
    pytest.skip("no C++ compiler for the GGUF CPU kernels", allow_module_level=True)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
def test_gemv_matches_dequantized_fp32(fmt, rows):
    raw = torch.from_numpy(random_blocks(fmt, 96, 512, seed=1))
    w = dequantize(raw, fmt).double()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    out = gguf_cpu.gemv(x, raw, fmt)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    bound = x.double().abs() @ w.abs().t()
    assert ((out.double() - x.double() @ w.t()).abs() / bound).max() < 1e-6


def q8_reference(x: torch.Tensor, raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """The Q8-activation GEMV's arithmetic (gguf_cpu_q8.cpp) in torch: x [M, K] in blocks of 32,
    qx = round_half_even(x * (127 / amax)), dx = amax / 127, sx = dx * sum(qx); per block the
    8 lanes of 4-product integer sums, acc[b % 2] = fma(dw * dx, lanes, acc[b % 2]), Q4_1's
    mins[b % 2] = fma(mw, sx, mins[b % 2]); hsum ((0+4)+(2+6)) + ((1+5)+(3+7)), + the mins."""
    M, K = x.shape
    N, nb, _ = raw.shape
    xb = x.view(M, nb, 32)
    amax = xb.abs().amax(-1)
    qx = torch.round(xb * torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))[..., None])
    dx = amax / 127.0
    sx = dx * qx.sum(-1)
    half = lambda at: raw[..., at:at + 2].contiguous().view(torch.float16).float().squeeze(-1)  # noqa: E731
    if fmt == "Q8_0":
        qw = raw[..., 2:34].contiguous().view(torch.int8).int()
    else:
        qs = raw[..., 4 if fmt == "Q4_1" else 2:][..., :16].int()
        qw = torch.cat([qs & 15, qs >> 4], -1) - (8 if fmt == "Q4_0" else 0)
    lanes = (qw[None] * qx.int()[:, None]).view(M, N, nb, 8, 4).sum(-1).float()   # exact
    dd = half(0)[None] * dx[:, None]
    acc, mins = torch.zeros(2, M, N, 8), torch.zeros(2, M, N)
    fma = lambda a, b, c: (a.double() * b.double() + c.double()).float()  # noqa: E731  (one rounding)
    for b in range(nb):
        acc[b % 2] = fma(dd[..., b, None], lanes[..., b, :], acc[b % 2])
        if fmt == "Q4_1":
            mins[b % 2] = fma(half(2)[None, :, b], sx[:, None, b], mins[b % 2])
    a = acc[0] + acc[1]
    r = a[..., 4:] + a[..., :4]
    return ((r[..., 0] + r[..., 2]) + (r[..., 1] + r[..., 3])) + (mins[0] + mins[1])


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 17, 64])
def test_q8_gemv_equals_the_torch_reference(fmt, rows):
    """Q8 activations: bit for bit the torch reference of the same arithmetic (17 blocks a
    row: the odd tail; an all-zero block of x; Q8_0's -128 weights; >= 4 rows: the GEMM's
    tiles, 17 rows: and a GEMV pass for the last row; 95 weight rows: a tile of one weight
    row), and within the quantization's error of the exact product."""
    raw = torch.from_numpy(random_blocks(fmt, 95, 544, seed=rows))
    x = torch.randn(rows, 544, generator=torch.Generator().manual_seed(rows))
    x[0, 32:64] = 0
    out = gguf_cpu.gemv(x, raw, fmt, q8=True)
    assert torch.equal(out, q8_reference(x, raw, fmt))
    exact = x.double() @ dequantize(raw, fmt).double().t()
    assert ((out.double() - exact).abs().max() / exact.abs().max()) < 0.03
    assert not torch.equal(out, gguf_cpu.gemv(x, raw, fmt))   # not the fp32 path


def test_q8_long_rows_take_the_gemv_passes():
    """Rows of more than 64 blocks (K > 2048) are multiplied by the GEMV's passes at any row
    count: still the reference's bits."""
    raw = torch.from_numpy(random_blocks("Q4_1", 40, 2112, seed=5))
    x = torch.randn(9, 2112, generator=torch.Generator().manual_seed(5))
    assert torch.equal(gguf_cpu.gemv(x, raw, "Q4_1", q8=True), q8_reference(x, raw, "Q4_1"))


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_q8_row_does_not_depend_on_the_batch(fmt):
    """A row's Q8 product is the same bits whether it is multiplied alone (GEMV), among a few
    rows or among 64 (GEMM tiles), at any of its positions, with one thread or two."""
    raw = torch.from_numpy(random_blocks(fmt, 200, 576, seed=11))
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(11))
    alone = torch.cat([gguf_cpu.gemv(x[i:i + 1], raw, fmt, q8=True) for i in range(64)])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in (2, 5, 16, 17, 33, 64):
                assert torch.equal(gguf_cpu.gemv(x[:rows], raw, fmt, q8=True), alone[:rows])
                assert torch.equal(gguf_cpu.gemv(x[-rows:], raw, fmt, q8=True), alone[-rows:])
    finally:
        torch.set_num_threads(before)


def test_q8_only_where_the_type_has_it():
    """q8=True on a type without the Q8 path (Q5_1, the K-quants): the fp32 activations' result."""
    raw = torch.from_numpy(random_blocks("Q4_K", 32, 512, seed=9))
    x = torch.randn(2, 512)
    assert torch.equal(gguf_cpu.gemv(x, raw, "Q4_K", q8=True), gguf_cpu.gemv(x, raw, "Q4_K"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize(fmt):
    raw = torch.from_numpy(random_blocks(fmt, 16, 512, seed=2))
    ref = dequantize(raw, fmt)
    assert torch.allclose(gguf_cpu.dequantize(raw, fmt), ref, rtol=1e-6, atol=0)
    assert torch.equal(gguf_cpu.dequantize(raw, fmt, torch.bfloat16), ref.bfloat16())


def test_fused_prologues():
    raw = torch.from_numpy(random_blocks("Q4_1", 64, 256, seed=3))
    w = dequantize(raw, "Q4_1")
    x, res, g = torch.randn(2, 256), torch.randn(2, 256), torch.rand(256) + 0.5
    out, h = gguf_cpu.gemv_normed(x, res, g, 1e-5, raw, "Q4_1")
    ref_h = x + res
    normed = g * (ref_h * torch.rsqrt(ref_h.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(h, ref_h)
    assert torch.allclose(out, normed @ w.t(), rtol=1e-4, atol=1e-4)
    raw_down = torch.from_numpy(random_blocks("Q8_0", 32, 128, seed=4))
    gate_up = torch.randn(3, 256)
    ref = torch.nn.functional.silu(gate_up[:, :128]) * gate_up[:, 128:] @ dequantize(raw_down, "Q8_0").t()
    assert torch.allclose(gguf_cpu.gemv_silu(gate_up, raw_down, "Q8_0"), ref, rtol=1e-4, atol=1e-4)


def test_decode_attention_matches_the_torch_path():
    """Rotary, KV store and paged attention of an all-decode step against RotaryEmbedding,
    store_kv_ref and paged_attention_ref (GQA, scattered blocks, one padded slot)."""
    from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref
    from pagedserve.layers.rotary import RotaryEmbedding
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, block, blocks = 6, 2, 64, 16, 12
    seq_lens = torch.tensor([1, 37, 16, 20], dtype=torch.int32)
    tables = torch.randperm(blocks, generator=gen)[:12].view(4, 3).int()
    slots = torch.stack([tables[s, (n - 1) // block] * block + (n - 1) % block for s, n in enumerate(seq_lens)]).long()
    slots[3] = -1   # padding: not stored (its context is what the cache holds)
    positions = (seq_lens - 1).long()
    rope = RotaryEmbedding(d, 256, 10000.0)
    qkv = torch.randn(4, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (t.view(4, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))   # strided views, as the model's
    k_cache = torch.randn(blocks, block, hkv, d, generator=gen)
    v_cache = torch.randn(blocks, block, hkv, d, generator=gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    rq, rk = rope(positions, q, k)
    store_kv_ref(rk, v, ref_k, ref_v, slots)
    ref = paged_attention_ref(rq, ref_k, ref_v, tables, seq_lens, torch.arange(5, dtype=torch.int32), d ** -0.5)
    out = gguf_cpu.decode_attention(q, k, v, k_cache, v_cache, tables, seq_lens, slots, positions, rope.cos_cache,
                                    rope.sin_cache, d ** -0.5)
    assert torch.allclose(k_cache, ref_k, rtol=1e-6, atol=1e-6) and torch.equal(v_cache, ref_v)
    assert torch.allclose(out, ref.reshape(4, hq * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads, q8, seqs", [(1, True, 3), (2, True, 3), (1, False, 3), (2, True, 21)])
def test_decode_stack_equals_the_modules(monkeypatch, threads, q8, seqs):
    """gguf_cpu.decode_stack (one C++ call for all decoder layers of an all-decode step, one
    team of threads) against the same layers run module by module, on the default model, at
    one and two threads, with Q8 activations (the default) and fp32 ones, 3 sequences (the
    GEMV) and 21 (Q8: the GEMM's tiles and a GEMV pass): bit-identical logprobs."""
    import pagedserve.models.llama as llama
    from pagedserve import LLM, SamplingParams
    monkeypatch.setenv("PAGEDSERVE_GGUF_Q8_ACT", "1" if q8 else "0")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        llm = LLM(max_model_len=256, num_kv_blocks=64, max_num_seqs=max(4, seqs), enable_prefix_caching=False)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
        prompts = (["The capital of France is", "def fibonacci(n):", "Once upon a time"] * 7)[:seqs]
        fused, calls, flags = llama.cpu_decode_stack, [], set()

        def counted(*args):
            out = fused(*args)
            calls.append(out is not None)
            flags.add(args[0][0].mlp.down_proj.gguf_q8)
            return out

        def run():
            return [[(t, {k: v.logprob for k, v in lp.items()}) for t, lp in zip(o.outputs[0].token_ids,
                                                                                  o.outputs[0].logprobs)]
                    for o in llm.generate(prompts, params, use_tqdm=False)]
        monkeypatch.setattr(llama, "cpu_decode_stack", counted)
        fast = run()
        monkeypatch.setattr(llama, "cpu_decode_stack", lambda *args: None)
        slow = run()
    finally:
        torch.set_num_threads(before)
    assert sum(calls) >= 11 and flags == {q8}   # every decode step, with the setting asked for
    assert fast == slow


def test_q8_default_model_agrees_with_fp32():
    """The default model on the Q8-activation GEMV against the exact fp32 path (dtype=float32),
    one prompt at a time (1-row decode), greedy: rounding differs, so ids may part after a
    while, but every prompt's first tokens and most tokens agree (40 prompts x 32 tokens:
    66.5% equal, perplexity +0.24%; benchmarks/RESULTS.md). Garbage from a wrong dot fails."""
    from pagedserve import LLM, SamplingParams
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
    ids = {}
    for dtype in ("auto", "float32"):
        llm = LLM(max_model_len=256, num_kv_blocks=64, max_num_seqs=1, dtype=dtype)
        ids[dtype] = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        del llm
    pairs = list(zip(ids["auto"], ids["float32"]))
    assert all(q8[:2] == ref[:2] for q8, ref in pairs), pairs
    assert sum(a == b for q8, ref in pairs for a, b in zip(q8, ref)) >= 0.5 * 12 * len(prompts), pairs


def test_a_recorded_build_imports_without_cpp_extension(tmp_path, monkeypatch) -> None:
    """_load() records where cpp_extension put the build; the next process imports that file
    straight (torch.utils.cpp_extension, setuptools never imported); a missing record or a
    build gone from its path gives None (then cpp_extension builds again)."""
    import subprocess
    import sys
    name = f"pagedserve_gguf_cpu_{gguf_cpu._source_digest()}"
    monkeypatch.setattr(gguf_cpu, "_built_record", lambda n: str(tmp_path / f"{n}.path"))
    assert gguf_cpu._import_built(name) is None
    gguf_cpu._record_built(name, gguf_cpu.extension().__file__)
    module = gguf_cpu._import_built(name)
    assert module is not None and module.__file__ == gguf_cpu.extension().__file__ and hasattr(module, "gemv")
    gguf_cpu._record_built(name, str(tmp_path / "gone.so"))
    assert gguf_cpu._import_built(name) is None
    monkeypatch.undo()
    code = ("import sys; from pagedserve.layers.quantization import gguf_cpu; m = gguf_cpu.extension(); "
            "print(m is not None, 'torch.utils.cpp_extension' in sys.modules, 'setuptools' in sys.modules)")
    for _ in range(2):   # the first may build and record; the second must take the record
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600).stdout
    assert out.split() == ["True", "False", "False"]


def test_build_name_hashes_every_source(tmp_path, monkeypatch):
    """The extension's cache name hashes every C++ file of it (the sources compiled, the headers
    they include): editing any one of them builds a new extension instead of loading the old."""
    folder = os.path.dirname(gguf_cpu.__file__)
    on_disk = {name for name in os.listdir(folder) if name.startswith("gguf_cpu") and name.endswith((".cpp", ".h"))}
    assert {os.path.basename(p) for p in gguf_cpu._SOURCES} == {n for n in on_disk if n.endswith(".cpp")}
    assert {os.path.basename(p) for p in gguf_cpu._HEADERS} == {n for n in on_disk if n.endswith(".h")}
    for name in on_disk:
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    monkeypatch.setattr(gguf_cpu, "_SOURCES", [str(tmp_path / os.path.basename(p)) for p in gguf_cpu._SOURCES])
    monkeypatch.setattr(gguf_cpu, "_HEADERS", [str(tmp_path / os.path.basename(p)) for p in gguf_cpu._HEADERS])
    digests = {gguf_cpu._source_digest()}
    for name in sorted(on_disk):
        with open(tmp_path / name, "a") as f:
            f.write("\n")
        digests.add(gguf_cpu._source_digest())
    assert len(digests) == len(on_disk) + 1
