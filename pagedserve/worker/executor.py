"""Runs the model runner: in this process (TP=1), or one process per rank (TP>1, see
worker/tp_executor.py). Both implement engine_io.Executor; the KV cache is sized by
worker/kv_budget.py."""
from __future__ import annotations

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine_io import Executor, ModelRunnerOutput, SchedulerOutput
from pagedserve.lora_request import LoadedLoRA
from pagedserve.worker.kv_budget import check_kv_fits, non_torch_memory, num_host_blocks, num_kv_blocks, resolve_device
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.pending_output import PendingRunnerOutput
from pagedserve.worker.tp_executor import MultiprocTPExecutor


class UniprocExecutor:
    """TP=1: the runner lives in this process. Async scheduling is supported: with
    non_block=True execute_model returns the launched step's PendingRunnerOutput at once."""

    max_concurrent_batches = 2

    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        baseline = non_torch_memory(self.device)
        self.runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                                  self.device)
        self.runner.load_model()
        self.weight_bytes = self.runner.weight_bytes
        self.num_blocks = num_kv_blocks(config, self.runner, baseline)
        check_kv_fits(config, self.num_blocks)
        self.runner.init_kv_cache(self.num_blocks)
        self.num_host_blocks = num_host_blocks(config, self.runner)
        self.runner.init_host_cache(self.num_host_blocks)
        self.runner.finish_setup()

    def execute_model(self, so: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | PendingRunnerOutput:
        return self.runner.execute_model(so, non_block)

    def check_health(self) -> None:
        """Nothing to check in-process: a failed step raises from execute_model."""

    def add_lora(self, lora: LoadedLoRA) -> None:
        self.runner.add_lora(lora)

    def remove_lora(self, lora_int_id: int) -> None:
        self.runner.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.world_size > 1:
        return MultiprocTPExecutor(config)
    return UniprocExecutor(config)
