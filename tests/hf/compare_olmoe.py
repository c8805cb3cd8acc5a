#!/usr/bin/env python3
"""Checks that foe's standard-MoE path computes what Hugging Face's OlmoeForCausalLM computes.

For each case: foe_run writes a seeded random OLMoE model directory (config.json +
model.safetensors), foe_run runs it (prefill logits and greedy tokens), and transformers loads the
same directory and runs the same prompt in float32 with eager attention. The logits must agree to
fp32 rounding and the greedy tokens must be identical.

    compare_olmoe.py FOE_RUN [--work DIR]

Needs torch and transformers (not part of foe's CI: they are large). Exit 0 when every case
matches, 1 otherwise.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stderr}")
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("foe_run", type=pathlib.Path)
    parser.add_argument("--work", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="foe-hf-"))
    # (name, seed, prompt length, overrides of config.json)
    cases = [
        ("moe-tiny", 1, 7, {}),
        ("moe-tiny", 2, 40, {"norm_topk_prob": True}),
        ("moe-small", 3, 300, {}),
        ("moe-small", 4, 64, {"norm_topk_prob": True, "tie_word_embeddings": False}),
    ]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'case':<28} {'prompt':>6} {'max |dlogit|':>13} {'max |logit|':>12} {'relative':>10}  greedy tokens")
    failed = False
    for name, seed, prompt_len, overrides in cases:
        model_dir = work / f"{name}-{seed}"
        run([args.foe_run, "--init", name, "--out", model_dir, "--seed", str(seed)])
        if overrides:
            config = json.loads((model_dir / "config.json").read_text())
            config.update(overrides)
            (model_dir / "config.json").write_text(json.dumps(config, indent=2))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompt = [int(t) for t in torch.randint(0, vocab, (prompt_len,))]
        logits_file = work / f"{name}-{seed}-logits.safetensors"
        out = run([args.foe_run, "--model", model_dir, "--tokens", ",".join(map(str, prompt)),
                   "--max-new-tokens", "6", "--logits-out", logits_file])
        foe_tokens = json.loads(out)["generated"]
        foe_logits = load_file(str(logits_file))["logits"].double()

        hf = OlmoeForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
        hf.eval()
        with torch.no_grad():
            ids = torch.tensor([prompt])
            hf_logits = hf(ids).logits[0].double()
            hf_tokens = hf.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                                    pad_token_id=0)[0, prompt_len:].tolist()
        diff = (foe_logits - hf_logits).abs().max().item()
        scale = hf_logits.abs().max().item()
        relative = diff / scale
        same = foe_tokens == hf_tokens
        label = name + (" " + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
        print(f"{label:<28} {prompt_len:>6} {diff:>13.3e} {scale:>12.3f} {relative:>10.2e}  "
              f"{'identical' if same else f'foe {foe_tokens} hf {hf_tokens}'}")
        failed |= relative > 1e-5 or not same
    print("FAILED" if failed else "all cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
