"""A model without an anchor configuration runs as in plain vLLM; an AnLLM with an unsupported option fails
at engine start (the engine config) with a message that names it; the detection and export helpers."""
import json
import shutil

import pytest
import torch

from vllm_helpers import ENGINE_ARGS, engine_config, shutdown

from anllm_ext import UnsupportedError
from anllm_ext.vllm.detect import anchor_config_of


def test_exported_directory_carries_the_anchor_config(anllm_dir):
    data = json.loads((anllm_dir / "config.json").read_text())
    assert data["anllm"]["mode"] == "ep" and 30 in data["anllm"]["anchor_ids"]
    assert any(anllm_dir.glob("*.safetensors")) and (anllm_dir / "tokenizer.json").is_file()
    assert anchor_config_of(engine_config(anllm_dir).model_config).anchor_ids == data["anllm"]["anchor_ids"]


def test_plain_model_is_not_detected(plain_dir):
    assert anchor_config_of(engine_config(plain_dir).model_config) is None


def test_anllm_config_json_beside_the_weights_is_detected(anllm_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(anllm_dir, d)
    config = json.loads((d / "config.json").read_text())
    anchors = config.pop("anllm")
    (d / "config.json").write_text(json.dumps(config))
    assert anchor_config_of(engine_config(d).model_config) is None
    (d / "anllm_config.json").write_text(json.dumps(anchors))
    assert anchor_config_of(engine_config(d).model_config).anchor_ids == anchors["anchor_ids"]


def test_hf_overrides_switch_the_plugin_on_for_a_directory_without_anchors(anllm_dir, plain_dir):
    """The explicit switch: vLLM's own ``hf_overrides`` (``--hf-overrides`` of ``vllm serve``) adds the anchor
    configuration to a model directory that carries none; the engine config is then an AnLLM's, refusals
    included."""
    anchors = json.loads((anllm_dir / "config.json").read_text())["anllm"]
    config = engine_config(plain_dir, hf_overrides={"anllm": anchors})
    assert anchor_config_of(config.model_config).anchor_ids == anchors["anchor_ids"]
    from anllm_ext.vllm.plugin import SCHEDULER_PATH

    assert config.scheduler_config.scheduler_cls == SCHEDULER_PATH  # compaction on
    assert engine_config(plain_dir).scheduler_config.scheduler_cls != SCHEDULER_PATH
    with pytest.raises(UnsupportedError, match="kv_cache_dtype"):
        engine_config(plain_dir, hf_overrides={"anllm": anchors}, kv_cache_dtype="fp8")


@pytest.mark.parametrize("option, words", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
     "speculative decoding"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}), "KV connectors"),
])
def test_unsupported_option_fails_at_engine_start(anllm_dir, plain_dir, option, words):
    with pytest.raises(UnsupportedError, match=words.replace("(", r"\(")):
        engine_config(anllm_dir, **option)
    engine_config(plain_dir, **option)  # plain vLLM accepts it: the refusal is the plugin's, for AnLLMs only


def test_export_refuses_a_model_without_anchors(plain_dir, tmp_path):
    from anllm_ext.vllm.export import export_merged

    with pytest.raises(ValueError, match="no anchor configuration"):
        export_merged(str(plain_dir), tmp_path / "out")


def test_plain_model_generates_as_full_attention_transformers(plain_dir, prompts):
    """The plugin is installed but the model is no AnLLM: vLLM's own attention, equal to transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(str(plain_dir), local_files_only=True)
    ids = [tok(p)["input_ids"] for p in prompts[10:14]]
    llm = LLM(model=str(plain_dir), **ENGINE_ARGS)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(temperature=0.0, max_tokens=8),
                        use_tqdm=False)
    shutdown(llm)
    model = AutoModelForCausalLM.from_pretrained(str(plain_dir), local_files_only=True, dtype=torch.float32).eval()
    for i, o in zip(ids, outs):
        x = torch.tensor([i])
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)[0, len(i):]
        assert list(o.outputs[0].token_ids) == ref.tolist()
