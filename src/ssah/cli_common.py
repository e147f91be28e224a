"""What the subcommands share: model options, options generated from a settings type, and the
output folder every writing command claims (checked and locked before any work starts)."""

from __future__ import annotations

import functools
import typing
from pathlib import Path

import click

from ssah.defaults import DEFAULT_MODEL, DTYPES, MODEL_HELP, SEED_MAX, check_device, check_device_present, quoted
from ssah.errors import SsahError


def device_option(ctx, param, value: str) -> str:
    """Click callback of a --device option: a device name this machine has."""
    try:
        check_device(value)
    except SsahError as err:
        raise click.BadParameter(str(err).removeprefix("unknown device ")) from None
    try:
        return check_device_present(value)
    except SsahError as err:
        raise click.BadParameter(str(err)) from None


class FiniteFloat(click.ParamType):
    """A finite float (click's FLOAT takes `inf` and `nan`), optionally bounded below."""

    name = "float"

    def __init__(self, min: float | None = None, min_open: bool = False):
        self.min, self.min_open = min, min_open

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{quoted(value)} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{quoted(value)} is not a finite number", param, ctx)
        if self.min is not None and (number < self.min or self.min_open and number == self.min):
            self.fail(f"{number:g} must be {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        return number


FINITE = FiniteFloat()
# a seed option's type: every random generator ssah seeds accepts it
SEED = click.IntRange(0, SEED_MAX)


def model_options(func):
    """Add --model, --dtype, --device and --device-map; the command receives them as `model_args`."""

    @click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True, metavar="SPEC", help=MODEL_HELP)
    @click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
                  help="auto: bf16 on CUDA, fp32 on CPU")
    @click.option("--device", default="auto", show_default=True, callback=device_option,
                  help="auto: cuda if present, else cpu; or cpu, cuda, cuda:N, mps")
    @click.option("--device-map", default=None, help="passed to from_pretrained, e.g. 'auto' for multi-GPU")
    @functools.wraps(func)
    def wrapper(*args, model_spec, dtype, device, device_map, **kwargs):
        kwargs["model_args"] = dict(spec=model_spec, dtype=dtype, device=device, device_map=device_map)
        return func(*args, **kwargs)

    return wrapper


def load_from_options(model_args: dict):
    from ssah.models.loading import load_model

    return load_model(**model_args)


def check_model_spec(model_args: dict):
    """Resolve the model spec without loading weights (see `ssah.models.spec`)."""
    from ssah.models.spec import resolve_model_spec

    return resolve_model_spec(model_args["spec"])


def _click_type(annotation):
    """The click type of a settings field's annotation (int | None -> int, Literal -> Choice)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is float:
        return FINITE
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not None:
        return _click_type(args[0])
    return annotation


def settings_options(settings_type, defaults: dict | None = None, skip: tuple[str, ...] = ()):
    """Click options generated from a settings type's fields (`--max-steps` for `max_steps`), with
    its defaults and descriptions (`defaults` overrides some); the command receives them as keyword
    arguments of the same names."""
    defaults = defaults or {}

    def decorate(func):
        for name, field in reversed(list(settings_type.model_fields.items())):
            if name in skip:
                continue
            default = defaults.get(name, field.get_default(call_default_factory=True))
            flag = f"--{name.replace('_', '-')}"
            if field.annotation is bool:
                option = click.option(flag, name, is_flag=True, default=default, help=field.description)
            else:
                option = click.option(flag, name, type=_click_type(field.annotation), default=default,
                                      show_default=default is not None, help=field.description)
            func = option(func)
        return func

    return decorate


def output_folder(out: str | Path, kind, *, inputs=(), force: bool = False, need_bytes: int = 0):
    """The command's checked output folder (see `ssah.outputs.OutputFolder`); use it as `with`."""
    from ssah.outputs import OutputFolder

    return OutputFolder(out, kind, inputs=inputs, force=force, need_bytes=need_bytes).check()
