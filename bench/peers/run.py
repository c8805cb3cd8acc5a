#!/usr/bin/env python3
"""foe side by side with llama.cpp and Hugging Face transformers on the same model directories and
the same prompt token ids (issue 11, item 3). Not part of CI.

For each model: writes the model directory once (foe_run --init, seed 1), its synthetic tokenizer
and an f32 GGUF (the peers' make_tokenizer.py and convert_to_gguf.py); then, for each prompt length
and repeat, runs foe_run --timings, bench/peers/llama_greedy (libllama, compiled here) and
bench/peers/hf_greedy.py (OlmoeForCausalLM on the CPU) on one fixed, seeded list of prompt ids,
each greedy-decoding --decode tokens; takes medians, checks that the greedy tokens agree, and
writes bench/results/peers.json (every raw number) and bench/results/peers.md (tables, ratios).

The peers come from ../shared/peers/setup.sh (see its README): the variables LLAMA_CPP_DIR,
LLAMA_BIN and PEER_PYTHON when set, else setup.sh is run when ~/.cache/foe-peers holds a finished
setup. This driver uses the Python standard library only.

  python3 bench/peers/run.py --models moe-small --quick          # smoke run, a minute or two
  python3 bench/peers/run.py --models moe-small,moe-1b           # the measurement (quiet machine!)
"""
import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINES = ("foe", "llama.cpp", "transformers")


def log(msg):
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg, code=2):
    print(f"run.py: {msg}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# The peers


def find_peer_scripts(given):
    """The folder with setup.sh, make_tokenizer.py and convert_to_gguf.py."""
    candidates = [given] if given else []
    candidates += [os.environ.get("FOE_PEERS_SCRIPTS"), REPO.parent / "shared" / "peers", REPO / "shared" / "peers",
                   "/work/shared/peers"]
    for c in candidates:
        if c and (Path(c) / "setup.sh").is_file():
            return Path(c).resolve()
    return None


SETUP_HELP = """the peers (llama.cpp and a Python environment with torch and transformers) are not set up.
Set them up once per machine (10-25 minutes, about 4 GB), then run this again:
    eval "$(bash {scripts}/setup.sh)"
or export LLAMA_CPP_DIR (llama.cpp's source tree), LLAMA_BIN (its build/bin with libllama.so and
llama-bench) and PEER_PYTHON (a python with torch, transformers, tokenizers, safetensors, numpy)."""


def find_peers(scripts):
    env = {k: os.environ.get(k) for k in ("FOE_PEERS", "LLAMA_CPP_DIR", "LLAMA_BIN", "PEER_PYTHON")}
    if not (env["LLAMA_CPP_DIR"] and env["LLAMA_BIN"] and env["PEER_PYTHON"]):
        cache = Path(env["FOE_PEERS"] or Path.home() / ".cache" / "foe-peers")
        finished = (cache / "venv" / "bin" / "python").exists() and (cache / "build" / "bin" / "llama-bench").exists()
        if scripts is None or not finished:
            die(SETUP_HELP.format(scripts=scripts or "../shared/peers"))
        log(f"peers: running {scripts}/setup.sh {cache}")
        out = subprocess.run(["bash", str(scripts / "setup.sh"), str(cache)], capture_output=True, text=True)
        if out.returncode != 0:
            die(f"setup.sh failed ({out.returncode}):\n{out.stderr[-3000:]}")
        for line in out.stdout.splitlines():
            words = shlex.split(line)
            if words and words[0] == "export":
                for w in words[1:]:
                    k, _, v = w.partition("=")
                    env[k] = v
    missing = [k for k in ("LLAMA_CPP_DIR", "LLAMA_BIN", "PEER_PYTHON") if not env.get(k)]
    if missing:
        die(f"{', '.join(missing)} not set\n" + SETUP_HELP.format(scripts=scripts or "../shared/peers"))
    checks = [(Path(env["LLAMA_CPP_DIR"]) / "include" / "llama.h", "LLAMA_CPP_DIR"),
              (Path(env["LLAMA_BIN"]) / "libllama.so", "LLAMA_BIN"),
              (Path(env["PEER_PYTHON"]), "PEER_PYTHON")]
    for path, var in checks:
        if not path.exists():
            die(f"{var}: {path} does not exist\n" + SETUP_HELP.format(scripts=scripts or "../shared/peers"))
    gitlink = Path(env["LLAMA_CPP_DIR"]) / ".git"
    if gitlink.is_file():
        log(f"warning: {gitlink} is a stray gitlink file (the sdist's vendor/llama.cpp was a submodule); it makes "
            f"ninja loop with 'build.ninja still dirty' when llama.cpp is rebuilt: delete it (rm {gitlink})")
    return env


def peer_versions(env):
    v = {"llama_cpp_dir": str(Path(env["LLAMA_CPP_DIR"]).resolve())}
    m = re.search(r"llama_cpp_python-([^/]+)/", v["llama_cpp_dir"] + "/")
    if m:
        v["llama_cpp_python_sdist"] = m.group(1)
    libs = sorted(p.name for p in Path(env["LLAMA_BIN"]).glob("libllama.so.*"))
    if libs:
        v["libllama"] = libs[-1]
    return v


# --------------------------------------------------------------------------------------------
# Running things


def run(cmd, env=None, timeout=7200, what=""):
    """Runs cmd; returns (stdout, stderr); raises RuntimeError with the tail of stderr on failure."""
    t = time.perf_counter()
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what or cmd[0]}: timed out after {timeout} s")
    if p.returncode != 0:
        raise RuntimeError(f"{what or cmd[0]} exited with {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout, p.stderr, time.perf_counter() - t


def show(cmd, prompt_len=None):
    """A command for the record, the prompt's ids replaced by a placeholder."""
    words = []
    for c in map(str, cmd):
        if prompt_len is not None and c.count(",") >= 3 and re.fullmatch(r"[0-9,]+", c):
            c = f"<prompt {prompt_len}>"
        words.append(shlex.quote(c) if not c.startswith("<prompt") else c)
    return " ".join(words)


def child_env(env, threads):
    e = dict(os.environ)
    e.update({k: v for k, v in env.items() if v})
    e["OMP_NUM_THREADS"] = str(threads)
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):  # foe_run would think it runs under mpirun
        e.pop(k, None)
    return e


