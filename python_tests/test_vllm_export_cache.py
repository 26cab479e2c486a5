"""The cached servable export (``anllm_ext.vllm.export.cached_export``) is redone when its source changes:
a new bundled adapter must never be served from an old merge, nor an export made with another attention sink.
Needs no vLLM (the merge is replaced by a recorder)."""
import json
import shutil

import pytest

from anllm_ext.models import bundled_anllm_dir
from anllm_ext.vllm import export


@pytest.fixture
def recorded_exports(monkeypatch, tmp_path):
    monkeypatch.setenv("ANLLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_export(model, out_dir, dtype=None, sink=None):
        calls.append(str(model) if sink is None else (str(model), sink))
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


def test_cached_export_with_a_sink_is_its_own(recorded_exports, tmp_path):
    """An export with ``sink`` lives beside the one without (a test session serves both) and is redone when
    its stamp names another sink."""
    adapter = tmp_path / "adapter"
    shutil.copytree(bundled_anllm_dir(), adapter)
    plain = export.cached_export(str(adapter))
    with_sink = export.cached_export(str(adapter), sink=1)
    assert with_sink != plain and recorded_exports == [str(adapter), (str(adapter), 1)]
    assert json.loads((with_sink / export.SOURCE_FILE).read_text())["sink"] == 1
    assert export.cached_export(str(adapter)) == plain and export.cached_export(str(adapter), sink=1) == with_sink
    assert len(recorded_exports) == 2  # both reused

    stamp = with_sink / export.SOURCE_FILE
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "sink": 2}))  # made with another sink
    export.cached_export(str(adapter), sink=1)
    assert recorded_exports[2:] == [(str(adapter), 1)]
