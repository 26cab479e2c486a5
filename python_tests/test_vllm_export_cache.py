"""The cached servable export (``anllm_ext.vllm.export.cached_export``) is redone when its source changes:
a new bundled adapter must never be served from an old merge. Needs no vLLM (the merge is replaced by a
recorder)."""
import json
import shutil

import pytest

from anllm_ext.models import bundled_anllm_dir
from anllm_ext.vllm import export


@pytest.fixture
def recorded_exports(monkeypatch, tmp_path):
    monkeypatch.setenv("ANLLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_export(model, out_dir, dtype=None):
        calls.append(str(model))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(export, "export_merged", fake_export)
    return calls


def test_cached_export_is_redone_when_the_adapter_changes(recorded_exports, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(bundled_anllm_dir(), adapter)
    target = export.cached_export(str(adapter))
    assert recorded_exports == [str(adapter)]
    assert json.loads((target / export.SOURCE_FILE).read_text())["sha256"] == export.source_fingerprint(adapter)

    assert export.cached_export(str(adapter)) == target
    assert len(recorded_exports) == 1  # unchanged source: the cached merge is reused

    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    export.cached_export(str(adapter))
    assert len(recorded_exports) == 2  # one changed byte: merged again


def test_cached_export_of_an_old_cache_without_a_stamp_is_redone(recorded_exports, tmp_path):
    stale = tmp_path / "cache" / "vllm" / "smollm2-anllm"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"anllm": {}}')  # what caches written before the stamp look like
    export.cached_export("smollm2-anllm")
    assert recorded_exports == ["smollm2-anllm"]
