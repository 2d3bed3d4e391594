"""pagedserve: an LLM inference engine and server (PagedAttention KV cache, continuous
batching, vLLM-shaped offline API, OpenAI- and TGI-compatible servers). Importing it
configures nothing: log output is set up at the edges (LLM(), the CLI, the server)."""
import gc as _gc

# No garbage collection while the imports below create torch's ~200k long-lived objects: the
# full collections they would trigger cost ~10% of the import, and free nothing.
_gc_enabled = _gc.isenabled()
_gc.disable()
try:
    from pagedserve.errors import EngineDeadError, ModelLoadError, OverloadedError, ValidationError
    from pagedserve.llm import LLM
    from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
    from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
finally:
    if _gc_enabled:
        _gc.enable()

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "ValidationError",
           "OverloadedError", "EngineDeadError", "ModelLoadError", "__version__"]
