"""Per-unit importance scores on a calibration set, and their file format.

    from ssah.models.loading import load_model
    from ssah.data import load_dataset
    from ssah.units.scores import score_dataset

    loaded = load_model()
    safety = score_dataset(loaded, load_dataset("harmful:calibration"), responses="refusals", out="runs/S")
    safety.values["mlp"]          # float64 [num_layers, units_per_layer]

How scores are computed: see `ssah.units.scoring` (and `ssah.units.scorers` for the scorers).

Calibration responses (`score_dataset(responses=...)`): `dataset` uses each record's response;
`refusals` pairs every prompt with a refusal drawn by `seed` from the built-in scoring refusals
(`refusals:scoring`, texts no other role uses: alignment trains on others; or the `refusals` dataset
given) (the paper's safety data: harmful prompts answered with refusals); `self` uses the model's own
greedy replies (`ssah.evaluate.generation`), cached in the output folder (replies.jsonl) so a rerun
does not generate again; `own-refusals` keeps of those only the replies the `prefix` rule calls
refusals (the model's own refusals: no written text at all; the model must refuse some prompts).

On disk a run folder holds `scores.safetensors` (one tensor per kind) and `manifest.json` (what was
scored, how, and on which model; its `identity` decides reuse, see `ssah.artifacts`). Both are
written atomically (temporary file, then os.replace), the manifest last.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssah.artifacts import Artifact
from ssah.defaults import RESPONSE_SOURCES, TOKEN_SCOPES
from ssah.errors import SsahError
from ssah.io import atomic_write, read_json
from ssah.outputs import OutputKind
from ssah.ownership import make_dirs
from ssah.schemas import check_record
from ssah.units.layout import UnitLayout
from ssah.units.scorers import SCORERS, get_scorer, register_scorer, resolve_scope
from ssah.units.scoring import Pair, as_pairs, compute_scores, make_batches, scope_mask, score_batches

__all__ = [
    "SCORERS", "TOKEN_SCOPES", "RESPONSE_SOURCES", "Scores", "compute_scores", "score_batches",
    "score_dataset", "make_batches", "calibration_pairs", "get_scorer", "register_scorer", "scope_mask", "as_pairs",
]

FORMAT = "ssah.scores/1"
SCORES_FILE = "scores.safetensors"
MANIFEST_FILE = "manifest.json"
REPLIES_FILE = "replies.jsonl"
SCORES = OutputKind("scores", (SCORES_FILE, MANIFEST_FILE, REPLIES_FILE), record=MANIFEST_FILE)

# -- the Scores artifact ----------------------------------------------------------------------------

@dataclass
class Scores:
    """Per-unit scores of one model on one calibration set.

    `values[kind]` is a float64 tensor [num_layers, units_per_layer] holding float32 values: scores are
    accumulated in float64, then rounded once to float32, the precision they are stored in, so a run
    that reads them back ranks units exactly as the run that computed them. `manifest` records the
    scorer, token scope, responses source, dataset name and fingerprint, tokens seen, model
    fingerprint, ssah version, seed and attention unit. `reused` is True when `score_dataset` found
    this exact run in its output folder instead of computing it (not saved).
    """

    values: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    reused: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        self.values = {kind: value.detach().to("cpu", torch.float32).to(torch.float64)
                       for kind, value in self.values.items()}

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def dataset_fingerprint(self) -> str | None:
        return self.manifest.get("dataset_fingerprint")

    @property
    def scorer(self) -> str:
        return self.manifest["scorer"]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.values)

    def digest(self) -> str:
        """sha256 of the score values (kinds, shapes and float64 bytes)."""
        return values_digest(self.values)

    def save(self, directory: str | Path, artifact: Artifact | None = None) -> Path:
        """Write scores.safetensors, then manifest.json (atomically, with the run's identity); returns
        the folder."""
        from safetensors.torch import save as save_tensors

        directory = make_dirs(directory)
        tensors = {kind: value.detach().to("cpu", torch.float32).contiguous() for kind, value in self.values.items()}
        self.manifest["values_sha256"] = values_digest(tensors)
        atomic_write(directory / SCORES_FILE, save_tensors(tensors))
        artifact = artifact or Artifact(directory / MANIFEST_FILE, "scores", run_identity(self.manifest))
        self.manifest = artifact.save(self.manifest)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Scores:
        """Read a folder written by `save`; one clear SsahError if it is missing or damaged."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("format") != FORMAT:
            raise SsahError(f"{directory / MANIFEST_FILE} is not an ssah scores manifest "
                            f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
        values = read_tensors(directory / SCORES_FILE, "ssah score")
        expected_layers = manifest.get("num_layers")
        for kind, units in manifest.get("units_per_layer", {}).items():
            tensor = values.get(kind)
            if tensor is None or tuple(tensor.shape) != (expected_layers, units):
                got = None if tensor is None else tuple(tensor.shape)
                raise SsahError(f"{directory / SCORES_FILE} does not match its manifest ({kind}: shape {got}, "
                                f"expected {(expected_layers, units)}); rerun ssah score with --force")
        # Kinds in layout order (mlp, attn), as the manifest lists them; safetensors sorts its keys.
        values = {kind: values[kind].to(torch.float64) for kind in manifest.get("units_per_layer", values)}
        scores = cls(values, manifest)
        check_finite(scores, str(directory / SCORES_FILE))
        if manifest.get("values_sha256") not in (None, values_digest(values)):
            raise SsahError(f"{directory / SCORES_FILE} does not match {MANIFEST_FILE} (its digest differs); "
                            "the folder mixes two runs: rerun ssah score with --force")
        return scores


def check_finite(scores: Scores, what: str) -> None:
    """One line unless every score is a finite number: a NaN compares as neither high nor low, so
    ranking it would put a unit into a group by accident."""
    for kind, values in scores.values.items():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise SsahError(f"{what}: {bad} of {values.numel()} scores of {kind} units are NaN or infinite; "
                            "the model's activations overflowed (score in float32: --dtype fp32) or the file was "
                            "changed: rerun ssah score with --force")


def read_manifest(directory: Path, what: str = "scores", filename: str = MANIFEST_FILE,
                  made_by: str = "ssah score") -> dict:
    """The JSON manifest of a run folder, or one clear SsahError."""
    path = Path(directory) / filename
    if not Path(directory).is_dir():
        raise SsahError(f"no {what} folder {directory}; run {made_by} --out {directory} first")
    if not path.is_file():
        raise SsahError(f"{directory} holds no {what} ({filename} is missing); run {made_by} --out {directory}")
    manifest = read_json(path, what, f"rerun {made_by} with --force")
    if not isinstance(manifest, dict):
        raise SsahError(f"{path} is not a JSON object; rerun {made_by} with --force")
    return check_record(path, manifest)


def read_tensors(path: Path, made_by: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    if not path.is_file():
        raise SsahError(f"{path} is missing; rerun {made_by} with --force")
    try:
        return load_tensors(path.read_bytes())
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise SsahError(f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        f"rerun {made_by} with --force") from None


def values_digest(values: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for kind in sorted(values):
        tensor = values[kind].detach().to("cpu", torch.float64).contiguous()
        digest.update(f"{kind}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# -- calibration responses ----------------------------------------------------------------------------

def calibration_pairs(loaded, dataset, responses: str = "dataset", seed: int = 0, system: str | None = None,
                      max_new_tokens: int = 64, batch_size: int = 8, replies_cache: Path | None = None,
                      progress: bool = True, refusals=None) -> list[Pair]:
    """(prompt, response) pairs of `dataset` with responses from the dataset, refusal texts (`refusals`,
    a Dataset or spec; default the built-in scoring refusals) or the model (all its replies, or its
    own refusals only)."""
    prompts = [record.prompt for record in dataset]
    if responses == "dataset":
        return [(record.prompt, record.response) for record in dataset]
    if responses == "refusals":
        texts = [record.response or record.prompt for record in _refusals(refusals)]
        rng = random.Random(seed)
        return [(prompt, rng.choice(texts)) for prompt in prompts]
    if responses in ("self", "own-refusals"):
        from ssah.evaluate.generation import generate_replies

        replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                                   system=system, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   cache=replies_cache, progress=progress)
        pairs = list(zip(prompts, replies))
        if responses == "self":
            return pairs
        from ssah.evaluate.rules import is_refusal

        own = [(prompt, reply) for prompt, reply in pairs if is_refusal(reply)]
        if not own:
            raise SsahError(f"the model refused none of the {len(prompts)} prompts of "
                            f"{getattr(dataset, 'name', 'the dataset')!r} (prefix rule), so it has no own refusals "
                            "to score; use responses refusals")
        return own
    raise SsahError(f"unknown responses source {responses!r}; use one of {', '.join(RESPONSE_SOURCES)}")


def _refusals(refusals=None):
    """The refusal texts of responses="refusals": a Dataset, a spec, or the built-in scoring role."""
    from ssah.data import Dataset, load_dataset
    from ssah.data.catalog import REFUSAL_SPECS

    return refusals if isinstance(refusals, Dataset) else load_dataset(refusals or REFUSAL_SPECS["scoring"])


# -- the high-level entry point ---------------------------------------------------------------------

def run_identity(manifest: dict) -> dict:
    """The manifest fields that determine the scores; two runs with equal identities give the same result."""
    keys = ["model_fingerprint", "dataset_fingerprint", "scorer", "token_scope", "responses", "attn_unit",
            "max_length", "system"]
    if manifest.get("responses") == "refusals":
        keys += ["seed", "refusals_fingerprint"]
    if manifest.get("responses") in ("self", "own-refusals"):
        keys += ["max_new_tokens"]
    if "post_norms" in manifest or manifest.get("model_type") in ("gemma2", "gemma3", "gemma3_text"):
        keys += ["post_norms"]
    scorer = SCORERS.get(manifest.get("scorer", ""))
    if scorer is None or not scorer.batch_invariant:
        keys += ["batch_size"]
    return {key: manifest.get(key) for key in keys}


def _manifest(loaded, dataset, layout: UnitLayout, scorer: str, scope: str, responses: str, seed: int,
              max_new_tokens: int, batch_size: int, max_length: int, system: str | None,
              refusals=None) -> dict[str, Any]:
    from ssah import __version__

    return {
        "format": FORMAT, "scorer": scorer, "token_scope": scope, "responses": responses, "seed": seed,
        "dataset_name": dataset.name, "dataset_fingerprint": dataset.fingerprint, "num_records": len(dataset),
        "refusals_name": _refusals(refusals).name if responses == "refusals" else None,
        "refusals_fingerprint": _refusals(refusals).fingerprint if responses == "refusals" else None,
        "max_new_tokens": max_new_tokens if responses in ("self", "own-refusals") else None,
        "model_spec": loaded.spec, "model_fingerprint": loaded.fingerprint, "model_type": layout.model_type,
        "attn_unit": layout.attn_unit, "num_layers": layout.num_layers, "units_per_layer": layout.units_per_layer,
        "batch_size": batch_size, "max_length": max_length, "system": system, "ssah_version": __version__,
        # where a sublayer's norm follows it (Gemma 2/3), activation scores are read after that norm;
        # the key keeps scores saved before that change from being reused
        **({"post_norms": "after"} if any(block.post_norm for blocks in layout.blocks.values()
                                          for block in blocks) else {}),
    }


def _check_inputs(dataset, responses: str, scope: str, max_new_tokens: int) -> None:
    if responses not in RESPONSE_SOURCES:
        raise SsahError(f"unknown responses source {responses!r}; use one of {', '.join(RESPONSE_SOURCES)}")
    if len(dataset) == 0:
        raise SsahError(f"dataset {getattr(dataset, 'name', '?')!r} has no records; nothing to score")
    if responses == "dataset" and scope != "prompt":
        lacking = sum(1 for record in dataset if record.response is None)
        if lacking:
            raise SsahError(f"dataset {dataset.name!r} has {lacking} of {len(dataset)} records without a response; "
                            "use --responses refusals or self, or --token-scope prompt")
    if max_new_tokens < 1:
        raise SsahError(f"max new tokens must be at least 1, got {max_new_tokens}")


def score_dataset(loaded, dataset: Any, scorer: str = "variance", responses: str = "dataset",
                  token_scope: str | None = None, batch_size: int = 8, max_length: int = 256,
                  system: str | None = None, seed: int = 0, max_new_tokens: int = 64,
                  attn_unit: str = "channel", out: str | Path | None = None, force: bool = False,
                  progress: bool = True, replace: bool = False, refusals=None) -> Scores:
    """Score a loaded model's units on a dataset and return (and, with `out`, save) the Scores.

    `dataset` is a Dataset or a dataset spec. `responses`: "dataset", "refusals", "self" or
    "own-refusals" (see the module docstring); `refusals`: the texts of "refusals" (a Dataset or spec;
    default the built-in scoring role, `refusals:scoring`). `token_scope` None means the scorer's
    default. With `out`, a folder that already holds the same run is reused (returned with
    `reused=True`) unless `force`; one that holds a different run is refused unless `force` (or
    `replace`, inside a run folder: then it is redone).
    """
    chosen = get_scorer(scorer)
    scope = resolve_scope(chosen, token_scope)
    if isinstance(dataset, str):
        from ssah.data import load_dataset

        dataset = load_dataset(dataset)
    _check_inputs(dataset, responses, scope, max_new_tokens)
    layout = loaded.layout if attn_unit == "channel" else UnitLayout.from_model(loaded.model, attn_unit=attn_unit)
    manifest = _manifest(loaded, dataset, layout, chosen.name, scope, responses, seed, max_new_tokens, batch_size,
                         max_length, system, refusals)
    out = Path(out) if out is not None else None
    artifact = Artifact(out / MANIFEST_FILE, "scores", run_identity(manifest)) if out is not None else None
    if artifact is not None and artifact.lookup(force=force, replace=replace) is not None:
        scores = Scores.load(out)
        scores.reused = True
        return scores
    pairs = calibration_pairs(loaded, dataset, responses, seed, system, max_new_tokens, batch_size,
                              out / REPLIES_FILE if out is not None else None, progress, refusals)
    batches = make_batches(loaded.tokenizer, pairs, batch_size, max_length, system)
    values, tokens = score_batches(loaded.model, layout, batches, chosen.name, scope, progress)
    manifest["tokens_seen"] = tokens
    scores = Scores(values, manifest)
    if out is not None:
        scores.save(out, artifact)
    return scores
