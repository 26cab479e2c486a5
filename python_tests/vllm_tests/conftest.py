"""Tests of the vLLM plugin (anllm_ext.vllm). They need vLLM (`make test-vllm` builds its own virtualenv);
where vLLM is absent (the main .venv) nothing here is collected, so `make test` never imports vLLM."""
import importlib.util
import os

import pytest

from vllm_helpers import sentences

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    # a small KV pool (GiB) and one OpenMP thread pool sized for the shared 2-core machine
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def anllm_dir():
    """The bundled AnLLM merged into a servable directory without its attention sink (``export --sink 0``: the
    plain kept-slot rule most tests check; exported once, cached under ~/.cache/anllm_ext)."""
    from anllm_ext.vllm.export import cached_export

    return cached_export("smollm2-anllm", sink=0)


@pytest.fixture(scope="session")
def anllm_sink_dir():
    """The bundled AnLLM exported with its attention sink of one token (``export --sink 1``, what a plain export
    of it serves; cached too)."""
    from anllm_ext.vllm.export import cached_export

    return cached_export("smollm2-anllm", sink=1)


@pytest.fixture(scope="session")
def plain_dir():
    """The bundled SmolLM2-135M-Instruct (no anchor configuration)."""
    from anllm_ext.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def prompts():
    """20 prompts of 1 to 64 sentences (a few tokens to ~1,600), different lengths, many anchors."""
    sents = sentences()
    counts = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 24, 28, 34, 40, 52, 64]
    out, start = [], 0
    for i, n in enumerate(counts):
        out.append(" ".join(sents[(start + k) % len(sents)] for k in range(n)))
        start += 7 * i + 3
    return out


@pytest.fixture(scope="session")
def tokenizer(anllm_dir):
    """The exported AnLLM's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(anllm_dir), local_files_only=True)


@pytest.fixture(scope="session")
def anchor_ids(anllm_dir):
    """The exported AnLLM's anchor ids (numpy, for the kept-slot rule)."""
    import numpy as np

    from anllm_ext.config import AnchorConfig

    return np.asarray(AnchorConfig.find_pretrained(anllm_dir).anchor_ids)
