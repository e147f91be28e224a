"""Datasets for safety research: one record schema, built-in sets, loaders for standard files.

    from ssah.data import load_dataset
    harmful = load_dataset("harmful:test")            # built-in, one split
    adv = load_dataset("advbench:harmful_behaviors.csv")
    qa = load_dataset("jsonl:qa.jsonl?prompt=question&response=answer")
    print(len(harmful), harmful.fingerprint)

Importing this package reads no files and touches no network; built-in files are read on first use.
"""

from ssah.data.answers import NORMALIZERS, check_answer
from ssah.data.catalog import BuiltinInfo, builtin_names
from ssah.data.loading import load_dataset
from ssah.data.records import Dataset, Record, fingerprint_records
from ssah.data.tasks import generate_tasks

__all__ = [
    "NORMALIZERS", "BuiltinInfo", "Dataset", "Record", "builtin_names", "check_answer",
    "fingerprint_records", "generate_tasks", "load_dataset",
]
