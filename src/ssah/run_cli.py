"""`ssah run`, `ssah demo` and `ssah config show`: the end-to-end experiment."""

from __future__ import annotations

import click

from ssah.defaults import PRESETS


def _run(preset: str | None, config_file: str | None, out: str, from_stage: str | None, force: tuple[str, ...],
         only: tuple[str, ...], model: str | None = None) -> None:
    from ssah.config import load_config
    from ssah.pipeline import run_pipeline

    config = load_config(preset, config_file, model=model)
    run_pipeline(config, out, from_stage=from_stage, force=force, only=only or None, config_file=config_file)


_stage_options = [
    click.option("--from", "from_stage", default=None, help="redo this stage and every later one"),
    click.option("--force", multiple=True, help="redo this stage (repeatable)"),
    click.option("--only", multiple=True, help="run only this stage (repeatable; the stages it needs must be done)"),
]


def stage_options(func):
    for option in reversed(_stage_options):
        func = option(func)
    return func


@click.command("run")
@click.option("--preset", default=None, help=f"a built-in preset: {', '.join(PRESETS)}")
@click.option("--config", "config_file", default=None, type=click.Path(), help="a YAML config file")
@click.option("--model", default=None, metavar="SPEC",
              help="study this model instead of the config's (a folder, a GGUF file or a hub id)")
@click.option("--out", required=True, type=click.Path(), help="the run folder (RUN_DIR)")
@stage_options
def run(preset, config_file, model, out, from_stage, force, only) -> None:
    """Run the whole SSAH study; a rerun resumes, skipping finished stages."""
    _run(preset, config_file, out, from_stage, force, only, model)


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@stage_options
def demo(out, from_stage, force, only) -> None:
    """The `demo` preset: the whole study on the built-in model, its controls included."""
    _run("demo", None, out, from_stage, force, only)


@click.group("config")
def config() -> None:
    """Inspect experiment presets."""


@config.command("show")
@click.argument("preset")
def show(preset: str) -> None:
    """Print a preset's YAML, to copy and edit as a --config file."""
    from ssah.config import preset_text

    click.echo(preset_text(preset), nl=False)
