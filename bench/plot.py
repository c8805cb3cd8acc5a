#!/usr/bin/env python3
"""Draws foe's benchmark plots from the JSON in a results directory, and writes a summary table.

    plot.py RESULTS_DIR

host_layers.json        -> layers_foe_vs_moe.png   FoE and MoE layer latency against tokens
foe_comm_*_G*_R8.json   -> bytes_per_rank.png      measured bytes per rank per layer against ranks
projection_*.json       -> projection.png          projected forward latency against nodes
all of them             -> summary.md              the FoE/MoE tables the README quotes
Every plot carries its units, the machine and the date.
"""
import datetime
import glob
import json
import os
import platform
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def machine(context):
    host = (context or {}).get("host_name", platform.node())
    if not context or "num_cpus" not in context:
        return host
    return f"{host}, {context['num_cpus']} CPUs at {context.get('mhz_per_cpu', '?')} MHz"


def stamp(ax, context, note=""):
    date = (context or {}).get("date", datetime.date.today().isoformat())
    ax.text(1.0, -0.14, f"{machine(context)}; {date}{'; ' + note if note else ''}", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="gray")


def ms(run):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run["time_unit"]]
    return run["real_time"] * scale


def layers(results, summary):
    path = os.path.join(results, "host_layers.json")
    if not os.path.exists(path):
        return
    data = load(path)
    series = {}
    for run in data["benchmarks"]:
        if run.get("run_type") == "aggregate":
            continue
        m = re.match(r"(foe|moe)_layer/(\w+)/T:(\d+)", run["name"])
        if m:
            series.setdefault((m.group(2), m.group(1)), {})[int(m.group(3))] = ms(run)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary.append("## Host layers: one prefill of T tokens, FoE against MoE (same run)\n")
    summary.append("| shape | T | FoE (ms) | MoE (ms) | FoE/MoE |\n|---|---|---|---|---|")
    for size in sorted({s for s, _ in series}):
        for arch, style in (("foe", "-o"), ("moe", "--s")):
            points = series.get((size, arch), {})
            if points:
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], style, label=f"{arch.upper()} {size}")
        foe, moe = series.get((size, "foe"), {}), series.get((size, "moe"), {})
        for t in sorted(set(foe) & set(moe)):
            summary.append(f"| {size} | {t} | {foe[t]:.2f} | {moe[t]:.2f} | {foe[t] / moe[t]:.2f} |")
    summary.append("")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per forward (one sequence)")
    ax.set_ylabel("layer latency (ms)")
    ax.set_title("One layer on the host: FoE vs standard MoE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    stamp(ax, data.get("context"), "fp32, OpenMP + OpenBLAS")
    fig.tight_layout()
    fig.savefig(os.path.join(results, "layers_foe_vs_moe.png"), dpi=120)
    plt.close(fig)


def bytes_per_rank(results, summary):
    files = sorted(glob.glob(os.path.join(results, "foe_comm_*_G*_R8.json")))
    if not files:
        return
    points = {}
    for path in files:
        data = load(path)
        g = data["ranks"]
        for arch in data["architectures"]:
            if arch.get("skipped"):
                continue
            total = sum(op["intra_node_bytes_mean"] + op["inter_node_bytes_mean"] for op in arch["operations"])
            inter = sum(op["inter_node_bytes_mean"] for op in arch["operations"])
            points.setdefault(arch["architecture"], {})[g] = (total / 1e6, inter / 1e6)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary.append("## Measured bytes per rank per layer (foe_comm, foe-1b, 2048 tokens, fp32, 8 ranks per node)\n")
    summary.append("| architecture | G | all links (MB) | inter-node (MB) |\n|---|---|---|---|")
    for arch, by_g in points.items():
        gs = sorted(by_g)
        line, = ax.plot(gs, [by_g[g][0] for g in gs], "-o", label=f"{arch}: all links")
        ax.plot(gs, [by_g[g][1] for g in gs], ":", color=line.get_color(), label=f"{arch}: inter-node")
        summary.extend(f"| {arch} | {g} | {by_g[g][0]:.2f} | {by_g[g][1]:.2f} |" for g in gs)
    summary.append("")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks G (8 per node)")
    ax.set_ylabel("MB sent per rank per layer (fp32)")
    ax.set_title("Measured communication, foe-1b layer, 2048 tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    stamp(ax, {"host_name": platform.node(), "date": datetime.date.today().isoformat()},
          "CountingComm under mpirun; bytes do not depend on the machine")
    fig.tight_layout()
    fig.savefig(os.path.join(results, "bytes_per_rank.png"), dpi=120)
    plt.close(fig)


def projection(results, summary):
    path = os.path.join(results, "projection_foe-1b_h100.json")
    if not os.path.exists(path):
        return
    data = load(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = data["rows"]
    summary.append(f"## Projection ({data['hardware']['name']}, {data['workload']}, forward = L layers)\n")
    summary.append("| ranks | nodes | tokens | FoE (ms) | MoE DP+EP naive (ms) | MoE DP+EP dedup (ms) | "
                   "MoE TP+EP naive (ms) | MoE TP+EP dedup (ms) | dedup DP / FoE |\n|---|---|---|---|---|---|---|---|---|")
    archs = (("foe", "FoE"), ("moe-dp-naive", "MoE DP+EP naive"), ("moe-dp-dedup", "MoE DP+EP dedup"),
             ("moe-tp-naive", "MoE TP+EP naive"), ("moe-tp-dedup", "MoE TP+EP dedup"))
    for tokens, style in ((2048, "-"), (24576, "--")):
        sel = [r for r in rows if r["tokens"] == tokens]
        nodes = [r["nodes"] for r in sel]
        for name, label in archs:
            ys = [r["strategies"][name]["forward_serial_s"] * 1e3 if name in r["strategies"] else None for r in sel]
            if any(y is not None for y in ys):
                ax.plot(nodes, ys, style + "o", label=f"{label}, S = {tokens}")

    def ms(s, name):
        return s[name]["forward_serial_s"] * 1e3 if name in s else float("nan")

    for r in rows:
        if r["tokens"] in (2048, 24576) and r["ranks"] in (8, 16):
            s = r["strategies"]
            cells = " | ".join(f"{ms(s, name):.2f}" for name, _ in archs)
            summary.append(f"| {r['ranks']} | {r['nodes']} | {r['tokens']} | {cells} | "
                           f"{ms(s, 'moe-dp-dedup') / ms(s, 'foe'):.2f} |")
    summary.append("")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes (8 GPUs each)")
    ax.set_ylabel("projected forward latency (ms)")
    ax.set_title("Cost model: foe-1b forward, FoE vs MoE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    stamp(ax, {"host_name": "cost model", "date": datetime.date.today().isoformat()},
          f"{data['hardware']['description'][:60]}...")
    fig.tight_layout()
    fig.savefig(os.path.join(results, "projection.png"), dpi=120)
    plt.close(fig)


def serving_simulation(results, summary, stem, png):
    path = os.path.join(results, stem + ".json")
    if not os.path.exists(path):
        return
    data = load(path)
    clusters = data["clusters"]
    fig, axes = plt.subplots(len(clusters), 2, figsize=(10, 3.6 * len(clusters)), squeeze=False)
    summary.append(f"## Simulated serving ({data['config']} on {data['hardware']}, {data['requests']} LongBench-like "
                   f"requests, cost-model step times: {data.get('step_times', 'roofline compute')})\n")
    summary.append("| G | load | req/s | FoE TTFT (ms) | DP naive / FoE | DP dedup / FoE | FoE TBT (ms) | DP naive / FoE | DP dedup / FoE |")
    summary.append("|---|---|---|---|---|---|---|---|---|")
    for row, c in enumerate(clusters):
        rates = [l["rate"] for l in c["loads"]]
        names = list(c["loads"][0]["architectures"].keys())
        for col, (metric, label) in enumerate((("ttft_s", "TTFT mean (ms)"), ("tbt_s", "TBT mean (ms)"))):
            ax = axes[row][col]
            for name in names:
                ys = [l["architectures"][name][metric]["mean"] * 1e3 if name in l["architectures"] else None
                      for l in c["loads"]]
                ax.plot(rates, ys, "-o", label=name)
            ax.set_xlabel("arrival rate (requests/s)")
            ax.set_ylabel(label)
            ax.set_title(f"G = {c['ranks']} ({c['nodes']} node(s))")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for l in c["loads"]:
            a = l["architectures"]
            f = a["FoE"]
            def ratio(name, metric):
                return a[name][metric]["mean"] / f[metric]["mean"] if name in a else float("nan")
            summary.append(f"| {c['ranks']} | {l['load']:.2f} | {l['rate']:.1f} | {f['ttft_s']['mean'] * 1e3:.2f} | "
                           f"{ratio('MoE DP+EP naive', 'ttft_s'):.2f} | {ratio('MoE DP+EP dedup', 'ttft_s'):.2f} | "
                           f"{f['tbt_s']['mean'] * 1e3:.3f} | {ratio('MoE DP+EP naive', 'tbt_s'):.2f} | "
                           f"{ratio('MoE DP+EP dedup', 'tbt_s'):.2f} |")
    summary.append("")
    stamp(axes[-1][0], {"host_name": "cost model", "date": datetime.date.today().isoformat()},
          f"foe_serve --simulate: scheduler on a virtual clock, perf::step_cost step times "
          f"({data.get('step_times', 'roofline compute')})")
    fig.tight_layout()
    fig.savefig(os.path.join(results, png), dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results = sys.argv[1]
    summary = [f"# foe benchmark summary ({datetime.date.today().isoformat()}, {platform.node()})\n"]
    layers(results, summary)
    bytes_per_rank(results, summary)
    projection(results, summary)
    serving_simulation(results, summary, "serving_sim_foe-1b_h100", "serving_sim.png")
    serving_simulation(results, summary, "serving_sim_foe-1b_h100_20tflops_1ms", "serving_sim_20tflops_1ms.png")
    with open(os.path.join(results, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
