"""Anchor conventions of AnLLM (see docs/method.md): AC (an added ``<AC>`` token) and EP (end punctuation).

EP mode
    :func:`ep_anchor_ids` finds every vocabulary id whose token ends a sentence with a period. BPE
    vocabularies merge the period with neighbouring characters (SmolLM2 has ``".)"``, ``")."``,
    ``"."``, ``"\\"."``, ...), so the single id of ``"."`` misses sentence ends. Rule: decode each
    id alone, strip whitespace; the token is an anchor when what is left is exactly one sentence
    punctuation mark (``"."`` by default; pass ``punctuation=".!?"`` for more) with only closing
    brackets or quotes ``) ] } " ' ” ’ » ` *`` before and/or after it. Excluded on purpose:
    ellipses (``"..."``), tokens with letters or digits (``"etc."``), and identifiers such as
    ``"._"`` or ``".__"``.

AC mode
    :func:`add_ac_token` adds the special token ``<AC>`` to the tokenizer and resizes the model's
    embeddings, initialising the new input/output rows from the row of ``"."`` (the authors' code)
    or from the mean of the matrix (the paper). :func:`insert_ac` appends ``<AC>`` after every
    sentence of a text with a small rule-based splitter (no downloads, no NLTK), and
    :func:`fewshot_prompt` after every few-shot demonstration. :func:`decode` hides ``<AC>``.

Released AnLLM checkpoints (Llama-2 vocabulary): :data:`PRESETS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

#: The special token that AC mode appends after every sentence (and every few-shot demonstration).
AC_TOKEN = "<AC>"
CLOSERS = ")]}\"'”’»`*"


@dataclass(frozen=True)
class AnchorPreset:
    """The anchor ids of a released checkpoint, with the token each id must be in its vocabulary."""

    mode: str  # "ac" or "ep"
    anchor_ids: Tuple[int, ...]
    pad_id: Optional[int] = None
    description: str = ""
    anchor_tokens: Tuple[str, ...] = ()  # the token at each anchor id in the checkpoint's tokenizer
    pad_token: Optional[str] = None  # the token at pad_id

    def check(self, tokenizer) -> None:
        """Raise ``ValueError`` unless ``tokenizer`` has this preset's tokens at its ids: a preset on another
        vocabulary would run with anchors that are ordinary tokens (or none), silently."""
        expected = list(zip(self.anchor_ids, self.anchor_tokens))
        if self.pad_id is not None and self.pad_token is not None:
            expected.append((self.pad_id, self.pad_token))
        for token_id, text in expected:
            found = _token_text(tokenizer, token_id)
            if found is None or (found != text and found.strip() != text):
                where = "is not in this vocabulary" if found is None else f"is {found!r} in this tokenizer"
                raise ValueError(
                    f"anchor preset {self.description!r} needs {text!r} at id {token_id}, but id {token_id} {where}; "
                    "presets fit the released AnLLM checkpoints only. For other models use 'ep', 'ac' or ids"
                )

    def apply(self, tokenizer, model=None) -> List[int]:
        """Check the tokenizer (:meth:`check`), give it the checkpoint's padding token when it has none (and
        ``model.generation_config`` its ``pad_token_id``), and return the anchor ids."""
        self.check(tokenizer)
        if self.pad_id is not None:
            if getattr(tokenizer, "pad_token_id", None) is None:
                tokenizer.pad_token = _token_text(tokenizer, self.pad_id)
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(gen, "pad_token_id", None) is None:
                gen.pad_token_id = self.pad_id
        return list(self.anchor_ids)


def _token_text(tokenizer, token_id: int) -> Optional[str]:
    """The token string of ``token_id`` (None when the id is outside the vocabulary)."""
    if token_id < 0 or token_id >= len(tokenizer):
        return None
    text = tokenizer.convert_ids_to_tokens(token_id)
    return text if isinstance(text, str) else None


#: :class:`AnchorPreset` of the released AnLLM checkpoints (Llama-2 vocabulary): ``"anllm-ac"``, ``"anllm-ep"``.
PRESETS = {
    "anllm-ac": AnchorPreset("ac", (32001,), 32000, "AnLLM-AC (Llama-2-7B): <AC> = 32001, [PAD] = 32000",
                             (AC_TOKEN,), "[PAD]"),
    "anllm-ep": AnchorPreset("ep", (29889,), None, "AnLLM-EP (Llama-2-7B): '.' = 29889", (".",)),
}


def _sentence_end_regex(punctuation: str) -> "re.Pattern":
    closers = re.escape(CLOSERS)
    return re.compile(rf"^[{closers}]*[{re.escape(punctuation)}][{closers}]*$")


def is_sentence_end_token(text: str, punctuation: str = ".") -> bool:
    """The documented EP rule on one token's decoded text (see the module docstring)."""
    return bool(_sentence_end_regex(punctuation).match(text.strip()))


