"""Shared fixtures. Tests never reach a model hub; tiny random models stand in for real ones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ssah.models.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

torch.set_num_threads(2)

TINY_RUN_CONFIG = Path(__file__).parent / "data" / "tiny_run.yaml"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spin badly on a busy 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    """Every supported family, one test case each."""
    return request.param


@pytest.fixture
def tiny(family):
    """(model, tokenizer) of a tiny random model of `family`."""
    return tiny_model(family)


@pytest.fixture(scope="session")
def builtin_model():
    """The real built-in model (SmolLM2-135M-Instruct); slow tests only."""
    from ssah.models.loading import load_model

    try:
        return load_model("builtin:smollm2-135m-instruct", device="cpu")
    except Exception as err:  # pragma: no cover - shows the install step in CI output
        pytest.fail(f"built-in model unavailable: {err}")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """(run folder, {stage: summary}) of the whole pipeline on tests/data/tiny_run.yaml, run once per
    session and shared (test_pipeline, test_report); tests that write into a run folder copy it first."""
    from ssah.config import load_config
    from ssah.pipeline import run_pipeline

    tmp_path = tmp_path_factory.mktemp("full")
    return tmp_path, run_pipeline(load_config(path=TINY_RUN_CONFIG), tmp_path)
