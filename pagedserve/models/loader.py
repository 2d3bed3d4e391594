"""Find a model (local folder, GGUF file, local Hugging Face cache, or the embedded default),
read its config and tokenizer, and stream its weights into the model's parameters.

Formats: *.safetensors (single or sharded; read lazily, so a TP rank reads only its
slice), *.bin (torch.load(weights_only=True), with a warning), GGUF (dequantized at load by
transformers' GGUF reader), and "dummy" (random weights from config.json alone).
No network access: `org/name` is looked up in the local Hugging Face cache only.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pagedserve.config import WeightSource
from pagedserve.errors import ModelLoadError
from pagedserve.layers.linear import as_tensor
from pagedserve.layers.quantization import CheckpointTensor
from pagedserve.layers.quantization.base import fused_name

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a folder, and the GGUF file inside it if that is the format."""

    directory: str
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else None


def resolve_model(model: str | None) -> ModelSource:
    """A path (folder or .gguf file), an `org/name` in the local HF cache, or None for the
    embedded default. Raises ModelLoadError naming every place it looked."""
    if model is None:
        from pagedserve.models.default_model import default_model_path
        path = default_model_path()
        return ModelSource(os.path.dirname(path), os.path.basename(path))
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"model file {path!r} is not a .gguf file; pass a folder for HF checkpoints")
        return ModelSource(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        return _source_from_dir(path)
    looked = [os.path.abspath(path)]
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import constants, snapshot_download
        looked.append(f"the local Hugging Face cache ({constants.HF_HUB_CACHE})")
        try:
            return _source_from_dir(snapshot_download(model, local_files_only=True, cache_dir=constants.HF_HUB_CACHE))
        except Exception as exc:   # LocalEntryNotFoundError and friends
            logger.debug("HF cache lookup for %s failed: %s", model, exc)
    raise ModelLoadError(f"model {model!r} not found; looked in: {'; '.join(looked)} "
                         "(no network access: download the model first or pass a local path)")


def _source_from_dir(directory: str) -> ModelSource:
    if os.path.isfile(os.path.join(directory, "config.json")):
        return ModelSource(directory)
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if ggufs:
        if len(ggufs) > 1:
            logger.warning("several GGUF files in %s; using %s", directory, ggufs[0])
        return ModelSource(directory, ggufs[0])
    raise ModelLoadError(f"{directory!r} holds neither config.json nor a .gguf file")


# Model types whose config.json is used as plain JSON, with transformers' defaults for the keys
# ModelConfig.from_hf reads but has no default of its own for (LlamaConfig: bos 1, eos 2).
PLAIN_CONFIG_DEFAULTS = {"llama": {"bos_token_id": 1, "eos_token_id": 2}}


def plain_config(directory: str) -> SimpleNamespace | None:
    """config.json as attributes, for the model types of PLAIN_CONFIG_DEFAULTS (no remote
    code): what AutoConfig would give ModelConfig.from_hf, without importing transformers'
    config machinery (seconds of start-up). None for any other config."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    defaults = PLAIN_CONFIG_DEFAULTS.get(data.get("model_type")) if isinstance(data, dict) else None
    if defaults is None or "auto_map" in data:
        return None
    return SimpleNamespace(**{**defaults, **data})


def load_hf_config(source: ModelSource) -> Any:
    """The model's config: plain JSON where that is enough (plain_config), else AutoConfig."""
    plain = None if source.gguf_file else plain_config(source.directory)
    if plain is not None:
        return plain
    from transformers import AutoConfig
    try:
        if source.gguf_file:
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.directory)
    except Exception as exc:
        if source.gguf_file is None:
            _check_architecture_known(source.directory)
        raise ModelLoadError(f"cannot read the model config in {source.directory}: {exc}") from exc