def ep_anchor_ids(tokenizer, punctuation: str = ".") -> List[int]:
    """All vocabulary ids that end a sentence with ``punctuation`` (EP anchors), sorted."""
    if not punctuation:
        raise ValueError("punctuation must name at least one character")
    pattern = _sentence_end_regex(punctuation)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if pattern.match(text.strip()):
            ids.append(i)
    if not ids:
        raise ValueError(f"no token of this vocabulary ends a sentence with {punctuation!r}")
    return ids


def add_ac_token(tokenizer, model=None, init: str = "period", token: str = AC_TOKEN) -> int:
    """Add ``<AC>`` as a special token (and resize ``model``'s embeddings); returns its id.

    ``init``: ``"period"`` copies the embedding (and untied output) row of ``"."`` (authors' code);
    ``"mean"`` uses the mean of the matrix (paper). Adding it twice returns the existing id.
    """
    if init not in ("period", "mean"):
        raise ValueError("init must be 'period' or 'mean'")
    existing = tokenizer.convert_tokens_to_ids(token)
    if existing is not None and existing != tokenizer.unk_token_id and token in tokenizer.get_vocab():
        ac_id = existing
        added = False
    else:
        tokenizer.add_tokens([token], special_tokens=True)  # same call in transformers 4.x and 5.x
        ac_id = tokenizer.convert_tokens_to_ids(token)
        added = True
    if model is not None and (added or model.get_input_embeddings().weight.shape[0] <= ac_id):
        period_ids = tokenizer.encode(".", add_special_tokens=False)
        if init == "period" and len(period_ids) != 1:
            raise ValueError(f"'.' is not a single token in this vocabulary ({period_ids}); use init='mean'")
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(max(len(tokenizer), ac_id + 1), mean_resizing=False)
        with torch.no_grad():
            mats = [model.get_input_embeddings().weight]
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != mats[0].data_ptr():
                mats.append(out.weight)
            for w in mats:
                src = w[period_ids[0]] if init == "period" else w[:old].mean(dim=0)
                w[old:] = src
    return ac_id


# ------------------------------------------------------------------------ rule-based sentence splitter
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "fig", "no", "vol",
    "approx", "inc", "ltd", "co", "corp", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "a.m", "p.m", "al", "ed", "eds", "pp", "op",
}
_END = re.compile(r"([.!?]+)([" + re.escape(CLOSERS) + r"]*)(?=\s|$)")


def split_sentences(text: str) -> List[str]:
    """Split ``text`` into sentences; concatenating the result gives ``text`` back.

    Rules: a sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes/brackets) followed by
    whitespace or the end of the text, unless the word before a period is a known abbreviation
    (``Mr.``, ``e.g.``, ...) or a single letter (initials), or the next word starts in lower case.
    A blank line also ends a sentence. Whitespace after a sentence stays with it.
    """
    pieces: List[str] = []
    start = 0
    for m in _END.finditer(text):
        end = m.end()
        if m.group(1) == ".":
            word = re.search(r"([A-Za-z][A-Za-z.]*)$", text[start : m.start()])
            w = word.group(1).lower() if word else ""
            if w.rstrip(".") in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                continue
        nxt = re.match(r"\s*(\S)", text[end:])
        if nxt and nxt.group(1).islower():
            continue
        ws = re.match(r"\s*", text[end:]).end()
        pieces.append(text[start : end + ws])
        start = end + ws
    if start < len(text):
        pieces.append(text[start:])
    # blank lines end sentences too (headings, list items without punctuation)
    out: List[str] = []
    for p in pieces:
        parts = re.split(r"(?<=\n\n)", p)
        out.extend(x for x in parts if x)
    return out


def insert_ac(text: str, token: str = AC_TOKEN, close_last: bool = True) -> str:
    """``text`` with ``token`` appended right after every sentence (before the following whitespace).

    ``close_last=False`` leaves the last piece open (a prompt that the model continues).
    """
    out = []
    sentences = split_sentences(text)
    for n, s in enumerate(sentences):
        core = s.rstrip()
        if not core or (n == len(sentences) - 1 and not close_last):
            out.append(s)
            continue
        out.append(core + token + s[len(core):])
    return "".join(out)


def fewshot_prompt(demonstrations: Sequence[str], query: str, token: str = AC_TOKEN, separator: str = "\n\n",
                   per_sentence: bool = True) -> str:
    """A few-shot prompt in AC style: ``<AC>`` after every sentence and after every demonstration."""
    parts = []
    for d in demonstrations:
        d = insert_ac(d, token) if per_sentence else d
        d = d.rstrip()
        if not d.endswith(token):
            d += token
        parts.append(d)
    q = insert_ac(query, token, close_last=False) if per_sentence else query
    return separator.join(parts + [q])


def decode(tokenizer, ids, anchor_ids: Iterable[int] = (), skip_special_tokens: bool = False, **kwargs) -> str:
    """Decode ``ids`` with the ``<AC>`` token (and any ids in ``anchor_ids`` that are special) hidden."""
    hide = set(int(i) for i in anchor_ids)
    ac = tokenizer.convert_tokens_to_ids(AC_TOKEN) if AC_TOKEN in tokenizer.get_vocab() else None
    if ac is not None:
        hide.add(ac)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    hide &= special | ({ac} if ac is not None else set())
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = [i for i in ids if i not in hide]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

