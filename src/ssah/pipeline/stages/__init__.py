"""The pipeline's stages, one module each; importing this package registers them all, in order."""

from ssah.pipeline.stages import align, attacks, baseline, finetune, groups, probe, prune, report, transfer  # noqa: F401
