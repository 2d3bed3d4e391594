"""The decoder layers' use of RowParallelLinear.forward_add_norm (the gemv's norm tail, CUDA only)
checked on the CPU: with forward_add_norm stood in by its reference (the matmul, then the norm
with the residual), a tiny Llama's prefill and decode give the same ids and logprobs bit for bit
as without it, the o and down projections of every layer take the norm after them (the last
layer's down the final norm), and no input_layernorm after the first layer's nor the final norm
runs on its own."""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine_args import EngineArgs
from pagedserve.engine_io import CachedRequestData, NewRequestData, RequestId, SchedulerOutput
from pagedserve.layers.activation import silu_and_mul
from pagedserve.layers.linear import RowParallelLinear
from pagedserve.layers.norm import RMSNorm
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import write_tiny_checkpoint

A = RequestId("a")
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tail") / "llama"), "llama", seed=3)


def _run(checkpoint: str) -> list:
    config, _, _ = EngineArgs(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, block_size=4,
                              num_kv_blocks=16, skip_tokenizer_init=True).create_config()
    runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                         torch.device("cpu"))
    runner.load_model()
    runner.init_kv_cache(16)
    runner.finish_setup()
    prompt = [5, 77, 300, 12, 9, 401, 33]
    outs = [runner.execute_model(SchedulerOutput(
        num_scheduled_tokens={A: 7}, total_num_scheduled_tokens=7,
        new_requests=[NewRequestData(A, prompt, 7, PARAMS, [5, 2], 0)]))]
    for pos in (7, 8):
        token = outs[-1].sampled_token_ids[A]
        outs.append(runner.execute_model(SchedulerOutput(
            num_scheduled_tokens={A: 1}, total_num_scheduled_tokens=1,
            cached_requests=[CachedRequestData(A, [11] if pos == 8 else [], pos, None, pos + 1, token)])))
    return [(o.sampled_token_ids[A], o.logprobs[A].token_ids, o.logprobs[A].logprobs) for o in outs], runner


def test_layers_take_the_norm_in_the_tail(checkpoint, monkeypatch):
    plain, _ = _run(checkpoint)
    calls, outside = [], []
    inside = [False]
    forward = RMSNorm.forward

    def counting(self, *args, **kwargs):
        if not inside[0]:
            outside.append(self)
        return forward(self, *args, **kwargs)

    def reference(self, x, residual, norm, silu=False):
        if residual is None or norm is None:
            return None
        calls.append((self.prefix, norm))
        inside[0] = True
        try:
            return norm(self(silu_and_mul(x) if silu else x), residual)
        finally:
            inside[0] = False
    monkeypatch.setattr(RowParallelLinear, "forward_add_norm", reference)
    monkeypatch.setattr(RMSNorm, "forward", counting)
    tail, runner = _run(checkpoint)
    assert tail == plain   # ids and logprobs, bit for bit
    model = runner.model.model
    layers = model.own_layers
    expected = []
    for i, layer in enumerate(layers):
        expected += [(f"model.layers.{i}.self_attn.o_proj", layer.post_attention_layernorm),
                     (f"model.layers.{i}.mlp.down_proj", layers[i + 1].input_layernorm if i + 1 < len(layers)
                      else model.norm)]
    assert calls == expected * 3   # three steps
    assert outside == [layers[0].input_layernorm] * 3   # every other norm ran in a tail
