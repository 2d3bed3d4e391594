"""Decode graphs' inputs in one copy and their own feed and argmax (worker/cuda_graph.py's
DecodeStatics, CudaGraphRunner.stage / take_sampled / greedy_ids, model_runner's
_stage_decode): the byte layout and padding of a staged step, the feed, and the engine end to
end on the CPU with CUDA graphs emulated (each "replay" reruns the captured forward into its
static output, as a graph replays its kernels): the same greedy ids as the eager engine,
through async scheduling's fed tokens, batches that change bucket and order, rows that sample
and rows that ask for logprobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.layers.triton_ops import _feed_tokens_kernel, argmax_rows, feed_tokens
from pagedserve.worker import graph_statics
from pagedserve.worker.cuda_graph import CudaGraphRunner
from pagedserve.worker.graph_statics import DecodeStatics
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import random_prompts
from tests.unit.test_mixed_graphs import fake_cuda_graphs


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # the statics' copies on a GPU too


def step_arrays(n: int, width: int, base: int = 0) -> dict[str, np.ndarray]:
    return dict(input_ids=np.arange(n, dtype=np.int64) + 100 + base, feed=np.full(n, -1, dtype=np.int32),
                positions=np.arange(n, dtype=np.int64) + 7, slot_mapping=np.arange(n, dtype=np.int64) * 4 + 3,
                seq_lens=np.arange(n, dtype=np.int32) + 8,
                block_tables=np.arange(n * width, dtype=np.int32).reshape(n, width) + 1)


def test_layout_is_aligned_and_per_bucket():
    statics = DecodeStatics(8, 5, DEV)
    fields, total = statics.layout(3)
    assert [(name, offset) for name, _, _, offset in fields] == [
        ("input_ids", 0), ("feed", 32), ("positions", 48), ("slot_mapping", 80), ("seq_lens", 112),
        ("cascade_len", 128), ("cascade_rows", 144), ("cascade_groups", 160), ("block_tables", 208)]
    assert total == 208 + 64   # 9 group bounds: 36 bytes, rounded to 48; 3 x 5 int32 = 60 bytes, rounded to 16
    assert statics.views(3)["cascade_groups"].shape == (9,)   # CASCADE_MAX_GROUPS + 1 bounds, whatever the rows
    assert statics.buffer.numel() == statics.layout(8)[1]
    one, three = statics.views(1), statics.views(3)
    # every bucket's input ids start at byte 0: one prefix of the buffer
    assert one["input_ids"].data_ptr() == three["input_ids"].data_ptr() == statics.buffer.data_ptr()
    assert three["block_tables"].shape == (3, 5) and three["block_tables"].is_contiguous()
    assert statics.views(3)["feed"] is three["feed"]   # views are made once a bucket


def test_stage_writes_the_rows_and_pads_the_bucket():
    statics = DecodeStatics(8, 5, DEV)
    statics.buffer.fill_(0x7F)   # stale bytes everywhere
    v = statics.stage(4, step_arrays(3, 2))
    assert v["input_ids"].tolist() == [100, 101, 102, 0]
    assert v["feed"].tolist() == [-1, -1, -1, -1]
    assert v["positions"].tolist() == [7, 8, 9, 0]
    assert v["slot_mapping"].tolist() == [3, 7, 11, -1]       # padding: no KV write
    assert v["seq_lens"].tolist() == [8, 9, 10, 1]
    assert v["block_tables"].tolist() == [[1, 2, 0, 0, 0], [3, 4, 0, 0, 0], [5, 6, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert v["cascade_len"].tolist() == [0] * 4 and v["cascade_groups"].tolist() == [0] * 9   # none: 0 over stale
    v = statics.stage(4, {**step_arrays(3, 2), "cascade_len": np.array([0, 272, 272], dtype=np.int32),
                          "cascade_rows": np.array([1, 2], dtype=np.int32),
                          "cascade_groups": np.array([0] + [2] * 8, dtype=np.int32)})
    assert v["cascade_len"].tolist() == [0, 272, 272, 0] and v["cascade_rows"].tolist() == [1, 2, 0, 0]
    assert v["cascade_groups"].tolist() == [0] + [2] * 8
    assert v["seq_lens"].tolist() == [8, 9, 10, 1]


def test_stage_of_a_wide_table_copies_its_corner(monkeypatch):
    """Past ONE_COPY_TABLE_BYTES the bucket's table rows are not sent whole: the [n, w] corner is a
    second copy and the rest keeps what it held."""
    monkeypatch.setattr(graph_statics, "ONE_COPY_TABLE_BYTES", 16)
    statics = DecodeStatics(8, 5, DEV)
    statics.views(4)["block_tables"].fill_(9)
    v = statics.stage(4, step_arrays(3, 2))
    assert v["block_tables"].tolist() == [[1, 2, 9, 9, 9], [3, 4, 9, 9, 9], [5, 6, 9, 9, 9], [9, 9, 9, 9, 9]]
    assert v["seq_lens"].tolist() == [8, 9, 10, 1] and v["slot_mapping"].tolist() == [3, 7, 11, -1]


def test_feed_tokens_torch_and_triton():
    ids = torch.tensor([5, 6, 7, 8], dtype=torch.int64)
    feed = torch.tensor([2, -1, 0, -1], dtype=torch.int32)
    sampled = torch.tensor([40, 41, 42], dtype=torch.int64)
    feed_tokens(ids, feed, sampled)
    assert ids.tolist() == [42, 6, 40, 8]
    # the kernel itself (on the CPU Triton's interpreter), two programs, the second one partial
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor([5, 6, 7, 8, 9], dtype=torch.int64, device=dev)
    _feed_tokens_kernel[(2,)](ids, torch.tensor([1, -1, -1, 0, 1], dtype=torch.int32, device=dev), sampled.to(dev), 5,
                              BLOCK=4)
    assert ids.tolist() == [41, 6, 7, 40, 41]
    if dev == "cuda":   # the wrapper's launch
        ids = torch.arange(300, dtype=torch.int64, device=dev)
        feed = torch.full((300,), -1, dtype=torch.int32, device=dev)
        feed[::7] = 2
        feed_tokens(ids, feed, sampled.to(dev))
        expected = torch.arange(300)
        expected[::7] = 42
        assert ids.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="feed int32"):
        feed_tokens(ids, feed.long(), sampled)


def test_argmax_rows_into_out():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0], [float("nan"), 0.0, 5.0, 2.0]], device=dev)
    out = torch.full((2,), -7, dtype=torch.int64, device=dev)
    assert argmax_rows(x, out=out) is out and out.tolist() == [1, 0]
    with pytest.raises(ValueError, match="out must be int64"):
        argmax_rows(x, out=torch.zeros(3, dtype=torch.int64, device=dev))


class ReplayingGraph:
    """A CUDA graph emulated on the CPU: a replay reruns the captured forward and copies its
    output into the static output the capture returned (what the kernels would overwrite)."""

    def __init__(self, forward, size, out) -> None:
        self.forward, self.size, self.out = forward, size, out

    def replay(self) -> None:
        out = self.forward(self.size)
        if isinstance(out, tuple):
            for static, new in zip(self.out, out):
                static.copy_(new)
        elif out is not None:
            self.out.copy_(out)


def emulate_graphs(monkeypatch) -> list[int]:
    """ModelRunner.finish_setup captures replaying graphs on the CPU (decode and prefill; no
    mixed pieces). Returns a list the decode replays' row counts are appended to."""
    fake_cuda_graphs(monkeypatch)
    replays: list[int] = []

    def capture_one(self, forward, size, stream, warm_up=True):
        out = forward(size)
        graph = ReplayingGraph(forward, size, out)
        if forward == self._forward:
            replay = graph.replay
            graph.replay = lambda: (replays.append(size), replay())
        return graph, out

    def finish_setup(self) -> None:
        graphs = self.make_graph_runner()
        graphs.capture()
        self.graph_runner = graphs
    monkeypatch.setattr(CudaGraphRunner, "_capture_one", capture_one)
    monkeypatch.setattr(ModelRunner, "finish_setup", finish_setup)
    monkeypatch.setenv("PAGEDSERVE_MIXED_GRAPHS", "0")
    return replays


