"""Argument checks shared by the Python API and the ``anllm`` CLI: each error names the argument and the
allowed values (a raw torch or library traceback for a bad argument is a bug)."""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Optional

import torch

#: Model dtypes by name (``--dtype`` of the CLI, ``dtype=`` of ``load_model``).
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def check_int(name: str, value, minimum: int = 1, none_ok: bool = False) -> Optional[int]:
    """``value`` as an int >= ``minimum`` (``None`` passes when ``none_ok``); else TypeError / ValueError."""
    if value is None and none_ok:
        return None
    allowed = f"an integer >= {minimum}" + (" (or None)" if none_ok else "")
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not floats or strings
    except TypeError:
        raise TypeError(f"{name} must be {allowed}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {allowed}, got {number}")
    return number


def check_dtype(dtype):
    """A model dtype: ``torch.float32/bfloat16/float16``, one of :data:`DTYPES`' names, or ``"auto"``."""
    if dtype == "auto" or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, torch.float32/bfloat16/float16 or 'auto', got {dtype!r}")


def check_device(device) -> torch.device:
    """A device this machine has: ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` when CUDA is available, ..."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch.cuda.is_available() is False; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not available ({e})") from None
    return dev


def read_utf8(path, what: str) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is accepted and dropped); errors name ``what``, the
    file and, for a byte that is not UTF-8, its line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e) from None


def not_utf8(path, data: bytes, e: UnicodeDecodeError) -> ValueError:
    line = data.count(b"\n", 0, e.start) + 1
    return ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8")


def check_output_path(what: str, path) -> None:
    """A file the run will write at its end: refused up front when it names a directory."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file path")