def prepare_model(name, a, env, cenv):
    d = Path(a.workdir) / name
    gguf = Path(f"{d}.f32.gguf")
    if not ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        log(f"{name}: writing the model directory {d}")
        run([a.foe_run, "--init", name, "--out", d, "--seed", "1"], cenv, what="foe_run --init")
    config = json.loads((d / "config.json").read_text())
    if config["vocab_size"] < 257:
        die(f"{name}: vocab_size {config['vocab_size']} < 257: make_tokenizer.py cannot write its tokenizer "
            "(use moe-small or larger)")
    weights_mtime = (d / "model.safetensors").stat().st_mtime
    if not (d / "tokenizer.json").is_file() or (d / "tokenizer.json").stat().st_mtime < weights_mtime:
        log(f"{name}: writing the synthetic tokenizer")
        run([env["PEER_PYTHON"], a.peer_scripts / "make_tokenizer.py", d], cenv, what="make_tokenizer.py")
    if not gguf.is_file() or gguf.stat().st_mtime < weights_mtime:
        log(f"{name}: converting to {gguf}")
        run([env["PEER_PYTHON"], a.peer_scripts / "convert_to_gguf.py", d, "--outtype", "f32", "--outfile", gguf],
            cenv, what="convert_to_gguf.py")
    return d, gguf, config


def prompt_ids(length, vocab, seed):
    """The fixed prompt: seeded, the same for every engine, ids in [0, vocab - 1) (the last id is
    the synthetic tokenizer's <|endoftext|>)."""
    rng = random.Random(seed * 1_000_003 + length)
    return [rng.randrange(vocab - 1) for _ in range(length)]


FOE_TIMINGS = re.compile(
    r"load ([0-9.]+) s; prefill (\d+) tokens in ([0-9.]+) s \(([0-9.]+) tokens/s\); decode (\d+) tokens in "
    r"([0-9.]+) s \(([0-9.]+) tokens/s, ([0-9.]+) ms/token\); peak RSS ([0-9.]+) MB")


