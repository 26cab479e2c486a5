"""`anllm train` under torchrun: 2 DDP processes (gloo, CPU) end with the parameters of 1 process that sees the
same global batch. Uses the CLI, as a user launches it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anllm_ext
from helpers import needs_datasets, needs_smollm2
from helpers import TEXT, tiny_llama_dir


def launch(prefix, model_dir, data, out, batch, extra=(), eval_blocks=0):
    cmd = prefix + [
        "-m", "anllm_ext.cli", "train", "--data", str(data), "--model", model_dir, "--anchor-mode", "ep",
        "--output-dir", str(out), "--block-size", "40", "--per-device-train-batch-size", str(batch),
        "--max-steps", "3", "--learning-rate", "1e-3", "--warmup-steps", "0", "--eval-blocks", str(eval_blocks),
        "--group-by-length", "false", "--save-steps", "1000", "--seed", "0", "--disable-tqdm", "true",
        "--logging-steps", "1", *(extra or ["--use-cpu", "true"]),
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(anllm_ext.__file__).parent.parent), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


@needs_smollm2
@pytest.mark.parametrize("objective", [[], ["--distill", "true", "--distill-alpha", "0.5"]], ids=["lm", "distill"])
@needs_datasets
def test_two_process_ddp_equals_one_process_same_global_batch(tmp_path, objective):
    from anllm_ext.models import default_model_dir

    model_dir = tiny_llama_dir(default_model_dir(), tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"d{i}.txt").write_text(TEXT * (1 + i % 2))
    one = launch([sys.executable], model_dir, data, tmp_path / "one", batch=4, extra=["--use-cpu", "true", *objective])
    two = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                 model_dir, data, tmp_path / "two", batch=2, extra=["--use-cpu", "true", *objective])
    start = load_file(str(Path(model_dir) / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(one[name], start[name]))
    assert moved >= len(one) - 1  # training changed the weights (all but, at most, an unused one)


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    """The patched model under torch's FSDP2 (`fully_shard`, gloo on CPU): 2 sharded processes x 2 rows end
    with the parameters of 1 process x 4 rows. (accelerate, hence the Trainer's --fsdp, runs FSDP only on
    accelerators and falls back to DDP on CPU; this checks the anchor kernels under FSDP2's sharded
    parameters and gradient reduce-scatter.)"""
    worker = str(Path(__file__).with_name("fsdp2_worker.py"))
    env = dict(os.environ, PYTHONPATH=str(Path(anllm_ext.__file__).parent.parent), OMP_NUM_THREADS="1")
    runs = {}
    for name, prefix in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        out = tmp_path / f"{name}.pt"
        run = subprocess.run(prefix + [worker, str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        runs[name] = torch.load(out)
    assert int(runs["two"].pop("__sharded_tensors__")) == len(runs["one"])  # every parameter was sharded
    assert runs["one"].keys() == runs["two"].keys()
    sys.path.insert(0, str(Path(worker).parent))
    from fsdp2_worker import build_model

    start = build_model().state_dict()
    assert all(not torch.equal(runs["one"][n], start[n]) for n in start)  # every parameter trained
    for name in runs["one"]:
        torch.testing.assert_close(runs["two"][name], runs["one"][name], atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@needs_smollm2
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_deepspeed_zero3_two_processes_equal_one_process(tmp_path, lora):
    """`anllm train --deepspeed configs/ds_zero3.json` under torchrun, 2 CPU processes (DeepSpeed's CPU
    accelerator, gloo): ZeRO-3 partitions every parameter, gradient and optimizer state. It ends with the
    parameters of 1 plain process x 4 rows (LoRA: the merged model); the held-out scores before training
    (parameters gathered from the partitions) and after it (the saved model reloaded on rank 0) agree too.
    (LoRA in AC mode is not covered: PEFT's trainable-token layer asks CUDA for its device under ZeRO-3.)"""
    pytest.importorskip("deepspeed")
    import json

    from anllm_ext.models import default_model_dir

    model_dir = tiny_llama_dir(default_model_dir(), tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"d{i}.txt").write_text(TEXT * (1 + i % 2))
    config = str(Path(__file__).resolve().parent.parent / "configs" / "ds_zero3.json")
    lora_args = ["--lora", "true"] if lora else []
    one = launch([sys.executable], model_dir, data, tmp_path / "one", batch=4, eval_blocks=2,
                 extra=["--use-cpu", "true", *lora_args])
    two = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                 model_dir, data, tmp_path / "two", batch=2, extra=["--deepspeed", config, *lora_args], eval_blocks=2)
    assert one.keys() == two.keys()
    start = load_file(str(Path(model_dir) / "model.safetensors"))
    trained = [n for n in one if not lora or "proj" in n]  # LoRA: the merged linear layers only
    assert sum(not torch.equal(one[n], start[n]) for n in trained) >= len(trained) - (0 if lora else 1)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    scores = [json.loads((tmp_path / run / "anllm_results.json").read_text()) for run in ("one", "two")]
    for when in ("eval_before", "eval_after"):
        for mode in ("full", "ansan", "cached"):
            nll = [s[when]["modes"][mode]["nll"] for s in scores]
            assert nll[1] == pytest.approx(nll[0], rel=1e-5), (when, mode, nll)
