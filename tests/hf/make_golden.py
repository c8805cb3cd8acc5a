#!/usr/bin/env python3
"""Writes tests/hf/golden/: small OLMoE models saved by transformers, with the logits transformers
computes for them, so that CI checks foe against the real peer without installing PyTorch
(tests/test_hf_golden.cpp reads them).

Each case is a directory as transformers' save_pretrained writes it (config.json verbatim,
generation_config.json, model.safetensors) plus
  logits.safetensors  float32 tensor "logits" [prompt, vocab]: transformers' logits of PROMPT
                      (the layout of foe_run --logits-out)
  golden.json         the prompt, the versions, how the logits were computed, and the margins
                      that make the greedy-token check robust (see below).

Cases:
  olmoe-fp32     float32 weights; config.json as transformers 5 writes it (rope_parameters,
                 no top-level rope_theta); logits computed in float32.
  olmoe-bf16     bfloat16 weights (config "dtype": "bfloat16"), norm_topk_prob and tied
                 embeddings; logits computed in float32 from the bfloat16 weights (the checkpoint
                 loaded as bfloat16, then .float()), which is what foe computes: it widens bf16
                 weights to fp32. transformers' own bfloat16 computation differs from that by
                 bfloat16 rounding (~1e-2 relative, recorded in golden.json as
                 bf16_compute_relative_difference), far above foe's tolerance, so it is not
                 the reference.
  olmoe-hf4      the weights of olmoe-fp32 with config.json rewritten in transformers 4's
                 layout (top-level rope_theta, rope_scaling null, no rope_parameters,
                 torch_dtype for dtype); logits from transformers 5 reading that file.

Every model uses rope_theta 500000, not the default 10000, so that a reader that misses the base
is caught by the logits. The weights are re-drawn with unit-scale statistics (transformers'
init, normal(0, 0.02), gives near-zero logits whose argmax is a coin toss); the first seed is kept
whose every router decision and every greedy token has a clear margin (MIN_ROUTER_GAP,
MIN_LOGIT_GAP), so that fp32 rounding differences between foe and torch cannot flip one.

    make_golden.py [--out tests/hf/golden]

Needs torch, transformers (5.x) and safetensors; runs on the CPU in seconds.
"""
import argparse
import json
import pathlib
import shutil
import sys

PROMPT = [1, 17, 42, 99, 150, 3, 255, 7, 64, 128, 200, 31]
ROPE_THETA = 500000.0
MIN_ROUTER_GAP = 1e-3   # between the k-th and (k+1)-th router probability, every token and layer
MIN_LOGIT_GAP = 1e-3    # between the best and second-best logit, relative to max |logit|

SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=2,
)


