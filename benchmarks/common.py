"""What every benchmark of this project prints first and writes with its results: the machine, the
threads, the library versions and the date. One place, so that every figure can be traced to its run.

    from common import add_common_args, run_info, print_header, write_json
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def add_common_args(parser, default_threads: int = 2) -> None:
    """--threads and --json, the same in every benchmark."""
    parser.add_argument("--threads", type=int, default=default_threads, help="torch intra-op threads")
    parser.add_argument(
        "--json", default=None,
        help="write the results here (default: results/<benchmark>-<UTC time>.json; 'none' to skip)",
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_info(benchmark: str, args=None) -> Dict[str, object]:
    """Machine, threads, versions, date and command line of this run."""
    info = {
        "benchmark": benchmark,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    if args is not None:
        info["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return info


def print_header(info: Dict[str, object]) -> None:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    tf = f", transformers {info['transformers']}" if info.get("transformers") else ""
    print(f"# {info['benchmark']}  {info['date_utc']}  commit {info['git_commit']}")
    print(f"# {info['cpu']} ({info['logical_cpus']} logical CPUs, load {info['load_average_1m']:.2f}){gpu}")
    print(f"# {info['torch_threads']} torch threads, torch {info['torch']}{tf}, Python {info['python']}")


def write_json(info: Dict[str, object], results: Dict[str, object], path: Optional[str] = None) -> Optional[str]:
    """Writes {"run": info, "results": results}; returns the path (None when path == 'none')."""
    if path is not None and path.lower() == "none":
        return None
    if path is None:
        stamp = info["date_utc"].replace(":", "").replace("+0000", "Z")
        path = os.path.join(RESULTS_DIR, f"{info['benchmark']}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"run": info, "results": results}, f, indent=2, default=float)
    print(f"\nresults written to {path}")
    return path


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1,
              before: Optional[Callable[[], object]] = None) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls; ``before`` runs untimed before each call."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]
