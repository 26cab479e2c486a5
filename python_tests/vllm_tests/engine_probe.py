"""Runs requests through an in-process vLLM engine step by step and reports what its scheduler holds.

A script, run in a process of its own (:func:`probe`): an in-process engine core binds the process's
OpenMP threads and cuts its torch threads to one, which would slow every later test of the session.
Reports, per step, the requests running and the KV blocks in use, and per request its tokens, the prompt
tokens vLLM took from its prefix cache (``num_cached_tokens``), after every step (computed tokens, blocks
held), and after every scheduling (tokens computed before the step, tokens scheduled, blocks held).
"""
import json
import os
import subprocess
import sys


def probe(model_dir, prompt_ids, max_tokens, staggered=False, **engine_args) -> dict:
    """Run the prompts (lists of token ids, greedy) and return the report (a dict). All are added at once, or
    with ``staggered`` each once the requests before it have computed their prompts (they may still decode)."""
    job = json.dumps(dict(model=str(model_dir), prompts=prompt_ids, max_tokens=max_tokens, engine=engine_args,
                          staggered=staggered))
    done = subprocess.run([sys.executable, __file__], input=job, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"engine probe failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_helpers import ENGINE_ARGS

    llm = LLM(model=job["model"], **{**ENGINE_ARGS, **job["engine"]})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool, manager = scheduler.kv_cache_manager.block_pool, scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    ids = [f"r{i}" for i in range(len(job["prompts"]))]
    pending = list(zip(ids, job["prompts"]))
    steps, held, outputs, cached, preempted = [], {rid: [] for rid in ids}, {}, {}, set()
    allocated = {rid: [] for rid in ids}
    schedule = scheduler.schedule

    def schedule_and_note(*args, **kwargs):  # what each scheduled request holds while its step runs
        out = schedule(*args, **kwargs)
        for internal_id, q in out.num_scheduled_tokens.items():
            n = scheduler.requests[internal_id].num_computed_tokens - q  # advanced at schedule time
            allocated[internal_id.rsplit("-", 1)[0]].append((n, q, len(manager.req_to_blocks[internal_id])))
        return out

    scheduler.schedule = schedule_and_note
    while pending or engine.has_unfinished_requests():
        while pending and not (job["staggered"] and any(r.num_computed_tokens < r.num_prompt_tokens
                                                         for r in scheduler.requests.values())):
            rid, prompt = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                rid = out.request_id.rsplit("-", 1)[0] if out.request_id not in held else out.request_id
                outputs[rid] = list(out.outputs[0].token_ids)
                cached[rid] = out.num_cached_tokens
        steps.append(dict(running=len(scheduler.running), blocks=pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()))
        for internal_id, request in scheduler.requests.items():
            rid = internal_id.rsplit("-", 1)[0]  # vLLM suffixes the ids it was given
            held[rid].append((request.num_computed_tokens, len(manager.req_to_blocks.get(internal_id, ()))))
            if request.num_preemptions:
                preempted.add(rid)
    report = dict(block_size=scheduler.block_size, num_blocks=pool.num_gpu_blocks - 1, steps=steps,
                  held=[held[r] for r in ids], outputs=[outputs[r] for r in ids],
                  cached=[cached[r] for r in ids], allocated=[allocated[r] for r in ids], preempted=sorted(preempted),
                  scheduler=type(scheduler).__name__,
                  prefix_caching=scheduler.kv_cache_manager.enable_caching)
    engine.engine_core.shutdown()
    return report


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its scheduler is readable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = _run(json.loads(sys.stdin.read()))
    print(json.dumps(result))