def run_foe(a, d, ids, cenv):
    cmd = [a.foe_run, "--model", d, "--tokens", ",".join(map(str, ids)), "--max-new-tokens", a.decode,
           "--threads", a.threads, "--ignore-eos", "--timings"]
    out, err, _ = run(cmd, cenv, what="foe_run")
    m = FOE_TIMINGS.search(err)
    if not m:
        raise RuntimeError(f"foe_run: no --timings line on stderr: {err.strip()[-1000:]}")
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    prompt = int(m.group(2))
    decoded = int(m.group(5))
    # --timings prints seconds with 3 decimals; tokens/s gives the prefill time more precisely.
    prefill_tps = float(m.group(4))
    return cmd, {
        "load_s": float(m.group(1)),
        "prefill_s": prompt / prefill_tps if prefill_tps > 0 else float(m.group(3)),
        "decode_ms_per_token": float(m.group(8)) if decoded else None,
        "decode_steps": decoded,
        "peak_rss_mb": float(m.group(9)),
        "tokens": json.loads(line)["generated"],
        "stderr_timings": m.group(0),
    }


def from_driver_json(out):
    r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    steps = r.pop("decode_s_per_token")
    r["decode_ms_per_token"] = 1e3 * sum(steps) / len(steps) if steps else None
    r["decode_steps"] = len(steps)
    r["decode_ms_steps"] = [round(1e3 * s, 4) for s in steps]
    return r


def run_llama(a, gguf, ids, cenv):
    cmd = [a.llama_greedy, "-m", gguf, "-t", a.threads, "-n", a.decode, "-p", ",".join(map(str, ids))]
    out, _, _ = run(cmd, cenv, what="llama_greedy")
    return cmd, from_driver_json(out)


def run_hf(a, env, d, ids, cenv):
    cmd = [env["PEER_PYTHON"], HERE / "hf_greedy.py", d, "--threads", a.threads, "--new-tokens", a.decode,
           "--prompt", ",".join(map(str, ids))]
    out, _, _ = run(cmd, cenv, what="hf_greedy.py")
    return cmd, from_driver_json(out)


def build_llama_greedy(a, env):
    exe = Path(a.workdir) / "llama_greedy"
    src = HERE / "llama_greedy.cpp"
    lib = Path(env["LLAMA_BIN"]) / "libllama.so"
    if exe.is_file() and exe.stat().st_mtime > max(src.stat().st_mtime, lib.stat().st_mtime):
        return exe
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-O2", "-std=c++17", f"-I{env['LLAMA_CPP_DIR']}/include", f"-I{env['LLAMA_CPP_DIR']}/ggml/include",
           src, "-o", exe, f"-L{env['LLAMA_BIN']}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{env['LLAMA_BIN']}"]
    log(f"compiling {exe}")
    run(cmd, what="compiling llama_greedy.cpp")
    return exe


def run_llama_bench(a, env, gguf, cenv):
    cmd = [Path(env["LLAMA_BIN"]) / "llama-bench", "-m", gguf, "-p", ",".join(map(str, a.prompts)), "-n", a.decode,
           "-t", a.threads, "-r", max(a.repeats, 3), "-o", "jsonl"]
    out, _, _ = run(cmd, cenv, what="llama-bench")
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append({k: r.get(k) for k in ("n_prompt", "n_gen", "n_threads", "type_k", "type_v", "flash_attn",
                                               "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "build_commit",
                                               "cpu_info", "model_type")})
    return show(cmd), rows


# --------------------------------------------------------------------------------------------
# Summaries


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def agreement(a_tokens, b_tokens):
    if a_tokens is None or b_tokens is None:
        return None
    same = 0
    for x, y in zip(a_tokens, b_tokens):
        if x != y:
            break
        same += 1
    return {"agree": a_tokens == b_tokens, "common_prefix": same, "length": min(len(a_tokens), len(b_tokens))}


def summarize(runs, prompts):
    """medians per engine: load, prefill per prompt length, decode ms/token per prompt length,
    peak RSS (the largest prompt's)."""
    s = {}
    for eng, by_p in runs.items():
        ok = {p: [r for r in rs if "error" not in r] for p, rs in by_p.items()}
        if not any(ok.values()):
            s[eng] = {"error": next((r["error"] for rs in by_p.values() for r in rs if "error" in r), "no runs")}
            continue
        s[eng] = {
            "load_s": median([r["load_s"] for rs in ok.values() for r in rs]),
            "prefill_ms": {str(p): (1e3 * median([r["prefill_s"] for r in ok.get(p, [])]) if ok.get(p) else None)
                           for p in prompts},
            "decode_ms_per_token": {str(p): median([r["decode_ms_per_token"] for r in ok.get(p, [])]) for p in prompts},
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok.get(max(prompts), [])]),
            "runs_ok": sum(len(v) for v in ok.values()),
            "runs_failed": sum(len(rs) for rs in by_p.values()) - sum(len(v) for v in ok.values()),
        }
    return s


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(x, y):
    return None if x is None or y is None or y == 0 else x / y


