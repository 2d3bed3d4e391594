"""The Hugging Face transformers baseline: static batched `generate` over the same prompts
(left padding, batches of --hf-batch-size, every request of a batch runs to the batch's
longest output, as peers.py's `hf` mode). Only the requested output tokens count as useful."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from pagedserve.bench.datasets import SampleRequest

logger = logging.getLogger(__name__)


@dataclass
class HFRun:
    elapsed_s: float
    useful_output_tokens: int     # sum of requested output lengths
    generated_tokens: int         # batch size x longest output, summed over batches
    batch_size: int


def load_hf_model(source: Any, dtype: Any, device: str, load_format: str) -> Any:
    """The same weights pagedserve serves (a GGUF is read through its converted folder);
    load_format "dummy" builds random weights from the config alone (transformers' own
    config object: the engine may have read config.json as plain JSON)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if load_format == "dummy":
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.directory, **kwargs),
                                                     dtype=dtype)
    else:
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs).to(device)
    return model.eval()


def generate_batch(model: Any, batch: Sequence[SampleRequest], max_new_tokens: int, device: str) -> Any:
    import torch
    width = max(r.prompt_len for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(batch):   # left padding
        ids[row, width - request.prompt_len:] = torch.tensor(request.prompt_token_ids)
        mask[row, width - request.prompt_len:] = 1
    with torch.inference_mode():
        return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=0)


def run_hf(model: Any, requests: Sequence[SampleRequest], batch_size: int, device: str,
           tokenizer: Any | None = None) -> HFRun:
    """Time static batched generation of every request (after a short warm-up)."""
    requests = [_with_ids(r, tokenizer) for r in requests]
    generate_batch(model, [SampleRequest(8, 4, list(range(3, 11)))] * 2, 4, device)
    _sync(device)
    generated = 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        longest = max(r.output_len for r in batch)
        generate_batch(model, batch, longest, device)
        generated += len(batch) * longest
    _sync(device)
    elapsed = time.perf_counter() - start
    return HFRun(elapsed, sum(r.output_len for r in requests), generated, batch_size)


def _with_ids(request: SampleRequest, tokenizer: Any | None) -> SampleRequest:
    if request.prompt_token_ids is not None:
        return request
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer for the transformers baseline")
    ids = tokenizer(request.prompt_text, add_special_tokens=False).input_ids
    return SampleRequest(len(ids), request.output_len, prompt_token_ids=ids, prompt_text=request.prompt_text)


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
