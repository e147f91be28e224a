"""The faithfulness table (`ssah faithfulness`, ssah.units.faithfulness) on a tiny model, and the
maker-aligned preset on the real Qwen model where its file is present."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssah.models.loading import load_model
from ssah.units.faithfulness import FaithfulnessSpec, faithfulness_table, judge_cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = FaithfulnessSpec(scorers=("variance",), normalizations=("rank",), rankings=("global", "per-layer"),
                        sizes={"scu": 0.05, "ucu": 0.1, "ru": 0.2}, score_limit=4, samples=4, max_new_tokens=4,
                        task_tokens=4, batch_size=4, draws=2, resamples=200)
QWEN = Path("~/.cache/ssah-models/qwen2.5-coder-0.5b-instruct.gguf").expanduser()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    loaded = load_model("tiny:llama", device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = tmp_path_factory.mktemp("faith")
    found = faithfulness_table(loaded, SPEC, out, progress=False)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the table left the model pruned"
    return out, found, loaded


def test_every_cell_prunes_each_group_against_random_units_of_its_size(table):
    out, found, loaded = table
    assert [(c["scorer"], c["normalize"], c["ranking"]) for c in found["cells"]] == [
        ("variance", "rank", "global"), ("variance", "rank", "per-layer")]
    total = loaded.layout.total_units
    measured = json.loads((out / "measurements.json").read_text())["rows"]
    for cell in found["cells"]:
        for group, size in (("SCU", 0.05), ("UCU", 0.1), ("RU", 0.2)):
            block = cell["groups"][group]
            assert block["units"] == int(size * total + 0.5)
            for key in ("asr_rise", "task_drop", "perplexity_ratio"):
                low, high = block[f"{key}_ci"]
                assert low - 1e-9 <= block[key] <= high + 1e-9
                assert len(block[f"random_{key}_draws"]) == 2
                assert block[f"excess_{key}"] == pytest.approx(block[key] - block[f"random_{key}"], abs=1e-5)
            assert block["perplexity_ratio"] == pytest.approx(block["perplexity"] / found["unpruned"]["perplexity"])
        assert cell["meets"] == judge_cell(cell)
    # one unpruned state, two random draws per size, and each distinct pruned mask once
    labels = [row["label"] for row in measured.values()]
    assert labels.count("none") == 1 and sum(label.startswith("random") for label in labels) == 6
    assert len(found["random"]) == 3
    assert (out / "faithfulness.png").stat().st_size > 1000
    # pruning changes what the model does: some pruned state differs from the unpruned one
    base = measured["none"]
    assert any(row["nll"] != base["nll"] for key, row in measured.items() if key != "none")


def test_a_rerun_reuses_every_measurement(table):
    out, found, loaded = table
    stamp = (out / "measurements.json").stat().st_mtime_ns
    again = faithfulness_table(loaded, SPEC, out, progress=False)
    assert (out / "measurements.json").stat().st_mtime_ns == stamp
    assert again["cells"] == found["cells"]


def test_judge_cell_applies_both_criteria():
    def cell(scu_rise, scu_drop, random_rise, ru_ratio, ru_rise):
        return {"groups": {"SCU": {"asr_rise": scu_rise, "task_drop": scu_drop, "random_asr_rise": random_rise},
                           "RU": {"perplexity_ratio": ru_ratio, "asr_rise": ru_rise}}}

    assert judge_cell(cell(0.25, 0.0, 0.05, 1.2, -0.05)) == {"scu": True, "ru": True}
    assert judge_cell(cell(0.25, 0.08, 0.05, 1.31, 0.0)) == {"scu": False, "ru": False}
    assert judge_cell(cell(0.19, 0.0, 0.0, 1.0, 0.11)) == {"scu": False, "ru": False}
    assert judge_cell(cell(0.30, 0.0, 0.11, 1.0, -0.10)) == {"scu": False, "ru": True}


def test_cli_rejects_an_unknown_scorer_in_one_line_before_loading(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssah", "faithfulness", "--model", "tiny:llama", "--out",
                           str(tmp_path / "t"), "--scorers", "variance,nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
@pytest.mark.skipif(not QWEN.is_file(), reason=f"{QWEN} is absent (bash ../shared/models/qwen2.5-coder-0.5b.sh "
                    "assembles it)")
def test_maker_aligned_preset_studies_the_qwen_model_as_shipped():
    from ssah.config import load_config

    config = load_config("maker-aligned")
    assert not config.align.enabled and config.eval.max_new_tokens >= 32
    assert set(config.eval.rules) == {"prefix", "keywords"}
    loaded = load_model(config.model, device="cpu")
    assert loaded.layout.num_layers == 24 and loaded.model.config.model_type == "qwen2"
