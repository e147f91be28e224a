"""The README's Python API block runs as printed (on a tiny model) and keeps frozen entries frozen."""

import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_block_runs(tmp_path):
    from transformers import TrainingArguments

    from ssah.data.chat import collate_pairs, encode_pair
    from ssah.models.tiny import tiny_tokenizer

    code = _api_block()
    steps = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    assert '"builtin:smollm2-135m-instruct"' in code and len(steps) <= 6
    tokenizer = tiny_tokenizer()

    def collate(batch):
        out = collate_pairs(batch, tokenizer.pad_token_id)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                "labels": out["input_ids"].masked_fill(~out["response_mask"], -100)}

    namespace = {
        "args": TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                  learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                                  logging_strategy="no", use_cpu=True, remove_unused_columns=False),
        "data": [encode_pair(tokenizer, "Say hi.", "Hi!"), encode_pair(tokenizer, "Name a colour.", "Blue.")],
        "collate": collate,
    }
    torch.manual_seed(0)
    exec(compile(code.replace("builtin:smollm2-135m-instruct", "tiny:llama"), "README.md", "exec"), namespace)
    check = namespace["freezer"].check()
    assert check["max_abs_change_frozen"] == 0.0 and check["frozen_entries"] > 0
    assert namespace["groups"].counts()["SCU"] > 0


def test_import_ssah_stays_cheap():
    """The top-level names load their modules lazily: `import ssah` pulls in no torch."""
    code = "import sys, ssah; assert 'torch' not in sys.modules; ssah.parse_sizes; print(sorted(dir(ssah))[:2])"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_every_command_help_stays_cheap():
    """Options and their defaults come from torch-free modules: `ssah CMD --help` imports no torch."""
    code = ("import sys\nfrom ssah.cli import SUBCOMMANDS, main\n"
            "for name in SUBCOMMANDS:\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
            "    assert 'torch' not in sys.modules, name\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_readme_yaml_configs_load(tmp_path):
    """Every ssah config printed in the README passes validation as printed (accelerate's are not ours)."""
    from ssah.config import load_config

    blocks = [block for block in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
              if "distributed_type:" not in block]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block, encoding="utf-8")
        load_config(path=path)
