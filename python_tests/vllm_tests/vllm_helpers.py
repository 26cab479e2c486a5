"""What the vLLM plugin tests share besides fixtures (test modules import from here, never from conftest)."""

# every engine of these tests: fp32 for exact comparisons, eager mode (no compile time), a short context
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)


def shutdown(llm) -> None:
    """Stop an offline engine's core process now (not at interpreter exit, when logging is already closed)."""
    llm.llm_engine.engine_core.shutdown()