def _generate(path, prompts, params, max_num_seqs=6):
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True,
              async_scheduling=True, block_size=4, num_kv_blocks=200, max_num_seqs=max_num_seqs)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        runner = llm.engine.core.executor.runner
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], runner.graph_runner
    finally:
        llm.shutdown()


def test_engine_with_staged_graphs_gives_the_eager_ids(tiny_checkpoints, monkeypatch):
    tiny_llama = tiny_checkpoints["llama"]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(9, 512, 3, 30, seed=11)]
    # different lengths: rows finish at different steps, the batch shrinks through the buckets and
    # its order changes; one row samples (seeded), one asks for logprobs: the graph's argmax is
    # not taken for those steps, the sampler reads the graph's logits
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(9)]
    params[3] = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    params[5] = SamplingParams(temperature=0.0, logprobs=2, max_tokens=9, ignore_eos=True)
    eager, none = _generate(tiny_llama, prompts, params)
    assert none is None
    replays = emulate_graphs(monkeypatch)
    staged, graphs = _generate(tiny_llama, prompts, params)
    assert graphs is not None and graphs.argmax_buckets == {b for b in graphs.buckets if b <= 32}
    assert len(replays) > 20 and len(set(replays)) >= 3   # decode steps replayed several buckets
    assert [ids for ids, _ in staged] == [ids for ids, _ in eager]
    lp_staged, lp_eager = staged[5][1], eager[5][1]
    assert len(lp_staged) == 9 and [sorted(d) for d in lp_staged] == [sorted(d) for d in lp_eager]


