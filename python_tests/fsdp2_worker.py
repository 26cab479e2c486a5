"""Trains a patched tiny Llama for a few steps, in one process or sharded with FSDP2 (`fully_shard`) under
torchrun (gloo, CPU), and saves the full parameters: test_training_distributed.py compares the two."""
import os
import sys

import torch
import torch.distributed as dist
import anllm_ext
from helpers import tiny_causal_lm, token_stream

ANCHOR, ROWS, TOKENS = 5, 4, 24


def build_model():
    model = tiny_causal_lm(vocab_size=64, max_position_embeddings=128).train()
    anllm_ext.patch(model, [ANCHOR])
    return model


def global_batch():
    return token_stream(ROWS, TOKENS, vocab=64, anchor=ANCHOR, anchor_p=0.15, seed=1)[0]


def train(model, ids, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()  # every row has the same token count: means agree
        opt.step()
        opt.zero_grad()


def main(out_path):
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, ids = build_model(), global_batch()
    if world == 1:
        train(model, ids)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_path)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per_rank = ROWS // world
    train(model, ids[rank * per_rank:(rank + 1) * per_rank])
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    sharded = sum(hasattr(v, "full_tensor") for v in model.state_dict().values())
    if rank == 0:
        full["__sharded_tensors__"] = torch.tensor(sharded)
        torch.save(full, out_path)
    dist.barrier()  # both ranks are done, and rank 0 has saved
    # torch 2.11's gloo can abort a rank while its threads are torn down ("terminate called without an active
    # exception": in destroy_process_group, or at interpreter exit even after a barrier), so skip the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
