"""Everything a whole run needs, checked before its first stage: a bad input costs seconds, not hours.

The config itself is already checked when it loads (keys, types, choices, ranges, mask expressions,
sizes, rules across sections). Here: every dataset the config names loads and has what its stage
needs, the scorer is registered, the evaluation engine is installed, the model spec resolves (without
loading weights), a judge names a model folder or a hub id, and the run folder can take what the run
will write.
"""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.errors import SsahError


def check_datasets(config: RunConfig) -> None:
    from ssah.data import load_dataset

    d = config.data
    loaded = {}
    for key, spec in d.specs().items():
        try:
            loaded[key] = load_dataset(spec)
        except SsahError as err:
            raise SsahError(f"data.{key}: {err}") from None
    for key, dataset in loaded.items():
        if len(dataset) == 0:
            raise SsahError(f"data.{key}: dataset {dataset.name!r} has no records; pass a dataset with records")
    if "utility" in config.eval.suites and not any(r.answer for r in loaded["benign_test"]):
        raise SsahError(f"data.benign_test: {d.benign_test!r} has no records with an answer; task accuracy needs "
                        "checkable records (an `answer` field)")
    lacking = sum(1 for r in loaded["finetune"] if not r.response)
    if config.finetune.settings and lacking:
        raise SsahError(f"data.finetune: {lacking} records of {d.finetune!r} have no response; fine-tuning needs "
                        "(prompt, response) pairs")
    if config.align.enabled and not any(r.response for r in loaded["benign_train"]):
        raise SsahError(f"data.benign_train: {d.benign_train!r} has no answers for alignment to keep the model useful")


def check_run(config: RunConfig, out) -> None:
    """Every check of the module docstring; one SsahError line for the first problem found."""
    from ssah.defaults import check_device_present
    from ssah.models.spec import resolve_model_spec
    from ssah.outputs import OutputFolder
    from ssah.pipeline.layout import RUN
    from ssah.units.scorers import get_scorer

    try:
        check_device_present(config.device)
    except SsahError as err:
        raise SsahError(f"device: {err}") from None
    source = resolve_model_spec(config.model)
    if config.probe.monitor:
        from ssah.models.spec import check_layers

        check_layers(config.probe.monitor_config(config.data).layers, source, "probe.monitor_settings.layers")
    try:
        get_scorer(config.scores.scorer)
    except SsahError as err:
        raise SsahError(f"scores.scorer: {err}") from None
    check_datasets(config)
    if config.eval.judge is not None:
        from ssah.evaluate.judges import check_judge_folder

        try:
            check_judge_folder(config.eval.judge.model)
        except SsahError as err:
            raise SsahError(f"eval.judge.model: {err}") from None
    if config.eval.engine != "hf":
        from ssah.evaluate.engines import require_vllm

        require_vllm()
    saved_models = (2 if config.align.enabled and config.align.compare_full else int(config.align.enabled)) \
        + len(config.finetune.settings)
    OutputFolder(out, RUN, need_bytes=saved_models * source.weight_bytes).check()
