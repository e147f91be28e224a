"""Test helpers: run the CLI in-process and capture what a user would see."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ssah.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> CliResult:
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """A user error: non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert result.code != 0, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.err!r}"
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def teach_answer(model, tokenizer, inputs: list[str], answer: str, steps: int = 30, seed: int = 0) -> None:
    """Train a tiny model for `steps` steps so that its greedy reply to any of the rendered `inputs`
    (and to inputs like them) is `answer`: a model whose answer is known, built in seconds."""
    import random

    import torch

    rng = random.Random(seed)
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in inputs]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, min(8, len(encoded)))
        width = max(len(a) for a in batch) + len(target)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, a in enumerate(batch):
            ids[row, :len(a) + len(target)] = torch.tensor(a + target)
            labels[row, len(a):len(a) + len(target)] = torch.tensor(target)
            mask[row, :len(a) + len(target)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
