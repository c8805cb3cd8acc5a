#!/usr/bin/env python3
"""The Hugging Face transformers side of bench/peers/run.py (run with $PEER_PYTHON: needs torch
and transformers). Loads OlmoeForCausalLM from a foe model directory in float32 on the CPU, runs
the given prompt token ids in one forward pass (use_cache, logits for the last position only, as
foe and llama.cpp compute them), then greedy-decodes with the KV cache one token at a time (argmax,
ties to the lower id) and prints one JSON line:
  {"load_s": .., "prefill_s": .., "decode_s_per_token": [..], "tokens": [..], "peak_rss_mb": ..}
decode_s_per_token has one entry per decode step (generated tokens - 1: the last token is chosen
but never fed back, as foe_run does).

usage: hf_greedy.py MODEL_DIR --threads T --new-tokens N --prompt ID,ID,...
"""
import argparse
import json
import resource
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    a = ap.parse_args()
    prompt = [int(x) for x in a.prompt.split(",") if x]
    if not prompt or a.new_tokens < 1:
        ap.error("need a non-empty --prompt and --new-tokens >= 1")

    import torch
    from transformers import OlmoeForCausalLM
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()  # load: from_pretrained only, not importing torch and transformers
    try:
        model = OlmoeForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 knows only torch_dtype
        model = OlmoeForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        t = time.perf_counter()
        try:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        except TypeError:  # older transformers: every position's logits
            out = model(input_ids=ids, use_cache=True)
        tokens = [int(torch.argmax(out.logits[0, -1]).item())]  # the first maximum: ties to the lower id
        prefill_s = time.perf_counter() - t
        past = out.past_key_values
        steps = []
        for n in range(1, a.new_tokens):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]], dtype=torch.long), past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            tokens.append(int(torch.argmax(out.logits[0, -1]).item()))
            steps.append(time.perf_counter() - t)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    json.dump({"engine": "transformers", "threads": a.threads, "prompt_tokens": len(prompt),
               "load_s": load_s, "prefill_s": prefill_s, "decode_s_per_token": steps, "tokens": tokens,
               "peak_rss_mb": rss_mb, "torch": torch.__version__,
               "transformers": __import__("transformers").__version__}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
