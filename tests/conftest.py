from pathlib import Path

import pytest
import torch


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sbs"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """The fast tests' models are tiny: a second thread costs more in synchronisation than it
    gains (the training tests ran 2.6x faster on one). Slow tests, with real models, keep all."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """All shared state (annotation store, model cache) in a temp dir: tests never touch ~/.cache."""
    monkeypatch.setenv("STEPDISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