def _check_architecture_known(directory: str) -> None:
    """A config.json with a model_type transformers does not know: report the architecture."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return
    from pagedserve.models.registry import resolve_model_class
    for arch in archs:
        resolve_model_class(arch)


# tokenizer_config.json classes that mean "tokenizer.json as it stands", and the model types for
# which AutoTokenizer then loads exactly that (TokenizersBackend, transformers 5.x); others may
# get a model-specific class (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, Mistral's backend)
PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
PLAIN_TOKENIZER_MODEL_TYPES = ("llama",)


def plain_tokenizer(directory: str) -> bool:
    """Whether AutoTokenizer would load the folder's tokenizer.json as TokenizersBackend: a
    llama config.json, a tokenizer_config.json naming PreTrainedTokenizerFast or
    TokenizersBackend, no custom code. Then load_tokenizer skips AutoTokenizer's AutoConfig,
    which imports the model's config module (torch.distributed.tensor, sympy: seconds of
    import holding the GIL while the engine starts beside it)."""
    try:
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
        with open(os.path.join(directory, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return False
    return (os.path.isfile(os.path.join(directory, "tokenizer.json")) and "auto_map" not in tokenizer_config
            and tokenizer_config.get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES
            and model_type in PLAIN_TOKENIZER_MODEL_TYPES)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The model's tokenizer (or the folder / HF id `tokenizer`'s): what AutoTokenizer gives,
    by the short way when the folder is plain_tokenizer()."""
    try:
        directory = resolve_model(tokenizer).directory if tokenizer is not None else source.directory
        if (tokenizer is not None or not source.gguf_file) and plain_tokenizer(directory):
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast.from_pretrained(directory)
        from transformers import AutoTokenizer
        if tokenizer is None and source.gguf_file:
            return AutoTokenizer.from_pretrained(directory, gguf_file=source.gguf_file)
        return AutoTokenizer.from_pretrained(directory)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {tokenizer or source.directory}: {exc}") from exc


