"""routefx demo: compile a Llama-shaped model (random weights) with Dense and with PruneLayers.

Prints what recognition found, FLOPs per token before and after, the latency ratio measured in this process
(interleaved runs, median), and the output difference against the reference model.
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import routefx  # noqa: E402
from routefx.timing import median_seconds  # noqa: E402

LAYERS, D, FFN, VOCAB, SEQ = 8, 512, 1376, 8000, 256


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(seed, b=1, s=SEQ, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def max_diff(a, b, mask):
    keep = mask.bool()
    return (a.logits[keep] - b.logits[keep]).abs().max().item()


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = llama()
    x = batch(0)
    ref = lambda: model(**x, use_cache=False)  # noqa: E731

    print("== routefx.inspect: what recognition finds in the captured graph")
    print(routefx.inspect(model, (), x))

    print("\n== Dense: every FFN through routefx::routed_ffn, function unchanged")
    dense = routefx.compile(model, routefx.policies.Dense(), example_kwargs=x, example_inputs=())
    print(dense.report)
    with torch.no_grad():
        print(f"max |dense - reference| over real tokens: {max_diff(dense(**x), ref(), x['attention_mask']):.2e}")

    print("\n== PruneLayers(keep=0.75): drop the blocks of lowest Block Influence (calibrated on 4 batches)")
    calibration = [batch(100 + i, b=2, s=128, pad=16) for i in range(4)]
    pruned = routefx.compile(model, routefx.policies.PruneLayers(keep=0.75), calibration=calibration)
    print(pruned.report)
    print(pruned.ir)
    # the exact reference for pruning: the same HF model with those layers deleted
    cut = copy.deepcopy(model)
    cut.model.layers = nn.ModuleList([m for i, m in enumerate(cut.model.layers) if i not in pruned.plan.pruned])
    with torch.no_grad():
        print(f"max |pruned - reference with layers {pruned.plan.pruned} deleted|: "
              f"{max_diff(pruned(**x), cut(**x, use_cache=False), x['attention_mask']):.2e}")
        agree = (pruned(**x).logits.argmax(-1) == ref().logits.argmax(-1)).float().mean().item()
    print(f"top-1 agreement of the pruned model with the full one (random weights, so a weak signal): {agree:.3f}")

    print(f"\n== latency, batch 1 x {SEQ} tokens, fp32, eager backend, {torch.get_num_threads()} threads "
          "(median of 9 interleaved runs, same process)")
    t = median_seconds({"ref": ref, "dense": lambda: dense(**x), "pruned": lambda: pruned(**x)})
    f_dense, f_pruned = dense.flops_per_token([x]), pruned.flops_per_token([x])  # routes realised on x
    ideal = f_dense / f_pruned
    print(f"  FLOPs per token at S={SEQ}: dense {f_dense:,.0f}, pruned {f_pruned:,.0f}")
    print(f"  reference (HF eager)  {t['ref'] * 1e3:8.1f} ms")
    print(f"  routefx Dense         {t['dense'] * 1e3:8.1f} ms   {t['ref'] / t['dense']:5.2f}x vs reference")
    speedup = t["dense"] / t["pruned"]
    print(f"  routefx PruneLayers   {t['pruned'] * 1e3:8.1f} ms   {speedup:5.2f}x vs Dense "
          f"(FLOP-ideal {ideal:.2f}x, efficiency {speedup / ideal:.2f})")


if __name__ == "__main__":
    main()
