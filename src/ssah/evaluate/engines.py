"""Generation engines for evaluation: `hf` (the default) and `vllm`.

- `hf` generates with the loaded Hugging Face model (`ssah.evaluate.generation`: continuous
  batching, or static batches under the runtime monitor). It is the only engine the monitor runs
  under, and reversible pruning applies to it directly.
- `vllm` generates with vLLM from a saved model folder: the folder the model was loaded from, or,
  when the evaluated model is not a folder on disk (pruned for the evaluation, fine-tuned in memory,
  a GGUF or tiny model), a copy `save_pretrained` writes into the evaluation's folder
  (`engine-model/`: reused by an interrupted evaluation's rerun while the model key is the same,
  deleted once the evaluation is finished). Greedy decoding as with `hf`, the same
  cache file, rules, replies.jsonl and eval.json; its replies are cached under the model key plus
  `engine=vllm`, since another kernel may break a near-tie differently. The suites that score
  rather than generate (refusal score, perplexity) still use the Hugging Face model.

vLLM is an optional extra (`pip install 'ssah[vllm]'`, GPU machines).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ssah.errors import SsahError

ENGINE_MODEL_DIR = "engine-model"
_KEY_FILE = ".ssah-model-key.json"


def require_vllm() -> None:
    """One line when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise SsahError(f"--engine vllm needs vLLM ({err}); install it with pip install 'ssah[vllm]' "
                        "on a GPU machine, or use --engine hf") from None


class VllmEngine:
    """Greedy generation with vLLM from a model folder (`generate` has `continuous_generate`'s shape)."""

    name = "vllm"

    def __init__(self, folder: str | Path, *, dtype: str = "auto", gpu_memory: float = 0.5, seed: int = 0,
                 chunk: int = 256):
        require_vllm()
        from vllm import LLM

        self.folder, self.chunk = Path(folder), chunk
        # The Hugging Face model stays loaded for the scoring suites: vLLM takes a share of the card.
        self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype, gpu_memory_utilization=gpu_memory,
                       seed=seed)

    def close(self) -> None:
        """Free the engine's memory (the evaluation is over)."""
        import gc

        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(self, encoded: Sequence[list[int]], *, max_new_tokens: int, eos_ids: Sequence[int],
                 on_finish: Callable[[list[tuple[int, tuple[int, ...]]]], None] | None = None,
                 **_: object) -> list[tuple[int, ...]]:
        """Greedy replies (token ids up to the first stop token, excluded), in input order; the
        replies of each chunk go to `on_finish` as they are done (vLLM schedules its own batches)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(eos_ids),
                                detokenize=False)
        stops, replies = set(eos_ids), []
        for start in range(0, len(encoded), self.chunk):
            prompts = [{"prompt_token_ids": list(ids)} for ids in encoded[start:start + self.chunk]]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            done = []
            for offset, output in enumerate(outputs):
                tokens = list(output.outputs[0].token_ids)
                end = next((i for i, tok in enumerate(tokens) if tok in stops), len(tokens))
                done.append((start + offset, tuple(tokens[:end])))
            replies += [tokens for _, tokens in done]
            if on_finish is not None:
                on_finish(done)
        return replies


def folder_of(spec: str) -> Path | None:
    """The Hugging Face folder a model spec names, else None (also for labels that are no spec). Pass
    it as an evaluation's `model_folder` only for a model unchanged since it was loaded from there."""
    from ssah.models.spec import resolve_model_spec

    try:
        source = resolve_model_spec(spec)
    except SsahError:
        return None
    return source.path if source.kind == "folder" else None


def engine_model_folder(model, tokenizer, model_key: str, out_dir: str | Path,
                        folder: str | Path | None = None) -> Path:
    """The folder an engine loads: `folder` when given (it holds exactly `model`'s weights), else a
    copy of `model` as it is now (interventions applied) saved once under `out_dir`."""
    if folder is not None:
        return Path(folder)
    copy = Path(out_dir) / ENGINE_MODEL_DIR
    record = copy / _KEY_FILE
    try:
        if json.loads(record.read_text(encoding="utf-8")).get("model") == model_key:
            return copy
    except (OSError, ValueError, AttributeError):
        pass
    from ssah.io import atomic_dir

    with atomic_dir(copy) as tmp:  # a copy of another model (or a cut-short one) is replaced whole
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _KEY_FILE).write_text(json.dumps({"model": model_key}), encoding="utf-8")
    return copy


def drop_engine_copy(out_dir: str | Path) -> None:
    """Delete the copy `engine_model_folder` saved under `out_dir` (a 7B copy is 13 GB), if there is one."""
    from ssah.ownership import remove

    remove(Path(out_dir) / ENGINE_MODEL_DIR)
