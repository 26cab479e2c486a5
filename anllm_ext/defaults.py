"""One default per knob, shared by the Python API, the CLI, training's held-out scoring and the lm-eval backend."""

#: Prompt tokens per forward of the anchor cache's chunked prefill (the peak KV is anchors + open segment + one chunk).
PREFILL_CHUNK = 512
#: Sequences per forward when scoring (perplexity blocks, multiple-choice options, lm-eval requests).
BATCH_SIZE = 8
#: Closed sentences whose tokens the ``cached+recent`` evaluation mode keeps hot (``AnchorCache(recent=...)``): two
#: brought the technical held-out domains within 1.3x of the original's perplexity (docs/training.md).
RECENT_SENTENCES = 2