def write_markdown(path, result):
    a = result["args"]
    prompts = a["prompts"]
    dp = str(min(prompts))
    lines = [f"# foe vs llama.cpp vs transformers", "",
             f"Produced by `{result['command']}` on {result['date']}", "",
             f"Machine: {result['machine']['cpu_model']}, {result['machine']['cores']} cores, load average "
             f"{result['machine']['loadavg_start']} at the start and {result['machine']['loadavg_end']} at the end. "
             f"foe {result['foe']['commit'][:12]}{' (tree modified)' if result['foe']['dirty'] else ''}; "
             f"llama.cpp {result['peers'].get('llama_cpp_python_sdist', '?')} (llama-cpp-python sdist)"
             + (f"; transformers {result['peers']['transformers']}, torch {result['peers'].get('torch', '?')}"
                if "transformers" in result["peers"] else "") + ".", "",
             f"fp32 weights everywhere (llama.cpp: an f32 GGUF, f32 KV cache), {a['threads']} threads, "
             f"medians of {a['repeats']} run(s) per configuration; prompts are fixed seeded token ids, "
             f"{a['decode']} greedy tokens ({a['decode'] - 1} decode steps) after each. Load: reading the model "
             f"until it is ready to run (llama.cpp mmaps the GGUF; transformers: from_pretrained, not the imports). "
             f"Decode ms/token after the {dp}-token prompt; peak RSS of the {max(prompts)}-token run.", ""]
    head = "| model | engine | load s | " + " | ".join(f"prefill {p} ms" for p in prompts) + \
        " | decode ms/token | peak RSS MB |"
    lines += [head, "|" + "---|" * (5 + len(prompts))]
    for model, m in result["models"].items():
        for eng in ENGINES:
            s = m["summary"].get(eng)
            if s is None:
                continue
            if "error" in s:
                lines.append(f"| {model} | {eng} | failed: {s['error'][:80]} |" + " |" * (3 + len(prompts)))
                continue
            lines.append(f"| {model} | {eng} | {fmt(s['load_s'], 2)} | " +
                         " | ".join(fmt(s["prefill_ms"][str(p)]) for p in prompts) +
                         f" | {fmt(s['decode_ms_per_token'][dp], 2)} | {fmt(s['peak_rss_mb'], 0)} |")
    lines += ["", "Ratios (< 1: foe is faster or smaller):", "",
              "| model | ratio | load | " + " | ".join(f"prefill {p}" for p in prompts) + " | decode | peak RSS |",
              "|" + "---|" * (5 + len(prompts))]
    for model, m in result["models"].items():
        for peer in ("llama.cpp", "transformers"):
            r = m["ratios"].get(f"foe/{peer}")
            if r is None:
                continue
            lines.append(f"| {model} | foe / {peer} | {fmt(r['load'], 2)} | " +
                         " | ".join(fmt(r["prefill"][str(p)], 2) for p in prompts) +
                         f" | {fmt(r['decode'][dp], 2)} | {fmt(r['peak_rss'], 2)} |")
    lines += ["", "Greedy tokens (first run of each engine; agree = all "
              f"{a['decode']} tokens the same, else the length of the common prefix):", "",
              "| model | prompt | foe = llama.cpp | foe = transformers | llama.cpp = transformers |", "|---|---|---|---|---|"]
    for model, m in result["models"].items():
        for p in prompts:
            cells = []
            for pair in ("foe=llama.cpp", "foe=transformers", "llama.cpp=transformers"):
                g = m["agreement"].get(str(p), {}).get(pair)
                cells.append("-" if g is None else "agree" if g["agree"] else
                             f"**DIFFER** after {g['common_prefix']} of {g['length']}")
            lines.append(f"| {model} | {p} | " + " | ".join(cells) + " |")
    bench_rows = [(model, r) for model, m in result["models"].items() for r in (m.get("llama_bench") or {}).get("rows", [])]
    if bench_rows:
        lines += ["", "llama-bench (its own token ids, f16 KV cache by default; a second llama.cpp reference):", "",
                  "| model | test | tokens/s | ms | ms/token |", "|---|---|---|---|---|"]
        for model, r in bench_rows:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            n = r["n_prompt"] or r["n_gen"]
            lines.append(f"| {model} | {test} | {fmt(r['avg_ts'])} | {fmt(r['avg_ns'] / 1e6)} | "
                         f"{fmt(r['avg_ns'] / 1e6 / n, 2)} |")
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------


