"""The `ssah` command line: one command, a subcommand per stage.

Subcommands live beside the code they drive (e.g. `ssah.units.cli`) and are imported only
when invoked, so `ssah --help` stays fast (no torch import). Every `SsahError`, and every OS error
(a read-only or full disk, a missing permission), is printed as one line on stderr with exit
status 2, never as a traceback. The library reports progress through `logging` (logger `ssah`);
the CLI prints its INFO messages on stdout (`--quiet`: warnings only).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ssah import __version__
from ssah.errors import SsahError

# name -> (module, attribute, one-line help shown by `ssah --help` without importing it)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "units": ("ssah.units.cli", "units", "Print a model's unit layout (units per kind and layer)."),
    "data": ("ssah.data.cli", "data", "List and show built-in datasets; inspect any dataset spec."),
    "score": ("ssah.units.cli", "score", "Score every unit's importance on a dataset (paper Eq. 1 and others)."),
    "groups": ("ssah.units.cli", "groups", "Sort units into SCU / UCU / CU / RU from a safety and a utility score."),
    "faithfulness": ("ssah.units.cli", "faithfulness",
                     "Which score finds safety units: prune SCU/UCU/RU per scorer x normalisation x ranking."),
    "eval": ("ssah.evaluate.cli", "eval_command", "Evaluate safety, prefill attacks, over-refusal and utility."),
    "prune": ("ssah.interventions.cli", "prune", "Zero a unit mask permanently and save a Hugging Face folder."),
    "restore": ("ssah.interventions.cli", "restore",
                "Put aligned weights back one parameter group at a time: the share of the ASR rise each undoes."),
    "finetune": ("ssah.train.cli", "finetune", "Supervised fine-tuning, optionally with frozen units or LoRA."),
    "align": ("ssah.train.cli", "align", "Safety alignment that trains only a unit budget (e.g. RU)."),
    "probe": ("ssah.probe.cli", "probe", "Reasoning-direction probe: refusal vs compliance per layer and step."),
    "transfer": ("ssah.analysis.cli", "transfer", "Cross-tabulate unit groups before and after training."),
    "run": ("ssah.run_cli", "run", "Run the whole SSAH study from a preset or config; resumable."),
    "report": ("ssah.analysis.cli", "report", "Render a run folder's report again (results.json, report.html)."),
    "demo": ("ssah.run_cli", "demo", "The demo study on the built-in model into runs/demo."),
    "config": ("ssah.run_cli", "config", "Show experiment presets (ssah config show demo)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            module, attr, _ = SUBCOMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][2]) for name in sorted(SUBCOMMANDS)]
        rows += [(n, c.get_short_help_str()) for n, c in sorted(self.commands.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a message is logged (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(quiet: bool) -> None:
    logger = logging.getLogger("ssah")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ssah")
@click.option("--quiet", "-q", is_flag=True, help="print warnings and results only, no progress messages")
def cli(quiet: bool) -> None:
    """ssah: find, prune, freeze and train the neuron-level units that carry safety alignment."""
    _configure_logging(quiet)


def _os_error(err: OSError) -> str:
    what = err.strerror or str(err) or type(err).__name__
    where = err.filename or getattr(err, "filename2", None)
    return f"{what}: {where}" if where else what


LINE_LIMIT = 1000  # characters of an error line; a value in it is quoted shorter still (`ssah.defaults.quoted`)


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    """`text` as one bounded, printable line: line breaks and control characters escaped, bytes a file
    name held that are not UTF-8 shown as escapes, the middle of an overlong text left out."""
    text = "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for ch in str(text))
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[: limit // 2]} ... {text[-(limit // 2 - 5):]}"
    return text


def _error(message: str) -> None:
    click.echo(one_line(f"error: {message}"), err=True)


def _printable_output() -> None:
    """File names may hold bytes that are not UTF-8 (Python keeps them as surrogates): print them as
    escapes (\\udcff) instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError, TypeError, AttributeError):  # a stream that cannot change it
                pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one clear line."""
    _printable_output()
    try:
        cli.main(args=argv, prog_name="ssah", standalone_mode=False)
    except SsahError as err:
        _error(str(err))
        sys.exit(err.exit_code)
    except OSError as err:  # a read-only or full disk, a missing permission: nothing a traceback explains
        _error(f"{_os_error(err)}; nothing already finished was lost, rerun to resume")
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:  # a bad option value: one line, with where to read more
        hint = ""
        if isinstance(err, click.UsageError) and err.ctx is not None:
            hint = f" (see {err.ctx.command_path} --help)"
        _error(f"{err.format_message()}{hint}")
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; finished artifacts are kept, rerun to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