def test_shared_prefix_steps_replay_the_cascade_graphs(tiny_checkpoints, monkeypatch):
    """Rows that share a cached prompt prefix: their decode steps are staged with each row's
    shared keys and the group's rows, and replay the bucket's cascade graph (whose attention
    takes them: attention/triton_cascade.py, CUDA; the CPU's backend reads every key as before,
    so the ids are the eager engine's); a step without a shared prefix replays the plain graph.
    Thresholds lowered to this test's 6 rows and 24 shared keys."""
    from pagedserve.attention import cascade_plan
    tiny_llama = tiny_checkpoints["llama"]
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_ROWS", 4)
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_KEYS", 8)
    prefix = random_prompts(1, 512, 24, 24, seed=3)[0]
    suffixes = random_prompts(6, 512, 3, 6, seed=4)
    warm = [{"prompt_token_ids": prefix + [7]}]   # the prefix's 6 blocks cached before the batch arrives
    prompts = [{"prompt_token_ids": prefix + s} for s in suffixes]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True) for i in range(6)]

    def generate():
        llm = LLM(model=tiny_llama, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True,
                  async_scheduling=True, block_size=4, num_kv_blocks=200, max_num_seqs=8)
        try:
            llm.generate(warm, [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)], use_tqdm=False)
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    eager = generate()
    emulate_graphs(monkeypatch)
    monkeypatch.setattr(ModelRunner, "cascade", property(lambda self: True))
    seen, run = [], CudaGraphRunner.run

    def spy(self, inputs, receive=None):
        bs = next(b for b in self.buckets if b >= len(inputs.rows))
        views = self.decode.views(bs)
        seen.append((len(inputs.rows), inputs.cascade_len, views["cascade_len"].tolist(),
                     (views["cascade_rows"].tolist(), views["cascade_groups"].tolist()), bs in self.cascade_graphs))
        return run(self, inputs, receive)
    monkeypatch.setattr(CudaGraphRunner, "run", spy)
    assert generate() == eager
    cascaded = [s for s in seen if s[1]]
    # every decode step of >= 4 rows shares the 24 prefix keys (the rows' prompts' own blocks differ)
    assert cascaded and all(s[1] == 24 and s[4] for s in cascaded)
    for rows, _, per_row, (members, bounds), _ in cascaded:   # one group: every row, in row order
        assert per_row[:rows] == [24] * rows and set(per_row[rows:]) <= {0}
        assert members[:rows] == list(range(rows)) and bounds == [0] + [rows] * 8
    assert [s[0] for s in seen if not s[1]] and all(s[0] < 4 or not s[4] for s in seen if not s[1])


def test_disable_cascade_attn_turns_the_runner_s_cascade_off(tiny_checkpoints, monkeypatch):
    """disable_cascade_attn (vLLM's flag) reaches the device config, and the runner then looks for no
    shared prefix (ModelRunner.cascade: CUDA only; TritonBackend.cascade is the in-engine A/B switch)."""
    from types import SimpleNamespace

    from pagedserve.attention.backend import TritonBackend
    from pagedserve.config import DeviceConfig
    from pagedserve.engine_args import EngineArgs
    monkeypatch.setattr(TritonBackend, "cascade", True)
    for disable in (False, True):
        config, _, _ = EngineArgs(model=tiny_checkpoints["llama"], device="cpu", skip_tokenizer_init=True,
                                  disable_cascade_attn=disable).create_config()
        assert config.device.cascade_attn is not disable
        for device, want in (("cuda", not disable), ("cpu", False)):
            runner = SimpleNamespace(device=torch.device(device), device_config=config.device)
            assert ModelRunner.cascade.fget(runner) is want
    monkeypatch.setattr(TritonBackend, "cascade", False)
    on = DeviceConfig(cascade_attn=True)
    assert ModelRunner.cascade.fget(SimpleNamespace(device=torch.device("cuda"), device_config=on)) is False
