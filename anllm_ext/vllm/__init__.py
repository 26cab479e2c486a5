"""anllm_ext.vllm: serve AnLLMs with vLLM (docs/vllm.md).

- :func:`register`: vLLM's plugin entry point (``vllm.general_plugins`` in setup.py); AnLLMs (a config with
  an anchor configuration) get AnSAN attention (``anllm_ext.vllm.backend``) and compaction of their paged KV
  cache (``anllm_ext.vllm.scheduler``, ``anllm_ext.vllm.compaction``), other models run as in plain vLLM;
- ``python -m anllm_ext.vllm.export smollm2-anllm OUT_DIR``: a servable merged directory of an adapter
  (``anllm_ext.vllm.export``).

Importing this package does not import vLLM.
"""


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point."""
    from .plugin import register as _register

    _register()
