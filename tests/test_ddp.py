"""Data-parallel training (2 CPU processes, gloo) keeps frozen entries bit-identical on both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "ddp_freeze.py"


def test_two_process_freeze(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    # torchrun on CPU: accelerate picks it up as MULTI_CPU with the gloo backend.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", str(SCRIPT), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["identical"] and r["max_change"] == 0.0 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # replicas stay in sync
    assert ranks[0]["steps"] == 3
