#!/usr/bin/env python3
"""Generate transformers parity fixtures for modernbert.c's CPU reference.

Runs where torch + transformers are installed (the GPU machine; the computation itself is CPU fp32, eager attention):

    python3 tools/hf_fixtures.py --out tests/fixtures/hf

For each case it writes DIR/<case>/:
    config.json, model.safetensors      the checkpoint, as transformers' save_pretrained writes it
    batch.safetensors                   input_ids I32 [N], cu_seqlens I32 [B+1], labels (I32 [N] MLM, or [B])
    expected.safetensors                loss F32 [], logits F32 [rows, classes], grad.<name> F32 for every parameter
and model_bf16.safetensors for the first case (the same weights saved in bfloat16, to test dtype conversion).

The packed batch is fed to transformers as a right-padded [B, max_len] batch with an attention mask (positions
restart at 0 per sequence, exactly as with cu_seqlens), in fp32 with attn_implementation="eager", dropout 0, so the
result is the mathematical definition modernbert.c must reproduce.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification

SPECIAL = dict(pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2)

CASES = [
    # name, head, config overrides, sequence lengths
    ("mlm_hd32_window_small_every2", "mlm",
     dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
          global_attn_every_n_layers=2, local_attention=16, global_rope_theta=160000.0, local_rope_theta=10000.0),
     [1, 2, 7, 16, 33, 64, 100, 128, 5]),
    ("mlm_hd64_window_large_every3", "mlm",
     dict(vocab_size=192, hidden_size=128, intermediate_size=160, num_hidden_layers=4, num_attention_heads=2,
          global_attn_every_n_layers=3, local_attention=512, global_rope_theta=10000.0, local_rope_theta=10000.0),
     [128, 1, 50, 17, 3, 96]),
    ("mlm_biases_untied_silu_every3", "mlm",
     dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=1,
          global_attn_every_n_layers=3, local_attention=32, global_rope_theta=20000.0, local_rope_theta=500.0,
          attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True, tie_word_embeddings=False,
          hidden_activation="silu", classifier_activation="gelu_pytorch_tanh", norm_eps=1e-6),
     [9, 128, 40, 1, 77]),
    ("cls_pool_cls_3labels", "cls",
     dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
          global_attn_every_n_layers=2, local_attention=16, classifier_pooling="cls", num_labels=3),
     [12, 1, 64, 30, 128]),
    ("cls_pool_mean_regression", "reg",
     dict(vocab_size=160, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
          global_attn_every_n_layers=3, local_attention=32, classifier_pooling="mean", num_labels=1),
     [5, 128, 1, 33]),
]


def make_config(overrides):
    kwargs = dict(SPECIAL)
    kwargs.update(initializer_range=0.1, embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
                  classifier_dropout=0.0, max_position_embeddings=512)
    kwargs.update(overrides)
    config = ModernBertConfig(**kwargs)
    config._attn_implementation = "eager"
    if hasattr(config, "reference_compile"):
        config.reference_compile = False
    return config


def check_config(config, overrides):
    """Fail loudly if transformers did not take a setting (v4 and v5 store RoPE and layer types differently)."""
    every = overrides["global_attn_every_n_layers"]
    want_types = ["full_attention" if i % every == 0 else "sliding_attention"
                  for i in range(overrides["num_hidden_layers"])]
    types = getattr(config, "layer_types", None)
    if types is not None and list(types) != want_types:
        raise SystemExit(f"layer_types {types} != {want_types}")
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        g = rope["full_attention"]["rope_theta"]
        l = rope["sliding_attention"]["rope_theta"]
        if "global_rope_theta" in overrides and abs(g - overrides["global_rope_theta"]) > 1e-6:
            raise SystemExit(f"global theta {g} != {overrides['global_rope_theta']}")
        if "local_rope_theta" in overrides and abs(l - overrides["local_rope_theta"]) > 1e-6:
            raise SystemExit(f"local theta {l} != {overrides['local_rope_theta']}")


def make_batch(lengths, config, head, generator):
    n = sum(lengths)
    ids = torch.randint(0, config.vocab_size, (n,), generator=generator)
    ids[min(3, n - 1)] = config.pad_token_id  # a pad id inside a real sequence: its lookup gradient must be skipped
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lengths), 0).tolist()), dtype=torch.int32)
    if head == "mlm":
        labels = torch.full((n,), -100, dtype=torch.int64)
        chosen = torch.rand(n, generator=generator) < 0.3
        chosen[0] = True
        labels[chosen] = torch.randint(0, config.vocab_size, (int(chosen.sum()),), generator=generator)
        batch_labels = labels.to(torch.int32)
    elif head == "cls":
        labels = torch.randint(0, config.num_labels, (len(lengths),), generator=generator)
        batch_labels = labels.to(torch.int32)
    else:
        labels = torch.rand(len(lengths), generator=generator) * 5.0
        batch_labels = labels.to(torch.float32)
    return ids, cu, labels, batch_labels


def pad(ids, lengths, fill):
    out = torch.full((len(lengths), max(lengths)), fill, dtype=ids.dtype)
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.int64)
    start = 0
    for b, length in enumerate(lengths):
        out[b, :length] = ids[start:start + length]
        mask[b, :length] = 1
        start += length
    return out, mask


def run_case(name, head, overrides, lengths, out_dir, seed):
    torch.manual_seed(seed)
    config = make_config(overrides)
    check_config(config, overrides)
    model_class = ModernBertForMaskedLM if head == "mlm" else ModernBertForSequenceClassification
    model = model_class(config).float()
    model.train()  # dropout is 0 everywhere; train mode as a trainer would run it
    generator = torch.Generator().manual_seed(seed + 1)
    ids, cu, labels, batch_labels = make_batch(lengths, config, head, generator)
    padded_ids, mask = pad(ids, lengths, config.pad_token_id)
    model.zero_grad()
    if head == "mlm":
        padded_labels, _ = pad(labels, lengths, -100)
        output = model(input_ids=padded_ids, attention_mask=mask, labels=padded_labels)
        flat_logits = output.logits.reshape(-1, output.logits.shape[-1])
        flat_labels = padded_labels.reshape(-1)
        logits = flat_logits[flat_labels != -100]
    else:
        output = model(input_ids=padded_ids, attention_mask=mask, labels=labels)
        logits = output.logits
    output.loss.backward()

    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    model.save_pretrained(case_dir, safe_serialization=True)
    if name == CASES[0][0]:
        bf16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                if k != "decoder.weight"}
        save_file(bf16, os.path.join(case_dir, "model_bf16.safetensors"), metadata={"format": "pt"})
    save_file({"input_ids": ids.to(torch.int32), "cu_seqlens": cu, "labels": batch_labels},
              os.path.join(case_dir, "batch.safetensors"), metadata={"format": "pt"})
    expected = {"loss": output.loss.detach().float().reshape(()), "logits": logits.detach().float().contiguous()}
    for param_name, param in model.named_parameters():
        if param.grad is None:
            raise SystemExit(f"{name}: no gradient for {param_name}")
        expected["grad." + param_name] = param.grad.detach().float().contiguous()
    save_file(expected, os.path.join(case_dir, "expected.safetensors"),
              metadata={"format": "pt", "transformers": transformers.__version__, "torch": torch.__version__})
    print(f"{name}: loss {output.loss.item():.6f}, {len(lengths)} sequences, {sum(lengths)} tokens, "
          f"{logits.shape[0]} logit rows, {len(expected) - 2} gradients")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures/hf")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for index, (name, head, overrides, lengths) in enumerate(CASES):
        run_case(name, head, overrides, lengths, args.out, args.seed + 17 * index)
    with open(os.path.join(args.out, "README.md"), "w") as readme:
        readme.write("Generated by tools/hf_fixtures.py with transformers %s, torch %s (CPU, fp32, eager).\n"
                     % (transformers.__version__, torch.__version__))


if __name__ == "__main__":
    sys.exit(main())
