"""The documentation's examples run, and its worked example agrees with the reference.

- README.md: every ```python block runs as written, in order, in one namespace, on the bundled model.
- docs/guide.md: every ```python block runs, in order, in one namespace (as a reader would paste them
  into one session), and every ```bash block that calls ``anllm`` runs through ``anllm_ext.cli.main``,
  on the bundled SmolLM2 model, in a temporary working directory.
- docs/method.md: the text grid of the AnSAN mask equals what ``docs/scripts/draw_mask.py`` computes
  from ``token_layout`` and ``reference.ansan_mask``.
"""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import anllm_ext
from helpers import needs_smollm2

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def code_blocks(markdown: str):
    """(language, code) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(markdown)]


def cli_commands(code: str):
    """The ``anllm ...`` command lines of a shell block, continuation lines joined, as argv lists."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.strip().startswith("anllm ")]


def run_guide(markdown: str):
    from anllm_ext.cli import main

    namespace = {"__name__": "__guide__"}
    for n, (lang, code) in enumerate(code_blocks(markdown)):
        if lang == "python":
            exec(compile(code, f"docs/guide.md block {n}", "exec"), namespace)
        elif lang == "bash":
            commands = cli_commands(code)
            assert commands, f"block {n}: a bash block without an `anllm` command cannot be tested"
            for argv in commands:
                assert main(argv) == 0, f"block {n}: `anllm {' '.join(argv)}` failed"
    return namespace


def test_code_blocks_parser():
    text = "intro\n```python\nx = 1\n```\n\n```bash\nanllm generate --a 1 \\\n    --b \"two words\"\n```\n"
    blocks = code_blocks(text)
    assert blocks == [("python", "x = 1\n"), ("bash", "anllm generate --a 1 \\\n    --b \"two words\"\n")]
    assert cli_commands(blocks[1][1]) == [["generate", "--a", "1", "--b", "two words"]]


def test_guide_has_python_and_cli_examples():
    kinds = [lang for lang, _ in code_blocks((DOCS / "guide.md").read_text(encoding="utf-8"))]
    assert kinds.count("python") >= 5 and "bash" in kinds, kinds


@needs_smollm2
def test_guide_examples_run(capsys, tmp_path, monkeypatch):
    import inspect

    from transformers import LlamaForCausalLM

    if "cache" not in inspect.signature(LlamaForCausalLM.forward).parameters:
        pytest.skip("the guide is written for transformers >= 5.24, whose generate() takes cache= (earlier releases "
                    "name it past_key_values=; the patched model's paths are tested on them in the other modules)")
    pytest.importorskip("datasets", reason="the guide trains a model (anllm train reads its data with datasets)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    monkeypatch.chdir(tmp_path)  # files the guide writes (a corpus, a trained model) land here
    namespace = run_guide((DOCS / "guide.md").read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    # the exactness check of section 1 ran (it asserts), and the CLI printed its comparison
    assert "max |cached - masked pass|" in printed
    assert "KV reduction (C-down)" in printed
    assert namespace["stats"]["reduction"] > 0


@needs_smollm2
def test_readme_examples_run(capsys):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    blocks = [code for lang, code in code_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if lang == "python"]
    assert blocks, "README.md lost its Python example"
    namespace = {"__name__": "__readme__"}
    for n, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {n}", "exec"), namespace)
    assert namespace["cache"].stats()["reduction"] > 0 and not anllm_ext.is_patched(namespace["model"])
    assert namespace["new_lengths"].tolist() == namespace["k_lay"].is_anchor.sum(1).tolist()
    assert len(capsys.readouterr().out.splitlines()) == 2  # the generated texts and the cache's figures


def _draw_mask_module():
    spec = importlib.util.spec_from_file_location("draw_mask", DOCS / "scripts" / "draw_mask.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


@needs_smollm2
def test_method_mask_grid_matches_reference():
    draw_mask = _draw_mask_module()
    page = (DOCS / "method.md").read_text(encoding="utf-8")
    shown = re.search(r"<!-- mask-grid:start -->\n```text\n(.*?)```\n<!-- mask-grid:end -->", page, re.S)
    assert shown, "docs/method.md lost its mask-grid block"
    example = draw_mask.mask_example()
    assert shown.group(1).rstrip("\n") == draw_mask.grid(example)
    # the grid is the rule of the method page, read off independently of ansan_mask: a query sees its
    # own segment causally and, unless it is an anchor, the earlier anchors
    lay = example.layout
    T = lay.shape[1]
    seg, anchor = lay.segments[0].tolist(), lay.is_anchor[0].tolist()
    for i in range(T):
        for j in range(T):
            want = 0
            if j <= i and seg[j] == seg[i]:
                want = 1
            elif j < i and anchor[j] and not anchor[i]:
                want = 2
            assert int(example.kinds[i, j]) == want, (i, j)