def machine_info():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def foe_commit():
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD") or "?",
            "dirty": bool(git("status", "--porcelain", "--", "include", "examples", "CMakeLists.txt"))}


def parse_args():
    ap = argparse.ArgumentParser(description="foe vs llama.cpp vs transformers on the same models and prompt ids",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--models", default="moe-small,moe-1b", help="foe named configurations (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: %(default)s)")
    ap.add_argument("--prompts", default=None, help="prompt lengths (default: 128,512; --quick: 16,64)")
    ap.add_argument("--decode", type=int, default=None, help="greedy tokens per run (default: 32; --quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per configuration (default: 3; --quick: 1)")
    ap.add_argument("--workdir", default="/tmp/foe-peers-work", help="models, GGUFs, llama_greedy (default: %(default)s)")
    ap.add_argument("--foe-run", default=str(REPO / "build" / "examples" / "foe_run"), help="(default: %(default)s)")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"), help="where peers.json/peers.md go "
                    "(default: %(default)s)")
    ap.add_argument("--peer-scripts", default=None, help="folder with setup.sh, make_tokenizer.py, convert_to_gguf.py "
                    "(default: $FOE_PEERS_SCRIPTS, else ../shared/peers next to the repository)")
    ap.add_argument("--seed", type=int, default=1, help="the prompt ids' seed (default: %(default)s)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-llama-bench", action="store_true", help="(skipped by --quick too)")
    ap.add_argument("--quick", action="store_true", help="smoke run: prompts 16,64, 8 tokens, 1 repeat, no llama-bench")
    a = ap.parse_args()
    a.prompts = [int(x) for x in (a.prompts or ("16,64" if a.quick else "128,512")).split(",") if x]
    a.decode = a.decode if a.decode is not None else (8 if a.quick else 32)
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    a.skip_llama_bench = a.skip_llama_bench or a.quick
    a.models = [m for m in a.models.split(",") if m]
    if a.decode < 2 or a.repeats < 1 or a.threads < 1 or not a.prompts or min(a.prompts) < 1:
        ap.error("need --decode >= 2, --repeats >= 1, --threads >= 1 and positive --prompts")
    return a


