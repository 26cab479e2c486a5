"""lm-evaluation-harness backend: ``--model anllm`` runs standard tasks under anchor inference.

Importing this module registers the model type ``anllm`` with lm-eval (an optional dependency:
``pip install lm-eval``). lm-eval has no plugin discovery, so run its CLI through this module::

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m anllm_ext.lm_eval_backend run --model anllm \\
        --model_args pretrained=DIR,anchors=ep,mode=cached --tasks anllm_capitals_ep --include_path tasks

or from Python: ``import anllm_ext.lm_eval_backend`` then ``lm_eval.simple_evaluate(model="anllm", ...)``.

model_args:
    ``pretrained``: a local model directory (default: the bundled SmolLM2-135M-Instruct);
    ``anchors``: ``ep``, ``ep:<chars>``, ``ac``, ``anllm-ac``/``anllm-ep`` or ids separated by ``;``
    (``13;30``; a comma would end the argument) - default: the anchors a trained AnLLM carries, else ``ep``;
    ``mode``: ``full`` (plain model), ``ansan`` (one masked pass per sequence), ``cached`` (default:
    AnchorCache with chunked prefill and compaction; requests sharing a context prefill it once) or
    ``cached+recall`` (the same with anchor-indexed recall: ``recall_budget``, ``recall_every``, ``recall_score``,
    ``recall_index``, ``recall_pool``, ``recall_layers`` (``7;8;15``), ``recall_question`` (``true``/``false``),
    the :class:`~anllm_ext.RecallConfig` fields,
    its defaults where not given) or ``cached+recent`` (the last ``recent`` closed sentences kept hot, default 2);
    ``prefill_chunk``, ``batch_size``, ``max_length`` (the model's), ``max_gen_toks`` (256),
    ``dtype`` (``float32``/``bfloat16``/``float16``, or ``auto``: the checkpoint's, as ``load_model`` takes it),
    ``device`` (``cpu``), ``threads``. Defaults of ``prefill_chunk`` and ``batch_size``: ``anllm_ext.defaults``.

``loglikelihood`` scores (context, continuation) pairs with :func:`anllm_ext.evaluation.score_continuations`;
``loglikelihood_rolling`` cuts each text into lm-eval's rolling windows and scores them with
:func:`anllm_ext.evaluation.score_sequences`, as :func:`anllm_ext.evaluation.perplexity` does (the cached mode
prefills each window in chunks);
``generate_until`` decodes greedily (or as the task's ``gen_kwargs`` ask) with ``anllm_ext.generate``
(cached) or ``model.generate`` (full: unpatched; ansan: patched, full DynamicCache) and cuts the text
at the first stop string.
"""
from __future__ import annotations

from typing import List, Optional

import torch

try:
    import lm_eval.models  # noqa: F401  lm-eval loads its built-in models only into an empty registry
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("the lm-evaluation-harness backend needs lm-eval: pip install lm-eval") from e

from .checks import check_dtype
from .config import resolve_anchor_config
from .cache import AnchorCache
from .defaults import BATCH_SIZE, PREFILL_CHUNK, RECENT_SENTENCES
from .evaluation import model_mode, score_continuations, score_sequences
from .evaluation.modes import ALL_MODES, CACHED_MODES, RECALL_MODE, RECENT_MODE
from .evaluation.scoring import cache_options


