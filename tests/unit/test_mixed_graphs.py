"""Piecewise graphs of mixed steps (worker/mixed_graphs.py), the parts that need no GPU: the token
buckets, the static buffers, and the split forward run eagerly. `MixedGraphs.forward(size, None,
meta)` runs what a replay runs (the pieces over the padded static inputs, each layer's
attention on the static q/k/v with the step's own metadata), so on the CPU it must give the
eager forward's hidden states and KV cache: decodes and a chunk with cached context in one
step, padded from 3 to 32 tokens. The capture itself is checked on the GPU
(benchmarks/mixed_gpu.py: greedy ids graph vs eager)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from pagedserve.engine_args import EngineArgs
from pagedserve.engine_io import CachedRequestData, NewRequestData, RequestId, SchedulerOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.cuda_graph import CudaGraphRunner
from pagedserve.worker.mixed_graphs import mixed_token_buckets
from pagedserve.worker.graph_statics import MixedStatics
from pagedserve.worker.input_batch import build_step_inputs
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import random_prompts, write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tiny_runner(tmp_path, **engine_args) -> ModelRunner:
    """A ModelRunner of the tiny llama on the CPU, fp32, block size 4, 16 KV blocks."""
    checkpoint = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    config, _, _ = EngineArgs(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, block_size=4,
                              num_kv_blocks=16, skip_tokenizer_init=True, **engine_args).create_config()
    runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                         torch.device("cpu"))
    runner.load_model()
    runner.init_kv_cache(16)
    return runner


def test_mixed_buckets():
    assert mixed_token_buckets(8192) == [32] + list(range(64, 1025, 64)) + list(range(1152, 2049, 128))
    assert len(mixed_token_buckets(8192)) == 25
    assert mixed_token_buckets(200) == [32, 64, 128, 192]
    assert mixed_token_buckets(16) == []


def test_statics_fill_and_views():
    statics = MixedStatics(8)
    q, k = torch.arange(24.).view(3, 4, 2), torch.arange(6.).view(3, 1, 2)
    statics.fill(q, k, -k)
    assert statics.q.shape == (8, 4, 2) and statics.k.shape == (8, 1, 2) and statics.out.shape == (8, 4, 2)
    sq, sk, sv, out = statics.views(2)
    assert torch.equal(sq, q[:2]) and torch.equal(sk, k[:2]) and torch.equal(sv, -k[:2])
    assert out.shape == (2, 4, 2) and out.data_ptr() == statics.out.data_ptr()
    assert torch.equal(statics.q[3:], torch.zeros(5, 4, 2))   # rows past the copy untouched


def test_split_forward_equals_eager(tmp_path):
    runner = tiny_runner(tmp_path)
    a, b = RequestId("a"), RequestId("b")
    prompt_a, prompt_b = random_prompts(2, 512, 7, 7, seed=5)
    prompt_b = prompt_b[:6]
    # step 1 (eager): a's prompt, b's first chunk of 4
    first = runner.execute_model(SchedulerOutput(num_scheduled_tokens={a: 7, b: 4}, total_num_scheduled_tokens=11,
                                                 new_requests=[NewRequestData(a, prompt_a, 7, GREEDY, [5, 2], 0),
                                                               NewRequestData(b, prompt_b, 6, GREEDY, [9, 3], 0)]))
    # step 2, built by hand: a decodes, b's last chunk of 2 (4 tokens of context)
    runner._update_states(SchedulerOutput(num_scheduled_tokens={a: 1, b: 2}, total_num_scheduled_tokens=3,
                                          cached_requests=[CachedRequestData(a, [], 7, None, 8, first.sampled_token_ids[a]),
                                                           CachedRequestData(b, [], 4, None, 6, None)]))
    states = [runner.states[b], runner.states[a]]
    inputs = build_step_inputs(states, [2, 1], 4, torch.device("cpu"), runner.block_table)
    assert inputs.meta.num_decodes == 1 and inputs.input_ids.shape[0] == 3
    before = runner.kv_cache.clone()
    with torch.inference_mode():
        want = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
        want_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        graphs = CudaGraphRunner(runner.model, 4, 64, 4, torch.device("cpu"), 64, mixed=True)
        assert graphs.mixed.buckets == [32, 64] and not graphs.mixed.can_run(inputs)   # nothing captured
        graphs.input_ids.fill_(3)   # stale tokens in the padding rows
        graphs._copy_tokens(inputs, 32)
        assert graphs.slot_mapping[3:32].eq(-1).all() and torch.equal(graphs.input_ids[:3], inputs.input_ids)
        pieces, hidden = graphs.mixed.forward(32, None, inputs.meta)
    assert pieces == [] and hidden.shape[0] == 32
    torch.testing.assert_close(hidden[:3], want, rtol=1e-5, atol=1e-5)
    # the same writes (matmuls over 32 rows instead of 3 may round differently), none for the padding
    torch.testing.assert_close(runner.kv_cache, want_cache, rtol=1e-5, atol=1e-5)
    untouched = (want_cache == before).all(-1)
    assert torch.equal(runner.kv_cache.eq(before).all(-1)[untouched], untouched[untouched])
    assert not untouched.all()
    logits_want = runner.model.compute_logits(want[inputs.logits_indices])
    logits = runner.model.compute_logits(hidden[:3][inputs.logits_indices])
    assert torch.equal(logits.argmax(-1), logits_want.argmax(-1))
    # the layers' backends are restored after the split forward
    assert all(type(layer.backend).__name__ == "TorchBackend" for layer in runner.model.attention_layers())


class FakeGraph:
    """torch.cuda.CUDAGraph's calls, logged (no GPU): what the capture and replay code does in
    which order."""
    log: list[tuple[str, int]] = []

    def capture_begin(self, pool=None, capture_error_mode="global") -> None:
        FakeGraph.log.append(("begin", id(self)))

    def capture_end(self) -> None:
        FakeGraph.log.append(("end", id(self)))

    def replay(self) -> None:
        FakeGraph.log.append(("replay", id(self)))

    def pool(self) -> str:
        return "pool"


class FakeStream:
    def wait_stream(self, other) -> None:
        pass


@contextmanager
def fake_graph_context(graph, pool=None, stream=None):
    graph.capture_begin(pool)
    yield
    graph.capture_end()


def fake_cuda_graphs(monkeypatch) -> None:
    for name, value in (("CUDAGraph", FakeGraph), ("Stream", FakeStream), ("current_stream", FakeStream),
                        ("stream", lambda s: nullcontext()), ("synchronize", lambda: None),
                        ("graph_pool_handle", lambda: "pool"), ("graph", fake_graph_context)):
        monkeypatch.setattr(torch.cuda, name, value)


def test_capture_and_replay_order(tmp_path, monkeypatch):
    """The capture code end to end on the CPU with CUDA's graph calls faked: every mixed
    bucket is one piece more than the layers, captures never nest, the pieces of a step's
    bucket replay in order with the layers' attention between them on the step's metadata,
    and the runner sends a mixed step there (and not with the switch off)."""
    fake_cuda_graphs(monkeypatch)
    runner = tiny_runner(tmp_path, max_num_batched_tokens=64, max_num_seqs=4)
    graphs = CudaGraphRunner(runner.model, 4, 64, 4, torch.device("cpu"), 64, mixed=True)
    FakeGraph.log = []
    graphs.capture()
    num_layers = len(runner.model.attention_layers())
    assert sorted(graphs.mixed.graphs) == [32, 64] and len(graphs.mixed.attention_calls) == num_layers
    assert all(len(pieces) == num_layers + 1 for pieces in graphs.mixed.graphs.values())
    kinds = [kind for kind, _ in FakeGraph.log]
    assert kinds == ["begin", "end"] * (len(kinds) // 2)   # one capture at a time
    assert len(kinds) == 2 * (2 * (num_layers + 1) + len(graphs.graphs) + len(graphs.prefill_graphs))
    assert all(type(layer.backend).__name__ == "TorchBackend" for layer in runner.model.attention_layers())

    runner.graph_runner = graphs
    metas = []
    backend_type = type(runner.model.attention_layers()[0].backend)
    attend, decode = backend_type.attend, backend_type.decode

    def spy(self, query, key, value, k_cache, v_cache, meta, scale, out=None):
        metas.append(meta)
        return attend(self, query, key, value, k_cache, v_cache, meta, scale, out)

    def decode_spy(self, q, k, v, k_cache, v_cache, meta, scale, rotary):   # a step with decodes: the C++ kernel
        out = decode(self, q, k, v, k_cache, v_cache, meta, scale, rotary)
        if out is not None:
            metas.append(meta)
        return out
    monkeypatch.setattr(backend_type, "attend", spy)
    monkeypatch.setattr(backend_type, "decode", decode_spy)
    a, b = RequestId("a"), RequestId("b")
    prompt_a, prompt_b = random_prompts(2, 512, 7, 7, seed=5)
    FakeGraph.log = []
    first = runner.execute_model(SchedulerOutput(num_scheduled_tokens={a: 7, b: 4}, total_num_scheduled_tokens=11,
                                         new_requests=[NewRequestData(a, prompt_a, 7, GREEDY, [5, 2], 0),
                                                       NewRequestData(b, prompt_b[:6], 6, GREEDY, [9, 3], 0)]))
    assert [pid for _, pid in FakeGraph.log] == [id(p) for p in graphs.mixed.graphs[32]]
    assert len(metas) == num_layers and len({id(m) for m in metas}) == 1 and metas[0].num_seqs == 2
    assert int(metas[0].query_start_loc_host[-1]) == 11
    graphs.mixed.enabled = False   # the A/B switch: a mixed step (a decodes, b's last chunk) runs eagerly
    FakeGraph.log = []
    runner.execute_model(SchedulerOutput(num_scheduled_tokens={a: 1, b: 2}, total_num_scheduled_tokens=3,
                                         cached_requests=[CachedRequestData(a, [], 7, None, 8, first.sampled_token_ids[a]),
                                                          CachedRequestData(b, [], 4, None, 6, None)]))
    assert FakeGraph.log == [] and len(metas) == 2 * num_layers


def test_failed_mixed_capture_leaves_the_others(tmp_path, monkeypatch, caplog):
    """A mixed piece whose capture fails: its capture is ended, the mixed graphs are dropped
    (mixed steps run eagerly) with a warning, and the decode and prefill graphs are captured."""
    fake_cuda_graphs(monkeypatch)
    begin = FakeGraph.capture_begin

    def failing_begin(self, pool=None, capture_error_mode="global") -> None:
        begin(self, pool)
        if sum(kind == "begin" for kind, _ in FakeGraph.log) == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(FakeGraph, "capture_begin", failing_begin)
    runner = tiny_runner(tmp_path)
    graphs = CudaGraphRunner(runner.model, 4, 64, 4, torch.device("cpu"), 64, mixed=True)
    FakeGraph.log = []
    graphs.capture()
    assert graphs.mixed.graphs == {} and graphs.mixed.attention_calls == [] and graphs.graphs and graphs.prefill_graphs
    assert "mixed-step graphs failed" in caplog.text
    kinds = [kind for kind, _ in FakeGraph.log]
    assert kinds == ["begin", "end"] * (len(kinds) // 2)   # the failed piece's capture was ended
    assert all(type(layer.backend).__name__ == "TorchBackend" for layer in runner.model.attention_layers())


def test_switch_reaches_the_config(tmp_path, monkeypatch):
    """On unless PAGEDSERVE_MIXED_GRAPHS=0 (read once, in create_config)."""
    checkpoint = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")

    def mixed() -> bool:
        config, _, _ = EngineArgs(model=checkpoint, device="cpu", skip_tokenizer_init=True).create_config()
        return config.device.mixed_graphs
    monkeypatch.delenv("PAGEDSERVE_MIXED_GRAPHS", raising=False)
    assert mixed()
    monkeypatch.setenv("PAGEDSERVE_MIXED_GRAPHS", "0")
    assert not mixed()
    monkeypatch.setenv("PAGEDSERVE_MIXED_GRAPHS", "1")
    assert mixed()
