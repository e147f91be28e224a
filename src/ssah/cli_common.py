"""Options shared by every subcommand that loads a model."""

from __future__ import annotations

import functools

import click

MODEL_HELP = ("model: builtin:smollm2-135m-instruct (default), a Hugging Face folder, a .gguf file, "
              "tiny:FAMILY (random test model), or a hub id (online only)")


def model_options(func):
    """Add --model, --dtype, --device and --device-map; the command receives them as `model_args`."""

    @click.option("--model", "model_spec", default="builtin:smollm2-135m-instruct", show_default=True,
                  metavar="SPEC", help=MODEL_HELP)
    @click.option("--dtype", default="auto", show_default=True,
                  type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="auto: bf16 on CUDA, fp32 on CPU")
    @click.option("--device", default="auto", show_default=True, help="auto: cuda if present, else cpu")
    @click.option("--device-map", default=None, help="passed to from_pretrained, e.g. 'auto' for multi-GPU")
    @functools.wraps(func)
    def wrapper(*args, model_spec, dtype, device, device_map, **kwargs):
        kwargs["model_args"] = dict(spec=model_spec, dtype=dtype, device=device, device_map=device_map)
        return func(*args, **kwargs)

    return wrapper


def load_from_options(model_args: dict):
    from ssah.models.loading import load_model

    return load_model(**model_args)
