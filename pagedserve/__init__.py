"""pagedserve: an LLM inference engine and server (PagedAttention KV cache, continuous
batching, vLLM-shaped offline API, OpenAI- and TGI-compatible servers). Importing it
configures nothing (log output is set up at the edges: LLM(), the CLI, the server) but one
default of torch's OpenMP runtime, set before torch loads it and only when the user set no wait
policy: GOMP_SPINCOUNT=2000. libgomp's default spins ~300k iterations at each barrier; on a
machine whose cores are busy with other processes a team then waits a whole time slice for a
descheduled partner at each of a CPU step's hundreds of parallel regions (the default model's
decode fell to 0.5-10 tok/s on the 2-core VM at load ~9; 30-44 with a short spin or passive
waits), while on an idle machine a 2000-iteration spin costs ~1% (OMP_WAIT_POLICY=PASSIVE
~15%): benchmarks/RESULTS.md, issue 19."""
import gc as _gc
import os as _os

if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "2000"   # read by libgomp when torch loads it (no effect if already loaded)

# No garbage collection while the imports below create torch's ~200k long-lived objects: the
# full collections they would trigger cost ~10% of the import, and free nothing.
_gc_enabled = _gc.isenabled()
_gc.disable()
try:
    from pagedserve.errors import EngineDeadError, ModelLoadError, OverloadedError, ValidationError
    from pagedserve.llm import LLM
    from pagedserve.lora_request import LoRARequest
    from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
    from pagedserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
finally:
    if _gc_enabled:
        _gc.enable()

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "ValidationError",
           "OverloadedError", "EngineDeadError", "ModelLoadError", "__version__"]
