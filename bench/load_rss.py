#!/usr/bin/env python3
"""Load time and memory of foe_run against the cost of reading the weight files once.

Issue 11's targets: loading a model takes at most 2x the time `cat` needs to read its weight
files, and the peak RSS is at most 1.1x the bytes of the tensors the process holds; under
mpirun each rank's RSS is near its share. For each model directory this script measures

  - `cat <weight files> > /dev/null`, cold (page cache dropped, when this user may drop it) and
    warm (median of --repeats);
  - foe_run --timings with one prompt token and one generated token: load time, peak RSS and
    the weights' bytes it holds, cold and warm, mapped (default) and --mmap off;
  - with --mpi N (and a FoE model), the same under `mpirun -np N`: every rank's peak RSS and
    share of the weights;

and writes bench/results/load_rss.{json,md}. Standard library only; not part of CI.

usage: bench/load_rss.py DIR [DIR ...] [--foe-run build/examples/foe_run] [--repeats 3] [--mpi 8]
Model directories come from `foe_run --init moe-1b --out DIR` (see the README's benchmarks).
"""
import argparse
import datetime
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = re.compile(r"load ([0-9.]+) s;.*peak RSS ([0-9.]+) MB; weights held ([0-9.]+) MB")
RANK = re.compile(r"rank (\d+): peak RSS ([0-9.]+) MB; weights held ([0-9.]+) MB")


def log(*args):
    print("load_rss:", *args, file=sys.stderr, flush=True)


def drop_caches():
    """True when the page cache could be dropped (root on Linux)."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def weight_files(model_dir):
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        sys.exit(f"load_rss: {model_dir} holds no .safetensors file")
    return files


def time_cat(files):
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run_foe(foe_run, model_dir, extra, mpi=0):
    cmd = [foe_run, "--model", model_dir, "--tokens", "1", "--max-new-tokens", "1", "--timings", *extra]
    env = dict(os.environ)
    if mpi:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(mpi), *cmd]
        env["OMP_NUM_THREADS"] = "1"
    else:  # never let a launcher's variables turn a plain run distributed
        for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
            env.pop(k, None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"load_rss: {' '.join(cmd)} failed:\n{out.stderr}")
    m = TIMINGS.search(out.stderr)
    if not m:
        sys.exit(f"load_rss: no timings line in the output of {' '.join(cmd)}:\n{out.stderr}")
    ranks = [{"rank": int(r), "peak_rss_mb": float(rss), "weights_mb": float(w)} for r, rss, w in RANK.findall(out.stderr)]
    return {"command": " ".join(cmd), "load_s": float(m.group(1)), "peak_rss_mb": float(m.group(2)),
            "weights_mb": float(m.group(3)), "ranks": ranks}


def measure(model_dir, args, can_drop):
    files = weight_files(model_dir)
    size_mb = sum(os.path.getsize(f) for f in files) / 2**20
    result = {"model_dir": model_dir, "file_mb": size_mb}
    if can_drop:
        drop_caches()
        result["cat_cold_s"] = time_cat(files)
    result["cat_warm_s"] = statistics.median(time_cat(files) for _ in range(args.repeats))
    for name, extra in (("mapped", []), ("read", ["--mmap", "off"])):
        runs = []
        if can_drop:
            drop_caches()
            log(f"{model_dir}: foe_run {name}, cold")
            result[f"foe_{name}_cold"] = run_foe(args.foe_run, model_dir, extra)
        for i in range(args.repeats):
            log(f"{model_dir}: foe_run {name}, warm {i + 1}/{args.repeats}")
            runs.append(run_foe(args.foe_run, model_dir, extra))
        runs.sort(key=lambda r: r["load_s"])
        result[f"foe_{name}_warm"] = runs[len(runs) // 2]
    if args.mpi:
        log(f"{model_dir}: foe_run under mpirun -np {args.mpi}")
        result["mpi"] = run_foe(args.foe_run, model_dir, [], mpi=args.mpi)
    return result


def table(results, can_drop):
    lines = ["| model | file MB | cat warm s | " + ("cat cold s | " if can_drop else "") +
             "foe load, mapped, warm s (x cat) | " + ("mapped, cold s (x cat) | " if can_drop else "") +
             "read, warm s (x cat) | peak RSS MB (x weights held) | read: peak RSS MB (x held) |",
             "|---|---|---|" + ("---|" if can_drop else "") + "---|" + ("---|" if can_drop else "") + "---|---|---|"]
    for r in results:
        mw, rw = r["foe_mapped_warm"], r["foe_read_warm"]
        row = [os.path.basename(r["model_dir"].rstrip("/")), f"{r['file_mb']:.0f}", f"{r['cat_warm_s']:.3f}"]
        if can_drop:
            row.append(f"{r['cat_cold_s']:.3f}")
        row.append(f"{mw['load_s']:.3f} ({mw['load_s'] / r['cat_warm_s']:.2f})")
        if can_drop:
            mc = r["foe_mapped_cold"]
            row.append(f"{mc['load_s']:.3f} ({mc['load_s'] / r['cat_cold_s']:.2f})")
        row.append(f"{rw['load_s']:.3f} ({rw['load_s'] / r['cat_warm_s']:.2f})")
        row.append(f"{mw['peak_rss_mb']:.0f} ({mw['peak_rss_mb'] / mw['weights_mb']:.2f})")
        row.append(f"{rw['peak_rss_mb']:.0f} ({rw['peak_rss_mb'] / rw['weights_mb']:.2f})")
        lines.append("| " + " | ".join(row) + " |")
    for r in results:
        if "mpi" in r:
            lines += ["", f"`{r['mpi']['command']}`", "", "| rank | peak RSS MB | weights held MB | RSS / held |",
                      "|---|---|---|---|"]
            for k in r["mpi"]["ranks"]:
                lines.append(f"| {k['rank']} | {k['peak_rss_mb']:.0f} | {k['weights_mb']:.0f} | "
                             f"{k['peak_rss_mb'] / max(k['weights_mb'], 1e-9):.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--foe-run", default=os.path.join(REPO, "build", "examples", "foe_run"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mpi", type=int, default=0, help="also run under mpirun -np N (FoE models)")
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args()
    if not os.access(args.foe_run, os.X_OK):
        sys.exit(f"load_rss: {args.foe_run} is not an executable; build it: cmake --build build --target foe_run")
    can_drop = drop_caches()
    if not can_drop:
        log("cannot drop the page cache (needs root): warm measurements only")
    results = [measure(d, args, can_drop) for d in args.dirs]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "foe_commit": commit, "command": " ".join(sys.argv)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "load_rss.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    md = (f"# foe_run load time and memory against reading the weights once\n\n`{meta['command']}`\n\n"
          f"{meta['date']}, {cpu}, {meta['cores']} cores, foe {commit}. Warm: files in the page cache "
          f"(median of {args.repeats}); cold: page cache dropped first. foe_run generates one token from a "
          f"one-token prompt; load time is what `--timings` reports (mapped: prefetch of every held page "
          f"included).\n\n" + table(results, can_drop) + "\n")
    with open(os.path.join(args.out_dir, "load_rss.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