def main():
    a = parse_args()
    command = "python3 bench/peers/run.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    a.foe_run = Path(a.foe_run).resolve()
    if not os.access(a.foe_run, os.X_OK):
        die(f"no foe_run at {a.foe_run}: build it (cmake --build build --target foe_run) or give --foe-run PATH")
    a.peer_scripts = find_peer_scripts(a.peer_scripts)
    env = find_peers(a.peer_scripts)
    if a.peer_scripts is None:
        die("cannot find the peers' scripts (make_tokenizer.py, convert_to_gguf.py): give --peer-scripts DIR")
    log(f"peers: LLAMA_CPP_DIR={env['LLAMA_CPP_DIR']} LLAMA_BIN={env['LLAMA_BIN']} PEER_PYTHON={env['PEER_PYTHON']}")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    cenv = child_env(env, a.threads)
    a.llama_greedy = build_llama_greedy(a, env)

    result = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "foe": {**foe_commit(), "foe_run": str(a.foe_run), "foe_run_built": datetime.datetime.fromtimestamp(
                  a.foe_run.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")},
              "peers": {**peer_versions(env), "peer_python": env["PEER_PYTHON"]},
              "args": {"models": a.models, "threads": a.threads, "prompts": a.prompts, "decode": a.decode,
                       "repeats": a.repeats, "workdir": a.workdir, "seed": a.seed,
                       "skip_transformers": a.skip_transformers, "quick": a.quick},
              "models": {}}
    engines = [e for e in ENGINES if not (e == "transformers" and a.skip_transformers)]
    failures = 0
    for model in a.models:
        log(f"{model}: preparing")
        d, gguf, config = prepare_model(model, a, env, cenv)
        prompts = {p: prompt_ids(p, config["vocab_size"], a.seed) for p in a.prompts}
        runs = {e: {p: [] for p in a.prompts} for e in engines}
        commands = {}
        for rep in range(a.repeats):
            for p in a.prompts:
                # rotate the engines' order so that none always runs first (caches, clock, neighbours)
                order = engines[rep % len(engines):] + engines[:rep % len(engines)]
                for eng in order:
                    log(f"{model}: {eng}, prompt {p}, {a.decode} tokens, repeat {rep + 1}/{a.repeats}")
                    try:
                        if eng == "foe":
                            cmd, r = run_foe(a, d, prompts[p], cenv)
                        elif eng == "llama.cpp":
                            cmd, r = run_llama(a, gguf, prompts[p], cenv)
                        else:
                            cmd, r = run_hf(a, env, d, prompts[p], cenv)
                        commands.setdefault(eng, show(cmd, p).replace(f"<prompt {p}>", "<prompt ids>"))
                        for k in ("torch", "transformers"):
                            if k in r:
                                result["peers"][k] = r.pop(k)
                        log(f"{model}: {eng}, prompt {p}: load {r['load_s']:.3f} s, prefill {1e3 * r['prefill_s']:.1f} ms, "
                            f"decode {fmt(r['decode_ms_per_token'], 2)} ms/token, peak RSS {r['peak_rss_mb']:.0f} MB")
                    except (RuntimeError, ValueError, KeyError, IndexError) as e:
                        failures += 1
                        r = {"error": str(e)}
                        log(f"{model}: {eng}, prompt {p}: FAILED: {e}")
                    runs[eng][p].append(r)
        # greedy agreement: the first successful run of each engine; and whether repeats agree with it
        agree = {}
        for p in a.prompts:
            first = {e: next((r["tokens"] for r in runs[e][p] if "tokens" in r), None) for e in engines}
            pairs = {}
            for x, y in (("foe", "llama.cpp"), ("foe", "transformers"), ("llama.cpp", "transformers")):
                if x in first and y in first:
                    pairs[f"{x}={y}"] = agreement(first[x], first[y])
            pairs["repeats_deterministic"] = {e: all(r["tokens"] == first[e] for r in runs[e][p] if "tokens" in r)
                                              for e in engines}
            agree[str(p)] = pairs
            for pair, g in pairs.items():
                if pair != "repeats_deterministic" and g is not None:
                    log(f"{model}: prompt {p}: {pair}: " + ("agree" if g["agree"] else
                        f"DIFFER after {g['common_prefix']} of {g['length']} tokens"))
        summary = summarize(runs, a.prompts)
        ratios = {}
        f = summary.get("foe", {})
        for peer in ("llama.cpp", "transformers"):
            s = summary.get(peer)
            if s is None or "error" in s or "error" in f or not f:
                continue
            ratios[f"foe/{peer}"] = {
                "load": ratio(f["load_s"], s["load_s"]),
                "prefill": {str(p): ratio(f["prefill_ms"][str(p)], s["prefill_ms"][str(p)]) for p in a.prompts},
                "decode": {str(p): ratio(f["decode_ms_per_token"][str(p)], s["decode_ms_per_token"][str(p)])
                           for p in a.prompts},
                "peak_rss": ratio(f["peak_rss_mb"], s["peak_rss_mb"]),
            }
        bench = None
        if not a.skip_llama_bench:
            log(f"{model}: llama-bench")
            try:
                bcmd, rows = run_llama_bench(a, env, gguf, cenv)
                bench = {"command": bcmd, "rows": rows}
            except RuntimeError as e:
                bench = {"error": str(e)}
                log(f"{model}: llama-bench FAILED: {e}")
        result["models"][model] = {
            "model_dir": str(d), "gguf": str(gguf), "config": {k: config.get(k) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts",
                "num_experts_per_tok", "intermediate_size", "vocab_size")},
            "prompt_ids": {str(p): ids for p, ids in prompts.items()},
            "commands": commands, "runs": {e: {str(p): rs for p, rs in by_p.items()} for e, by_p in runs.items()},
            "summary": summary, "ratios": ratios, "agreement": agree, "llama_bench": bench}

    result["machine"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    # lists of numbers (prompt ids, tokens, per-step times) on one line each
    text = re.sub(r"\[\n\s*(-?[0-9.e+-]+(?:,\n\s*-?[0-9.e+-]+)*)\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    (out / "peers.json").write_text(text + "\n")
    write_markdown(out / "peers.md", result)
    log(f"wrote {out / 'peers.json'} and {out / 'peers.md'}" + (f" ({failures} run(s) failed)" if failures else ""))
    sys.stdout.write((out / "peers.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
