"""ssah: measure and keep LLM safety alignment at the level of single neurons.

Importing this package is cheap: heavy modules (torch, transformers) load only when a
submodule that needs them is imported.
"""

__version__ = "0.1.0"

from ssah.errors import SsahError  # noqa: E402  (re-exported for users)

__all__ = ["SsahError", "__version__"]
