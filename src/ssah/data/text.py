"""The built-in plain-text corpus (hand-written encyclopedic prose) for perplexity measurements."""

from __future__ import annotations

import functools
from importlib.resources import files


@functools.cache
def text_corpus() -> str:
    """The whole corpus as one string, exactly as stored: paragraphs separated by blank lines."""
    return files("ssah.data").joinpath("builtin", "text.txt").read_text(encoding="utf-8")
