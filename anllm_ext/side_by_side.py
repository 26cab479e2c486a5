"""The full cache and the anchor cache (with anchor-indexed recall too, if asked) side by side: one timed generation
each, with their KV figures (:func:`compare_caches`), and the report ``anllm generate`` and ``make demo`` print
(:func:`print_comparison`)."""
from __future__ import annotations

import time
from typing import List, Optional

import torch
from transformers import DynamicCache

from .cache import AnchorCache, cache_kv_bytes
from .console import progress_bar, text_table
from .defaults import PREFILL_CHUNK
from .generation import generate
from .hf import cache_kwarg, unpatched

EXTRA = "anchor cache + "  # the label of a run of the anchor cache with more kept (recent sentences, recall)


class _Timer:
    """A transformers streamer that timestamps the first generated token and shows a tqdm bar."""

    def __init__(self, total_new: int, desc: str, show: bool):
        self.t_first = None
        self.n_new = 0
        self._seen_prompt = False
        self.bar = progress_bar(total_new, desc, show)

    def put(self, value):
        if not self._seen_prompt:  # generate() first puts the prompt
            self._seen_prompt = True
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n_new += 1
        if self.bar is not None:
            self.bar.update(1)

    def end(self):
        if self.bar is not None:
            self.bar.close()


def timed_generate(model, ids: torch.Tensor, mask: torch.Tensor, *, anchor: bool, anchor_ids,
                   max_new_tokens: int, label: Optional[str] = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   ignore_eos: bool = False, seed: int = 0, prefill_chunk: int = PREFILL_CHUNK, progress: bool = False,
                   recall=None, recent: int = 0) -> dict:
    """One generation with the anchor cache (``anchor``: chunked prefill, :func:`anllm_ext.generate`; ``recall``:
    its :class:`~anllm_ext.RecallConfig`; ``recent``: the closed sentences it keeps hot) or with transformers' full ``DynamicCache`` on the unpatched model;
    returns the output ids and the figures: ``label, anchor, ids, new, prefill_s, prefill_tps, decode_tps, kv,
    peak, slots, cold`` (hot KV bytes at the end, recalled ones included, and at the peak; hot key/value slots
    over the batch; the bytes recall keeps cold, None without recall)."""
    n_prompt = ids.shape[1]
    label = label or ("anchor cache" if anchor else "full cache")
    # the anchor run's bar comes from anllm_ext.generate (prefill chunks + decoding)
    timer = _Timer(max_new_tokens, f"{label}: decode", progress and not anchor)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=timer)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
    if ignore_eos:
        gen_kwargs["eos_token_id"] = None
    t0 = time.perf_counter()
    if anchor:
        out, cache = generate(model, ids, mask, prefill_chunk=prefill_chunk, anchor_ids=anchor_ids,
                              cache=AnchorCache(model.config, recall=recall, recent=recent), return_cache=True, progress=progress,
                              **gen_kwargs)
    else:
        cache = DynamicCache(config=model.config)  # the baseline: the plain (unpatched) model, its own cache
        with unpatched(model), torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, **gen_kwargs)
    t1 = time.perf_counter()
    timer.end()
    t_first = timer.t_first or t1
    n_new = out.shape[1] - n_prompt
    cold = None
    if anchor:
        st = cache.stats()
        kv, peak = st["kv_bytes"], st["peak_kv_bytes"]
        kept = sum(st["kept_slots"])
        if recall is not None:  # what the last forward recalled is hot too
            kv, cold = st["hot_kv_bytes"], st["cold_kv_bytes"]
            kept += sum(st["recalled_slots"])
    else:
        kv = peak = cache_kv_bytes(cache)  # a DynamicCache only grows
        kept = cache.get_seq_length() * ids.shape[0]
    return {
        "label": label,
        "anchor": anchor,
        "ids": out,
        "new": n_new,
        "prefill_s": t_first - t0,
        "prefill_tps": n_prompt * ids.shape[0] / max(t_first - t0, 1e-9),
        "decode_tps": (n_new - 1) / (t1 - t_first) if n_new > 1 and t1 > t_first else float("nan"),
        "kv": kv,
        "peak": peak,
        "slots": kept,
        "cold": cold,
    }


def first_difference(full, anc, n_prompt: int) -> str:
    """Where the two runs' generated tokens part (first row of the batch), as a note for the summary line."""
    a, b = full["ids"][0, n_prompt:].tolist(), anc["ids"][0, n_prompt:].tolist()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f" (they part at generated token {i + 1})"
    if len(a) != len(b):
        return f" (one stops after {min(len(a), len(b))} generated tokens)"
    return ""


