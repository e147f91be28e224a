"""FSDP2-sharded training on 2 CPU processes (gloo): frozen entries stay bit-identical, the units
allowed to train do train, and the main process saves the whole model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ssah.interventions.masks import load_mask, split_mask_spec
from ssah.models.loading import load_model
from tests.helpers import assert_one_line_error, run_cli

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_freeze.py"


def _torchrun(*args: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _groups(tmp_path, capsys, sizes: str, mask: str) -> str:
    """Scores and groups of tiny:llama made in-process; returns the GROUPS_DIR:MASK spec."""
    for data, extra, name in (("harmful:calibration", ["--responses", "refusals"], "S"),
                              ("benign:calibration", [], "U")):
        assert run_cli(capsys, "score", "--model", "tiny:llama", "--data", data, "--limit", "6", *extra,
                       "--out", str(tmp_path / name)).code == 0
    assert run_cli(capsys, "groups", "--safety", str(tmp_path / "S"), "--utility", str(tmp_path / "U"),
                   "--sizes", sizes, "--out", str(tmp_path / "g")).code == 0
    return f"{tmp_path / 'g'}:{mask}"


def test_budget_training_on_shards_keeps_everything_else_bit_identical(tmp_path):
    """Alignment inside a unit budget (copy mode): every entry outside it, gathered whole, is unchanged."""
    proc = _torchrun(str(SCRIPT), str(tmp_path), port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] == "DTensor" and r["steps"] == 3 for r in ranks)  # it really ran sharded
    assert all(r["check"]["max_abs_change_frozen"] == 0.0 and r["check"]["freeze_mode"] == "copy" for r in ranks)
    assert ranks[0]["identical"] and ranks[0]["trainable_changed"]


def test_ssah_finetune_sharded_keeps_frozen_units_and_saves_the_model(tmp_path, capsys):
    """`ssah finetune --shard fsdp2 --freeze ...` under torchrun (masked mode, AdamW with decay)."""
    tiny = ["--model", "tiny:llama"]
    spec = _groups(tmp_path, capsys, "scu=0.1,ucu=0.1,ru=0.2", "SCU+CU")
    proc = _torchrun("-m", "ssah", "finetune", *tiny, "--data", "benign:train", "--limit", "16",
                     "--freeze", spec, "--shard", "fsdp2", "--max-steps", "3", "--batch-size", "2",
                     "--lr", "1e-2", "--weight-decay", "0.1", "--out", str(tmp_path / "ft"), port=29542)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved") == 1  # one process wrote and reported the model
    record = json.loads((tmp_path / "ft" / "train.json").read_text())
    assert record["config"]["shard"] == "fsdp2"
    assert record["result"]["check"]["max_abs_change_frozen"] == 0.0
    assert record["result"]["check"]["freeze_mode"] == "masked"
    base, tuned = load_model("tiny:llama", device="cpu"), load_model(str(tmp_path / "ft"), device="cpu")
    mask = load_mask(*split_mask_spec(spec))
    params, before = dict(tuned.model.named_parameters()), dict(base.model.named_parameters())
    slices = mask.owned_slices(base.layout)
    assert slices
    for (name, dim), positions in slices.items():
        assert torch.equal(params[name].detach().index_select(dim, positions),
                           before[name].detach().index_select(dim, positions)), name
    assert any(not torch.equal(params[n], before[n]) for n in params)  # the rest trained


def test_sharding_in_one_process_is_one_line_before_the_model_loads(tmp_path, capsys):
    result = run_cli(capsys, "finetune", "--model", "tiny:llama", "--data", "benign:train", "--limit", "4",
                     "--max-steps", "1", "--shard", "fsdp2", "--out", str(tmp_path / "ft"))
    assert_one_line_error(result, "torchrun")
    assert result.code == 2 and not (tmp_path / "ft").exists()


def test_ssah_align_sharded_trains_only_its_budget(tmp_path, capsys):
    """`ssah align --budget G:RU --shard fsdp2` under torchrun: every entry outside the budget is kept."""
    tiny = ["--model", "tiny:llama"]
    spec = _groups(tmp_path, capsys, "scu=0.1,ucu=0.1,ru=0.3", "RU")
    proc = _torchrun("-m", "ssah", "align", *tiny, "--budget", spec, "--limit", "6", "--shard", "fsdp2",
                     "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--out", str(tmp_path / "al"),
                     port=29543)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "al" / "train.json").read_text())
    assert record["config"]["shard"] == "fsdp2" and record["result"]["check"]["max_abs_change_frozen"] == 0.0
    base, tuned = load_model("tiny:llama", device="cpu"), load_model(str(tmp_path / "al"), device="cpu")
    budget = load_mask(*split_mask_spec(spec))
    trainable = budget.owned_slices(base.layout)
    params, before = dict(tuned.model.named_parameters()), dict(base.model.named_parameters())
    for name, old in before.items():
        frozen = torch.ones_like(old, dtype=torch.bool)
        for (pname, dim), positions in trainable.items():
            if pname == name:
                frozen.index_fill_(dim, positions, False)
        assert torch.equal(old[frozen], params[name].detach()[frozen]), name
    assert any(not torch.equal(params[n], before[n]) for n in params)  # the budget trained