def reinit(model, torch, seed):
    """Unit-scale weights: embeddings N(0, 1), projections N(0, 1/fan_in), norms 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def margins(model, torch, ids):
    """The smallest router gap (k-th vs (k+1)-th probability) and the smallest relative gap
    between the two best logits of any position."""
    gaps = []
    hooks = []
    k = model.config.num_experts_per_tok
    for layer in model.model.layers:
        def hook(_module, _inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            probs = torch.softmax(logits.float(), dim=-1)
            top = probs.topk(k + 1, dim=-1).values
            gaps.append((top[..., k - 1] - top[..., k]).min().item())
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for h in hooks:
        h.remove()
    top2 = logits.topk(2, dim=-1).values
    logit_gap = ((top2[:, 0] - top2[:, 1]).min() / logits.abs().max()).item()
    return min(gaps), logit_gap, logits


def build(torch, first_seed, dtype, extra):
    """The model of the first seed from first_seed on whose margins are clear, and that seed."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    for seed in range(first_seed, first_seed + 100):
        torch.manual_seed(seed)
        config = OlmoeConfig(**SHAPE, **extra, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        model = OlmoeForCausalLM(config).float().eval()
        reinit(model, torch, seed)
        # Judge the margins on the weights that will be saved (bf16 rounding moves them).
        model = model.to(dtype).float()
        router_gap, logit_gap, _ = margins(model, torch, torch.tensor([PROMPT]))
        if router_gap >= MIN_ROUTER_GAP and logit_gap >= MIN_LOGIT_GAP:
            return model.to(dtype), seed
    sys.exit(f"no seed in [{first_seed}, {first_seed + 100}) gives clear margins")


def reference(torch, model_dir, dtype):
    """transformers' logits of PROMPT for the saved directory, computed in float32 with eager
    attention; for a bf16 checkpoint also the relative difference of a bf16 computation."""
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
    ids = torch.tensor([PROMPT])
    extra = {}
    with torch.no_grad():
        if dtype != torch.float32:
            native = model(ids).logits[0].float()
            model = model.float()
        logits = model(ids).logits[0].float()
        if dtype != torch.float32:
            extra["bf16_compute_relative_difference"] = ((native - logits).abs().max() / logits.abs().max()).item()
    router_gap, logit_gap, again = margins(model, torch, ids)
    assert torch.equal(again, logits)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "default" and rope["rope_theta"] == ROPE_THETA, rope
    return logits, router_gap, logit_gap, extra


def save_case(torch, transformers, out, name, model, seed, dtype, rewrite_hf4=False, source=None):
    from safetensors.torch import save_file

    case = out / name
    if case.exists():
        shutil.rmtree(case)
    if source is not None:
        shutil.copytree(source, case)
        for f in ("logits.safetensors", "golden.json"):
            (case / f).unlink()
    else:
        model.save_pretrained(case)
    if rewrite_hf4:
        config = json.loads((case / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None
        config["torch_dtype"] = config.pop("dtype")
        config["transformers_version"] = "4.57.1"  # as transformers 4 would stamp it; not read by foe
        (case / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    logits, router_gap, logit_gap, extra = reference(torch, case, dtype)
    save_file({"logits": logits.contiguous()}, str(case / "logits.safetensors"))
    if router_gap < MIN_ROUTER_GAP or logit_gap < MIN_LOGIT_GAP:
        sys.exit(f"{name}: margins too small (router {router_gap:.2e}, logit {logit_gap:.2e}); pick another seed")
    meta = {
        "prompt": PROMPT,
        "logits": "float32 [prompt, vocab], transformers' OlmoeForCausalLM in float32, eager attention"
        + (", from the bfloat16 weights (loaded as bfloat16, then .float())" if dtype != torch.float32 else ""),
        "weights_dtype": str(dtype).removeprefix("torch."),
        "config_layout": "transformers 4 (rope_theta, rope_scaling)" if rewrite_hf4 else "transformers 5 (rope_parameters)",
        "rope_theta": ROPE_THETA,
        "seed": seed,
        "min_router_gap": router_gap,
        "min_relative_logit_gap": logit_gap,
        **extra,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "made_by": "tests/hf/make_golden.py",
    }
    (case / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in case.iterdir())
    print(f"{name:<12} {size / 1024:7.1f} KiB  router gap {router_gap:.2e}  logit gap {logit_gap:.2e}"
          + (f"  bf16 compute differs by {extra['bf16_compute_relative_difference']:.2e}" if extra else ""))
    return case


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "golden")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(1)  # one summation order, whatever the machine
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    fp32, seed = build(torch, 11, torch.float32, {})
    fp32_dir = save_case(torch, transformers, args.out, "olmoe-fp32", fp32, seed, torch.float32)
    bf16, seed_bf16 = build(torch, 12, torch.bfloat16, {"norm_topk_prob": True, "tie_word_embeddings": True})
    save_case(torch, transformers, args.out, "olmoe-bf16", bf16, seed_bf16, torch.bfloat16)
    save_case(torch, transformers, args.out, "olmoe-hf4", None, seed, torch.float32, rewrite_hf4=True, source=fp32_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