@register_model("anllm")
class AnLLMEvalModel(TemplateLM):
    """A patched Hugging Face causal LM evaluated in one of ``anllm_ext.evaluation.modes.ALL_MODES``."""

    def __init__(self, pretrained: Optional[str] = None, anchors: Optional[str] = None, mode: str = "cached",
                 prefill_chunk: int = PREFILL_CHUNK, batch_size=BATCH_SIZE, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 dtype: str = "float32", device: Optional[str] = None, threads: int = 0, recall_budget=None,
                 recall_every=None, recall_score=None, recall_pool=None, recall_index=None,
                 recall_layers=None, recall_question=None, recent=None, **kwargs):
        super().__init__()
        from .models import load_model

        unknown = sorted(k for k in kwargs if k not in ("max_batch_size", "trust_remote_code", "parallelize"))
        if unknown:
            raise ValueError(f"anllm: unknown model_args {unknown}")
        if mode not in ALL_MODES:
            raise ValueError(f"anllm: mode must be one of {ALL_MODES}, got {mode!r}")
        self.recall = _recall_config(mode, budget=recall_budget, every=recall_every, score=recall_score,
                                     pool=recall_pool, index=recall_index, layers=recall_layers,
                                     question=recall_question)
        if recent is not None and mode != RECENT_MODE:
            raise ValueError(f"anllm: recent applies to mode={RECENT_MODE} only")
        self.recent = RECENT_SENTENCES if recent is None else int(recent)
        cache_options(mode, self.recall, self.recent)  # a bad setting fails before the model loads
        dtype = check_dtype(str(dtype))
        if threads:
            torch.set_num_threads(int(threads))
        self.mode = mode
        self.prefill_chunk = int(prefill_chunk)
        self.batch_size_per_forward = BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for (lm-eval's --device defaults to cuda) but no GPU is "
                             "available: pass --device cpu")
        model, tok = load_model(pretrained, dtype=dtype, device=device or "cpu")
        spec = None if anchors is None else str(anchors).replace(";", ",")
        self.anchors = resolve_anchor_config(spec, tok, model)  # every request runs in model_mode(.., self.anchors)
        self.model, self.tokenizer = model, tok
        self._max_length = int(max_length) if max_length else int(
            getattr(model.config, "max_position_embeddings", 2048) or 2048)

    # ------------------------------------------------------------------ tokenizer facts lm-eval asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        pairs = []
        for _, ctx, cont in requests:
            keep = self.max_length + 1 - len(cont)  # as lm-eval's HF backend: cut the context from the left
            if keep < 1:
                raise ValueError(f"anllm: a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            pairs.append((list(ctx)[-keep:], list(cont)))
        bs = int(override_bs) if override_bs else self.batch_size_per_forward
        with model_mode(self.model, self.mode, self.anchors), torch.no_grad():
            sc = score_continuations(self.model, pairs, self.mode, bs, self.prefill_chunk, progress=not disable_tqdm,
                                     recall=self.recall, recent=self.recent)
        out = list(zip(sc.logprobs, sc.greedy))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        results = []
        with model_mode(self.model, self.mode, self.anchors), torch.no_grad():
            for req in requests:
                (text,) = req.args
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                total = 0.0
                for ctx, cont in windows:
                    ((lp, _),) = score_sequences(self.model, [list(ctx) + list(cont)], self.mode, self.prefill_chunk,
                                                 recall=self.recall, recent=self.recent)
                    total += float(lp[-len(cont):].double().sum())
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                results.append(total)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from .generation import generate

        out = []
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            if not do_sample:
                kw.pop("temperature", None)
                kw.pop("top_p", None)
            ids = torch.tensor([self.tok_encode(context)], device=self.device)
            ids = ids[:, -max(1, self.max_length - max_new):]
            mask = torch.ones_like(ids)
            common = dict(max_new_tokens=max_new, do_sample=do_sample, stop_strings=until, tokenizer=self.tokenizer,
                          pad_token_id=self.eot_token_id, **kw)
            with model_mode(self.model, self.mode, self.anchors), torch.no_grad():
                if self.mode in CACHED_MODES:
                    cache = AnchorCache(self.model.config, **cache_options(self.mode, self.recall, self.recent))
                    seq = generate(self.model, ids, mask, prefill_chunk=self.prefill_chunk, cache=cache, **common)
                else:  # full: the unpatched model; ansan: the patched model with a full cache (masked attention)
                    seq = self.model.generate(input_ids=ids, attention_mask=mask, cache_implementation="dynamic",
                                              **common)
            text = self.tok_decode(seq[0, ids.shape[1]:].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def _recall_config(mode: str, **given):
    """The RecallConfig of ``cached+recall`` from the ``recall_*`` model_args (None for the other modes, which
    take none of them)."""
    from .recall import RecallConfig

    given = {k: v for k, v in given.items() if v is not None}
    if mode != RECALL_MODE:
        if given:
            raise ValueError(f"anllm: recall_{'/recall_'.join(given)} apply to mode={RECALL_MODE} only")
        return None
    if "budget" in given:
        given["budget"] = int(given["budget"])
    if "layers" in given:  # model_args are comma-separated: the layers come as 7;8;15
        try:
            given["layers"] = tuple(int(l) for l in str(given["layers"]).split(";"))
        except ValueError:
            raise ValueError(f"anllm: recall_layers takes layer indices joined by ';' (e.g. 7;8;15), "
                             f"got {given['layers']!r}") from None
    if "question" in given and not isinstance(given["question"], bool):  # lm-eval passes "true"/"false"
        flag = str(given["question"]).strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise ValueError(f"anllm: recall_question takes true or false, got {given['question']!r}")
        given["question"] = flag in ("true", "1")
    return RecallConfig(**given)


def main() -> None:
    """lm-eval's own CLI, with ``anllm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
