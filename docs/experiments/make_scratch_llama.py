"""Experiment 2's model: a small randomly initialised Llama with the SmolLM2 tokenizer, saved as a directory.

    python docs/experiments/make_scratch_llama.py OUT_DIR [--hidden 256 --layers 6 --seed 0]
"""
import argparse

import torch
import transformers as tf

from anllm_ext.models import default_model_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tok = tf.AutoTokenizer.from_pretrained(str(default_model_dir()))
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(a.seed)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
