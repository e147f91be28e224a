"""What pruning, a runtime monitor and a frozen set have in common: a reversible change to a model.

An `Intervention` is a context manager: entering applies it (weights edited, hooks added), leaving
undoes it, also on an error. Its `key` names what it does to the model's outputs, stably across
runs and processes, so an evaluation of a model under interventions is cached under
`model_key(fingerprint, interventions)`, the one key format of every evaluation:

    with pruned(model, layout, mask) as pruning:      # one intervention, used alone
        ...
    evaluate_model(model, tokenizer, fingerprint, out, interventions=[pruned(model, layout, mask),
                                                                      Monitor(model, None, state, tok)])

`evaluate_model` enters the interventions it is given, in order, and leaves them in reverse order.
An intervention may also rewrite the replies generated under it (the monitor's refusals), add a
block to the evaluation report (`report_block`), and follow each generation (`watches_generation`: ssah's
generation passes every `generate` call through its `watch`, as the runtime monitor needs; `model.generate`
itself is never replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence


class Intervention:
    """A reversible change to a model; subclasses set `key` and implement `apply` / `undo`."""

    key: str = ""
    kind: str = "intervention"  # names its block in an evaluation report
    watches_generation: bool = False  # True: every generate call goes through `watch` (static batches)

    def apply(self) -> None:
        """Change the model (called on entering the `with` block)."""

    def undo(self) -> None:
        """Restore the model (called on leaving the `with` block, also after an error)."""

    def __enter__(self):
        self.apply()
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    @contextlib.contextmanager
    def watch(self, kwargs: dict) -> Iterator[dict]:
        """One `model.generate` call under this intervention: yields the call's keyword arguments with what
        the intervention adds (logits processors, stopping criteria)."""
        yield kwargs

    def rewrite(self, replies: list[str]) -> list[str]:
        """The replies of the batch just generated under this intervention, as they should be kept."""
        return replies

    def report_block(self, rows: list[dict]) -> dict | None:
        """What an evaluation report records about this intervention (`rows`: its replies.jsonl rows)."""
        return None


def model_key(base: str, interventions: Sequence[Intervention] = ()) -> str:
    """The key of a model under `interventions`: its own key (e.g. its fingerprint), then each one's."""
    return "+".join([base, *(i.key for i in interventions)])


def short_digest(*parts: bytes | str) -> str:
    """16 hex digits of sha256 over `parts`: the stable half of every intervention key."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]
