"""pagedserve: an LLM inference engine and server (PagedAttention KV cache, continuous
batching, vLLM-shaped offline API, OpenAI- and TGI-compatible servers)."""
from pagedserve.logger import configure_default_logging

configure_default_logging()

from pagedserve.errors import EngineDeadError, ModelLoadError, OverloadedError, ValidationError  # noqa: E402
from pagedserve.llm import LLM  # noqa: E402
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from pagedserve.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "ValidationError",
           "OverloadedError", "EngineDeadError", "ModelLoadError", "__version__"]
