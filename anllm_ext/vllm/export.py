"""Write a servable Hugging Face directory of an AnLLM (merged weights + tokenizer + anchor config).

vLLM serves whole models, not PEFT adapters: the bundled ``smollm2-anllm`` (a LoRA adapter on the bundled
SmolLM2-135M-Instruct) is merged first. The directory's ``config.json`` carries the anchor configuration
under the ``"anllm"`` key (:class:`anllm_ext.config.AnchorConfig`), which is what switches the vLLM plugin on.

    python -m anllm_ext.vllm.export smollm2-anllm OUT_DIR [--dtype float32] [--sink S]

``--sink S`` serves the model with an attention sink (its first S tokens are anchors, as with
``anllm_ext.patch(model, sink=S)``): the exported anchor configuration carries it, and the plugin reads it there.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..cli import arg_int
from ..config import AnchorConfig, check_sink


def export_merged(model: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                  dtype: torch.dtype = torch.float32, sink: Optional[int] = None) -> Path:
    """Merge ``model`` (``"smollm2-anllm"``, an adapter directory of ``anllm train --lora`` or a model
    directory that carries an anchor configuration) and save it to ``out_dir`` (written atomically:
    a temporary directory renamed into place). ``sink``: the attention sink the export is served with (the
    first ``sink`` tokens of every request are anchors); None keeps the model's own. Returns ``out_dir``."""
    from ..models import load_model, save_model_dir

    if sink is not None:
        check_sink(sink)  # before the merge, not after it
    out = Path(out_dir).expanduser()
    mdl, tok = load_model(model, dtype=dtype)
    config = AnchorConfig.from_model(mdl)
    if config is None:
        raise ValueError(f"{model} carries no anchor configuration (anllm_config.json or the 'anllm' key of "
                         "config.json): it is not an AnLLM, serve it with plain vLLM")
    if sink is not None:
        dataclasses.replace(config, sink=sink).attach(mdl)
    return save_model_dir(mdl, tok, out)  # config.json carries the "anllm" key (config.attach in load_adapter)


SOURCE_FILE = "anllm_export_source.json"  # what a cached export was merged from
_HASH_LIMIT = 64 << 20  # bytes


def source_fingerprint(model: Union[str, os.PathLike]) -> str:
    """SHA-256 over the names and contents of the files of ``model``'s directory: a cached export is stale
    once the adapter or model it was merged from changes (e.g. a new bundled adapter). Files over
    ``_HASH_LIMIT`` (a whole model's weights) count by size and modification time: hashing gigabytes on every
    start would cost more than the merge it guards."""
    from ..models import resolve_model_dir

    digest = hashlib.sha256()
    root = resolve_model_dir(model)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        info = path.stat()
        if info.st_size > _HASH_LIMIT:
            digest.update(f"{info.st_size}:{info.st_mtime_ns}".encode())
            continue
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cached_export(model: str = "smollm2-anllm", sink: Optional[int] = None) -> Path:
    """The merged directory of ``model`` (with ``sink``, as :func:`export_merged`) under anllm_ext's cache
    (``~/.cache/anllm_ext/vllm/<name>``, ``<name>-sink<S>`` with a sink given), exported on first use and again
    whenever ``model``'s files change or the cached export was made with another sink."""
    from ..models import cache_dir

    target = cache_dir() / "vllm" / (Path(str(model)).name + ("" if sink is None else f"-sink{sink}"))
    source = {"model": str(model), "sha256": source_fingerprint(model), "sink": sink}
    stamp = target / SOURCE_FILE
    if not stamp.is_file() or json.loads(stamp.read_text()) != source:
        export_merged(model, target, sink=sink)
        stamp.write_text(json.dumps(source))
    return target


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anllm_ext.vllm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help='"smollm2-anllm" (the bundled AnLLM), or a LoRA adapter / model directory')
    p.add_argument("out_dir", help="the servable directory to write (replaced if it exists)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--sink", type=arg_int(0), default=None, metavar="S",
                   help="serve with an attention sink: the first S tokens of every request are anchors (written into "
                        "the exported anchor configuration); default: the model's own, 0: none")
    args = p.parse_args(argv)
    out = export_merged(args.model, args.out_dir, _DTYPES[args.dtype], sink=args.sink)
    config = AnchorConfig.from_pretrained(out)
    sink = f", sink {config.sink}" if config.sink else ""
    print(f"wrote {out} (anchors: {config.mode}{sink}); serve it with: vllm serve {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