def compare_caches(model, ids: torch.Tensor, anchors, *, full: bool = True, original=None, recall=None,
                   recent: int = 0, **settings) -> List[dict]:
    """The same generation with ``original`` (the model before its conversion, if given) and with transformers'
    full cache (unless ``full`` is False), then with the anchor cache of ``anchors`` (an
    :class:`~anllm_ext.config.AnchorConfig`), then (``recent`` > 0) with the anchor cache keeping the last ``recent``
    closed sentences hot, then (``recall``: a :class:`~anllm_ext.RecallConfig`) with the anchor cache and recall;
    ``settings``: :func:`timed_generate`'s keywords. Returns the runs' figures in that order."""
    mask = torch.ones_like(ids)
    runs = []
    if original is not None:
        runs.append(timed_generate(original, ids, mask, anchor=False, anchor_ids=anchors,
                                   label="original, full cache", **settings))
    if full:
        runs.append(timed_generate(model, ids, mask, anchor=False, anchor_ids=anchors, **settings))
    runs.append(timed_generate(model, ids, mask, anchor=True, anchor_ids=anchors, **settings))
    if recent:
        runs.append(timed_generate(model, ids, mask, anchor=True, anchor_ids=anchors, recent=recent,
                                   label=f"{EXTRA}recent {recent}", **settings))
    if recall is not None:
        runs.append(timed_generate(model, ids, mask, anchor=True, anchor_ids=anchors, recall=recall,
                                   label=f"{EXTRA}recall", **settings))
    return runs


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


def print_comparison(tokenizer, ids: torch.Tensor, runs: List[dict], anchors, trained: bool,
                     expect: Optional[str] = None) -> None:
    """Every run's generated text (as generated, blank lines included), then their figures side by side and the
    anchor-cache runs (plain, with recent sentences, with recall) each against the last full-cache run: the KV reduction, the decode
    speed-up and whether the tokens agree. ``trained``: the model carries an anchor configuration (else a note
    says that an untrained model loses quality under anchor inference). ``expect``: a text the right answer contains; each
    run says whether its answer does."""
    from .anchors import decode

    n_prompt = ids.shape[1]
    texts = [decode(tokenizer, r["ids"][0, n_prompt:], anchor_ids=anchors.anchor_ids, skip_special_tokens=True)
             for r in runs]
    for r, text in zip(runs, texts):
        print(f"\n--- generated ({r['label']}) ---")
        print(text)
        print("-" * 32)
    print()
    rows = [("", *[r["label"] for r in runs])]
    rows.append(("KV slots kept", *[str(r["slots"]) for r in runs]))
    rows.append(("KV bytes", *[_human(r["kv"]) for r in runs]))
    rows.append(("peak KV bytes", *[_human(r["peak"]) for r in runs]))
    if any(r["cold"] is not None for r in runs):
        rows.append(("cold KV bytes (recall)", *["-" if r["cold"] is None else _human(r["cold"]) for r in runs]))
    rows.append(("prefill tokens/s", *[f"{r['prefill_tps']:.1f}" for r in runs]))
    rows.append(("decode tokens/s", *[f"{r['decode_tps']:.2f}" for r in runs]))
    if expect is not None:
        rows.append((f"answer has {expect!r}", *["yes" if expect.lower() in t.lower() else "NO" for t in texts]))
    print(text_table(rows))
    full = next((r for r in reversed(runs) if not r["anchor"]), None)
    if full is None:
        return
    same_all = True
    for anc in (r for r in runs if r["anchor"]):
        who = "" if anc["label"] == "anchor cache" else f"{anc['label']}: "
        print(f"\n{who}KV reduction (C-down) against the {full['label']}: "
              f"{100 * (1 - anc['kv'] / max(full['kv'], 1)):.1f}% at the end, "
              f"peak {100 * (1 - anc['peak'] / max(full['peak'], 1)):.1f}%")
        print(f"{who}decode speed-up (T-up): {anc['decode_tps'] / full['decode_tps']:.2f}x")
        same = torch.equal(full["ids"], anc["ids"])
        same_all &= same
        parted = first_difference(full, anc, n_prompt)
        print(f"{who}same tokens as the {full['label']}: {'yes' if same else 'no'}{parted}")
    if expect is not None:
        print(_expect_verdict(expect, runs, texts))
    if not same_all and not trained:
        print("note: a model not trained with AnSAN (anchor attention) loses quality under anchor inference; "
              "the memory and speed mechanics are the same")


def _expect_verdict(expect: str, runs: List[dict], texts: List[str]) -> str:
    """One line naming where the expected fact was lost: beyond the model (the original's full attention misses it
    too), by the conversion (the AnLLM's own full attention misses it, the original's finds it), by the anchor
    cache (only the compressed run misses it), or nowhere; then, per run of the anchor cache with more (recent
    sentences, recall: the last runs), a line saying whether its answer holds it."""
    has = {r["label"]: expect.lower() in t.lower() for r, t in zip(runs, texts)}
    if runs[-1]["label"].startswith(EXTRA):
        rest = _expect_verdict(expect, runs[:-1], texts[:-1])
        found = "holds" if has[runs[-1]["label"]] else "misses"
        return f"{rest}\nwith {runs[-1]['label'][len(EXTRA):]}: the answer {found} {expect!r}"
    if has["anchor cache"]:
        return f"the anchor cache's answer holds {expect!r}"
    if has.get("full cache") is False:
        original = has.get("original, full cache")
        if original is False:
            return (f"failure: the original model misses {expect!r} too, with its full cache: neither the conversion "
                    "nor the anchor cache lost it, the question is beyond the model")
        return (f"failure: the AnLLM misses {expect!r} with its full cache too, so the anchor cache did not lose it; "
                + ("the conversion did (the original model finds it)" if original
                   else "whether the conversion did, --original shows"))
    if has.get("full cache"):
        return (f"failure: only the anchor cache misses {expect!r}: what the dropped tokens said did not reach "
                "their anchors")
    return f"failure: the anchor cache's answer misses {expect!r}"