def iterate_weights(source: ModelSource, load_format: str, dtype: torch.dtype) -> Iterator[tuple[str, Any]]:
    """(HF parameter name, tensor or lazy safetensors slice) for every checkpoint tensor."""
    if source.gguf_file or load_format == "gguf":
        yield from _gguf_weights(source, dtype)
        return
    files = sorted(glob.glob(os.path.join(source.directory, "*.safetensors")))
    if files and load_format in ("auto", "safetensors"):
        from safetensors import safe_open
        for path in files:
            try:
                handle = safe_open(path, framework="pt")
                names = list(handle.keys())
            except Exception as exc:   # truncated or not a safetensors file
                raise ModelLoadError(f"cannot read the weights file {path}: {_one_line(exc)} "
                                     "(truncated or corrupt safetensors file?)") from exc
            with handle as f:
                for name in names:
                    try:
                        tensor = f.get_slice(name)
                    except Exception as exc:
                        raise ModelLoadError(f"cannot read tensor {name!r} from {path}: {_one_line(exc)}") from exc
                    yield name, tensor
        return
    bins = sorted(p for p in glob.glob(os.path.join(source.directory, "*.bin"))
                  if not os.path.basename(p).startswith("training_args"))
    if bins and load_format in ("auto", "pt"):
        logger.warning("loading *.bin weights from %s with torch.load(weights_only=True); "
                       "safetensors is preferred (faster and safer)", source.directory)
        for path in bins:
            state = _load_bin(path)
            yield from state.items()
        return
    raise ModelLoadError(f"no weights found in {source.directory} for load_format={load_format!r} "
                         "(expected *.safetensors, *.bin or a .gguf file; or use load_format='dummy')")


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): a pickle that would run code is refused, a truncated
    or corrupt file too; either way one line naming the file (ModelLoadError)."""
    import pickle
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"refusing to load {path}: it holds objects other than tensors, which "
                             f"weights_only loading blocks (possibly malicious pickle): {_one_line(exc)}") from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights file {path}: {_one_line(exc)} "
                             "(truncated or corrupt .bin file?)") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def _gguf_weights(source: ModelSource, dtype: torch.dtype, hf_config: Any = None) -> Iterator[tuple[str, Any]]:
    """Dequantize through transformers' GGUF reader, which also undoes llama.cpp's Q/K
    permutation and maps tensor names to HF names (it needs an HF model skeleton on meta,
    built from the file's own config unless the caller has read it already)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    if hf_config is None:
        hf_config = load_hf_config(source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(source.gguf_path, return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=dtype)
    yield from parsed["tensors"].items()


def gguf_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagedserve", "gguf")


def materialize_gguf(source: ModelSource, check_config: Callable[[Any], None] | None = None) -> ModelSource:
    """Convert a GGUF file once into an HF folder (config.json, tokenizer files, safetensors)
    under ~/.cache/pagedserve/gguf/, keyed by the file's name, size and mtime, and return that
    folder. Quantized tensors stay llama.cpp's raw blocks (models/gguf_packed.py; their types
    in gguf_quant.json); architectures it does not map are dequantized to fp32 as before.
    Reading GGUF metadata through the gguf package takes tens of seconds on a small CPU (a
    progress bar shows it); the folder loads in about a second. Falls back to the GGUF
    itself when the cache cannot be written. `check_config(hf_config)` runs on the file's
    config before a conversion starts (a doomed configuration fails fast, not after it)."""
    from pagedserve.models import gguf_packed
    path = source.gguf_path
    stat = os.stat(path)
    key = f"{os.path.splitext(source.gguf_file)[0]}-{stat.st_size}-{int(stat.st_mtime)}-packed"
    target = os.path.join(gguf_cache_root(), key)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return ModelSource(target)
    logger.info("converting %s once into %s", path, target)
    try:
        from safetensors.torch import save_file
        from tqdm import tqdm
        with tqdm(total=3, desc=f"converting {source.gguf_file} (once)", unit="step") as bar:
            hf_config = load_hf_config(source)
            if check_config is not None:
                check_config(hf_config)
            bar.update()
            tokenizer = load_tokenizer(source)
            bar.update()
            kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
            converted = gguf_packed.convert(path, hf_config.num_attention_heads, kv_heads, bar)
            if converted is None:
                tensors = {name: as_tensor(t).contiguous() for name, t in _gguf_weights(source, torch.float32, hf_config)}
                types: dict[str, str] = {}
            else:
                tensors = {name: torch.from_numpy(array) for name, array in converted[0].items()}
                types = converted[1]
        os.makedirs(gguf_cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=key + ".", dir=gguf_cache_root())
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        if types:
            with open(os.path.join(tmp, gguf_packed.QUANT_FILE), "w") as f:
                json.dump({"quant_method": "gguf", "tensor_types": types}, f)
        try:
            os.replace(tmp, target)
        except OSError:   # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("cannot cache the converted GGUF (%s); loading it directly", exc)
        return source
    return ModelSource(target)


def dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors (uniform; norm weights 1) at the model's full shapes, each
    drawn from a generator seeded by (seed, name): the same values whatever the TP size, so
    tensor_parallel_size=N on dummy weights is the same model as N=1. Quantized layers
    name their tensors with a CheckpointTensor: integer dtypes get random bits (packed
    weights), other dtypes a uniform draw in its range, cast (fp8 weights, scales)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for name, spec in model.checkpoint_shapes().items():
        if not isinstance(spec, CheckpointTensor):
            spec = CheckpointTensor(tuple(spec), None, low, high)
        if name.endswith("norm.weight"):
            yield name, torch.ones(spec.shape, dtype=dtype, device=device)
            continue
        seed_name = fused_name(name) if spec.shared else name
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(seed_name.encode()))
        target = spec.dtype or dtype
        if not target.is_floating_point:
            low, high = (int(spec.low), int(spec.high)) if spec.high - spec.low >= 1 else \
                (torch.iinfo(target).min, torch.iinfo(target).max)
            yield name, torch.randint(low, high, spec.shape, generator=generator, device=device,
                                      dtype=torch.int64).to(target)
            continue
        draw = dtype if target.itemsize == 1 else target   # fp8: drawn in the model dtype, then cast
        yield name, torch.empty(spec.shape, dtype=draw, device=device).uniform_(
            spec.low, spec.high, generator=generator).to(target)


def load_weights(model: nn.Module, source: WeightSource, dtype: torch.dtype) -> None:
    """Fill every parameter of `model`; raise ModelLoadError if the checkpoint misses some."""
    load_format = source.load_format
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if load_format == "dummy":
        weights = dummy_weights(model, source.seed)
    else:
        weights = iterate_weights(ModelSource(source.directory, source.gguf_file), load_format, dtype)
    loaded = model.load_weights(weights)
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint in {source.directory} lacks weights for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
    for module in model.modules():   # repack / requantize into the layout the kernels want
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    after = getattr(model, "after_weights_loaded", None)
    if after is not None:
        after()
