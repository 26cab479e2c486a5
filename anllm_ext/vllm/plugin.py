"""vLLM's ``vllm.general_plugins`` entry point (setup.py): :func:`register`, run in every vLLM process.

It changes two things, and only for AnLLMs (models whose config carries an anchor configuration,
:func:`anllm_ext.vllm.detect.anchor_config_of`); any other model runs exactly as in plain vLLM:

- ``EngineArgs.create_engine_config``: the finished config of an AnLLM is checked
  (:func:`check_engine_config`), so an unsupported combination fails at engine start with a clear message,
  and gets :class:`anllm_ext.vllm.scheduler.AnchorScheduler` (compaction: dropped slots' blocks go back to
  vLLM's pool);
- the platform's attention-backend choice: an AnLLM gets :class:`anllm_ext.vllm.backend.AnchorAttentionBackend`.

The one engine setting of its own, recent sentences kept hot, is vLLM's ``additional_config={"anllm_recent": N}``
(``--additional-config``; :func:`anllm_ext.vllm.detect.recent_of`), part of the engine config that vLLM hands
to the scheduler and every worker. The attention sink is the model's (its anchor configuration's ``sink``);
:func:`anllm_ext.vllm.detect.keep_rule` makes the kept-slot rule of the two.
"""
from __future__ import annotations

import functools

from ..errors import UnsupportedError
from .detect import RECENT_KEY, anchor_config_of, keep_rule, recent_of

BACKEND_NAME = "ANLLM_ANCHOR"
BACKEND_PATH = "anllm_ext.vllm.backend.AnchorAttentionBackend"
SCHEDULER_PATH = "anllm_ext.vllm.scheduler.AnchorScheduler"
_registered = False


def register() -> None:
    """Install the two wrappers (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(BACKEND_NAME, BACKEND_PATH)  # vLLM looks backends up by their get_name()

    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        config = original_create(self, *args, **kwargs)
        check_engine_config(config)
        if anchor_config_of(config.model_config) is not None:  # compaction: the scheduler frees dropped slots
            config.scheduler_config.scheduler_cls = SCHEDULER_PATH
        return config

    EngineArgs.create_engine_config = create_engine_config

    platform_cls = type(current_platform)
    original_select = platform_cls.get_attn_backend_cls

    @functools.wraps(original_select)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if config is None or anchor_config_of(config.model_config) is None:
            return original_select(selected_backend, attn_selector_config, *args, **kwargs)
        _check_layer(attn_selector_config)
        from vllm.logger import init_logger

        from . import runner_state

        runner_state.install(keep_rule(config))
        # under "vllm.": the logger namespace vLLM configures
        init_logger("vllm.plugins.anllm_ext").info("anllm_ext: %s is an AnLLM; attention backend %s",
                                                   config.model_config.model, BACKEND_NAME)
        return BACKEND_PATH

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _registered = True


def check_engine_config(config) -> None:
    """Raise :class:`~anllm_ext.UnsupportedError` naming every option an AnLLM cannot run with; for other models
    only a recent-sentence setting (it has no meaning there). A bad ``anllm_recent`` raises TypeError /
    ValueError for any model."""
    recent = recent_of(config)
    anchors = anchor_config_of(config.model_config)
    if anchors is None:
        if recent:
            raise UnsupportedError(
                f"additional_config {RECENT_KEY}={recent} keeps recent sentences of an AnLLM, but "
                f"{config.model_config.model} has no anchor configuration (drop the setting, or pass the anchors "
                "with hf_overrides)")
        return
    mc, cc, pc, sc = config.model_config, config.cache_config, config.parallel_config, config.scheduler_config
    problems = []
    if config.speculative_config is not None:
        problems.append("speculative decoding (drafted tokens would need the AnSAN layout of unverified tokens)")
    if mc.get_sliding_window() is not None or getattr(mc.hf_text_config, "layer_types", None) and any(
            t != "full_attention" for t in mc.hf_text_config.layer_types):
        problems.append("sliding-window / non-full-attention layers (the AnSAN mask needs every earlier anchor)")
    if cc.cache_dtype != "auto":
        problems.append(f"kv_cache_dtype={cc.cache_dtype!r} (the anchor backend stores keys/values in the model dtype)")
    if pc.pipeline_parallel_size > 1:
        problems.append("pipeline_parallel_size > 1 (untested)")
    if pc.prefill_context_parallel_size > 1 or pc.decode_context_parallel_size > 1:
        problems.append("context parallelism (the KV of one request split across ranks)")
    if sc.async_scheduling:
        problems.append("async scheduling (the step's last sampled tokens are not yet in the runner's token ids); "
                        "pass async_scheduling=False")
    if config.kv_transfer_config is not None:
        problems.append("KV connectors / KV transfer or offloading (they move token-aligned blocks; compaction "
                        "keeps a request's anchors and open segment at the front of its blocks)")
    if sc.scheduler_cls not in (None, SCHEDULER_PATH):
        problems.append(f"scheduler_cls={sc.scheduler_cls!r} (compaction needs anllm_ext's scheduler)")
    if recent and cc.enable_prefix_caching:
        problems.append(f"prefix caching with {RECENT_KEY}={recent} (a reusable block holds anchors only, the recent "
                        "sentences a request also keeps are in no cached block); pass enable_prefix_caching=False "
                        "(--no-enable-prefix-caching)")
    if mc.is_hybrid or getattr(mc, "is_encoder_decoder", False) or getattr(mc, "use_mla", False):
        problems.append("hybrid, MLA or encoder-decoder models")
    if problems:
        raise UnsupportedError(
            f"anllm_ext's vLLM plugin serves the AnLLM {mc.model} (anchors: {anchors.mode}) but not with: "
            + "; ".join(problems))


def _check_layer(selector) -> None:
    """The same refusals for one attention layer (a config built without EngineArgs)."""
    bad = [name for name, yes in (("MLA", selector.use_mla), ("sparse attention", selector.use_sparse),
                                  ("a sliding window", selector.has_sliding_window),
                                  ("attention sinks", selector.has_sink),
                                  (f"kv_cache_dtype={selector.kv_cache_dtype}", selector.kv_cache_dtype not in (None, "auto")),
                                  (f"attention type {selector.attn_type}", selector.attn_type != "decoder"))
           if yes]
    if bad:
        raise UnsupportedError(f"anllm_ext's AnSAN attention for vLLM does not support {', '.join(bad)}")
