#!/usr/bin/env python3
"""The GPU acceptance run (`./dev gpu-check`), in two halves so that a GPU machine without Rust
or network can run binaries built elsewhere:

  prepare   (a machine with cargo; `./dev gpu-check --prepare`) builds the `volttrain` binary
            (the library's CLI), the `volttrain-gpu-check` binary of the bench/ crate
            (package volttrain-bench) and the test binaries that hold CUDA-only tests,
            strips them and packs them (xz) into gpu-check/ with a manifest. Carry that folder
            (at most 64 MiB) to the GPU machine with the checkout.
  run       (the GPU machine; `python3 tools/gpu_check.py run` or `./dev gpu-check --run`)
            needs only python3 with torch 2.11.0 (and, for the comparison, transformers and
            peft; bitsandbytes when present). It runs the binaries against that torch's own
            library directory, then:
              1. `volttrain env --json` (NCCL must be compiled in);
              2. the CUDA-only tests;
              3. a world-size-1 NCCL process group through every collective the trainer uses
                 (with two or more GPUs also NCCL data parallel against one process);
              4. on a Llama-3.2-1B-shaped model with random weights: bf16 LoRA, NF4 QLoRA (bf16
                 compute) and bf16 full fine-tuning steps, VoltTrain and PyTorch + PEFT in the
                 same run: tokens/s, MFU, peak GPU memory;
            prints one table and writes bench/results/bench-results-gpu.json.
  run --cpu-smoke  the same pipeline on the CPU with a tiny model (fp32), to check the driver,
            the binaries and the table/JSON path on a machine without a GPU. Its figures say
            nothing about GPUs.

`./dev gpu-check` with no option does both halves on a GPU machine that has cargo.
"""
import argparse
import datetime
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Binaries and the package that builds each.
BINS = {"volttrain": "volttrain", "volttrain-gpu-check": "volttrain-bench"}
RESULTS = os.path.join(ROOT, "bench", "results")
# Test binaries of the library and their CUDA-only tests (each skips itself, saying so, without
# a GPU).
CUDA_TESTS = {
    "amp_parity": [
        "cuda_autocast_uses_the_requested_dtype",
        "cuda_bf16_step_matches_the_cpu_bf16_step",
        "cuda_fp16_training_scales_the_loss_and_trains",
    ],
    "dist_pg": ["nccl_world_size_one"],
    "model_dtype": ["cuda_half_base_trains_fp32_adapter"],
    "muon_device": ["spectral_path_on_cuda"],
    "quant_formats": ["fp8_training_on_a_device_without_fp8_is_an_error"],
    "quant_qlinear": ["cuda_quantized_linear_matches_cpu"],
}
CARRY_LIMIT = 64 * 1024 * 1024
# Dense bf16 peak FLOP/s from NVIDIA's data sheets (the figures with sparsity halved).
PEAK_BF16 = [
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
]
MODES = ["lora", "qlora", "full"]


def log(msg):
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# prepare


def cargo_json(args, env):
    out = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, check=True, text=True)
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def prepare(args):
    env = dict(os.environ)
    profile = "dev" if args.debug else "release"
    out_dir = os.path.abspath(args.dir)
    log(f"building ({profile}) the binaries and CUDA test binaries")
    exes = {}
    cmd = ["cargo", "build", "--profile", profile, "--message-format=json"]
    for b, package in BINS.items():
        cmd += ["-p", package, "--bin", b]
    for m in cargo_json(cmd, env):
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            if m["target"]["name"] in BINS:
                exes[m["target"]["name"]] = m["executable"]
    cmd = ["cargo", "test", "--profile", profile, "--no-run", "--message-format=json",
           "-p", "volttrain"]
    for t in CUDA_TESTS:
        cmd += ["--test", t]
    for m in cargo_json(cmd, env):
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            if m["target"]["name"] in CUDA_TESTS:
                exes[m["target"]["name"]] = m["executable"]
    missing = [n for n in list(BINS) + list(CUDA_TESTS) if n not in exes]
    if missing:
        sys.exit(f"gpu-check: cargo built no executable for {missing}")
    env_json = subprocess.run([exes["volttrain"], "env", "--json"], stdout=subprocess.PIPE,
                              check=True, text=True).stdout
    report = json.loads(env_json)
    if "nccl" not in report["distributed_backends"]:
        sys.exit(f"gpu-check: this build has no NCCL ({report['nccl_build']}); the GPU run needs "
                 "it. Run tools/provision.sh and build again.")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.join(out_dir, "bin"))
    total = 0
    for name, path in sorted(exes.items()):
        tmp = os.path.join(out_dir, name + ".tmp")
        shutil.copyfile(path, tmp)
        subprocess.run(["strip", "--strip-debug", tmp], check=True)
        with open(tmp, "rb") as f, lzma.open(os.path.join(out_dir, "bin", name + ".xz"), "wb",
                                             preset=6) as z:
            shutil.copyfileobj(f, z)
        os.remove(tmp)
        size = os.path.getsize(os.path.join(out_dir, "bin", name + ".xz"))
        total += size
        log(f"  {name}: {size / 2**20:.1f} MiB packed")
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True).stdout.strip()
    manifest = {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile,
        "git": git,
        "source_dir": ROOT,
        "build_env": report,
        "binaries": sorted(exes),
        "cuda_tests": CUDA_TESTS,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if total > CARRY_LIMIT:
        sys.exit(f"gpu-check: packed binaries take {total / 2**20:.1f} MiB, over the 64 MiB "
                 "carry limit")
    log(f"ready: {out_dir} ({total / 2**20:.1f} MiB); on the GPU machine run "
        "`python3 tools/gpu_check.py run` (or ./dev gpu-check --run)")


# ---------------------------------------------------------------------------------------------
# run


def torch_env(python):
    """LD_LIBRARY_PATH for this machine's torch: its lib/ and the NVIDIA wheels' lib/ folders."""
    code = ("import os, torch; d = os.path.dirname(torch.__file__); sp = os.path.dirname(d); "
            "nv = os.path.join(sp, 'nvidia'); "
            "libs = [os.path.join(d, 'lib')] + sorted(os.path.join(nv, x, 'lib') for x in "
            "(os.listdir(nv) if os.path.isdir(nv) else []) if os.path.isdir(os.path.join(nv, x, 'lib'))); "
            "print(torch.__version__); print(os.pathsep.join(libs)); "
            "print(torch.cuda.device_count()); "
            "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
    out = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, check=True, text=True)
    version, libs, count, name = (out.stdout.splitlines() + ["", "", "0", ""])[:4]
    return version, libs, int(count or 0), name


def unpack(src_dir, dst_dir):
    os.makedirs(dst_dir, exist_ok=True)
    paths = {}
    for f in sorted(os.listdir(os.path.join(src_dir, "bin"))):
        if not f.endswith(".xz"):
            continue
        name = f[:-3]
        dst = os.path.join(dst_dir, name)
        with lzma.open(os.path.join(src_dir, "bin", f), "rb") as z, open(dst, "wb") as o:
            shutil.copyfileobj(z, o)
        os.chmod(dst, 0o755)
        paths[name] = dst
    return paths


def run_json(cmd, env, timeout, what):
    t0 = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}) after {time.time() - t0:.0f} s:\n"
                           f"{p.stderr[-3000:]}")
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        pass
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"{what}: no JSON on stdout:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return json.loads(lines[-1])


def peak_flops(gpu_name, override):
    if override:
        return override * 1e12
    for key, v in PEAK_BF16:
        if key in gpu_name:
            return v
    return None


def flops_per_token(shape, mode, r=16):
    """Model FLOPs per trained token (no recompute), after PaLM's appendix B (Chowdhery et al.
    2022): 2 FLOPs per weight per token forward, attention 4*L*h*seq forward; full fine-tuning
    3x forward; with a frozen base the weight gradients are skipped (2x forward for the base,
    3x for attention), plus 6 FLOPs per LoRA weight."""
    h, L, I, V = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    kv = h * shape["kv_heads"] // shape["heads"]
    n = L * (2 * h * h + 2 * h * kv + 3 * h * I) + h * V
    attn = 4 * L * h * shape["seq"]
    if mode == "full":
        return 3 * (2 * n + attn)
    lora = L * r * ((h + h) * 2 + (h + kv) * 2 + (h + I) * 3)
    return 2 * (2 * n) + 3 * attn + 6 * lora


SHAPES = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                         vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
}


def run_tests(exes, env, smoke, results):
    for binary, names in CUDA_TESTS.items():
        for name in names:
            t0 = time.time()
            try:
                p = subprocess.run([exes[binary], "--exact", name, "--nocapture",
                                    "--test-threads", "1"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=240, cwd=ROOT)
                out, rc = p.stdout, p.returncode
            except subprocess.TimeoutExpired as e:
                out, rc = (e.stdout or "") + "\nTIMEOUT after 240 s", 124
            ran = "1 passed" in out or "1 failed" in out
            skipped = "skipped" in out.lower() and rc == 0
            status = "FAIL" if rc != 0 or not ran else ("skipped" if skipped else "pass")
            results.append({"test": f"{binary}::{name}", "status": status,
                            "seconds": round(time.time() - t0, 1),
                            "output_tail": out[-1500:] if status != "pass" else ""})
            log(f"test {binary}::{name}: {status}")


def dp_config(work, name, batch, gpus):
    out = os.path.join(work, "dp", name)
    shutil.rmtree(out, ignore_errors=True)
    a = lambda p: os.path.join(ROOT, "assets", p)  # noqa: E731
    device = f"  gpu_devices: {gpus}\n" if gpus else ""
    yaml = (f"model:\n  path: {a('tiny-llama')}\n" + ("" if gpus else "  device: cpu\n") +
            "lora:\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: llama\n"
            f"dataset:\n  path: {a('data/train.jsonl')}\n  eval_path: {a('data/eval.jsonl')}\n"
            "  max_seq_len: 128\n"
            f"training:\n  output_dir: {out}\n  epochs: 1\n  max_steps: 4\n"
            f"  batch_size: {batch}\n  lr: 0.01\n  seed: 7\n  threads: 1\n  log_every: 1\n"
            "  warmup_ratio: 0.0\n  min_lr_ratio: 0.0\n  tensorboard: false\n"
            "  precision: fp32\n" + device)
    path = os.path.join(work, "dp", name + ".yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(yaml)
    return path, out


def dp_parity(exes, env, work, python, on_gpu):
    """Two data-parallel ranks (NCCL on cuda:0 and cuda:1, or Gloo on the CPU) against one
    process on the same global batch (tests/dist_trainer.rs's recipe): fp32, LoRA on the bundled
    model and data, 4 steps; losses and the adapter weights of `last/` must agree to 1e-5."""
    c2, out2 = dp_config(work, "ranks2", 2, [0, 1] if on_gpu else None)
    c1, out1 = dp_config(work, "ranks1", 4, [0] if on_gpu else None)
    runs = {}
    for name, cfg, extra in [("2 ranks", c2, [] if on_gpu else ["--nproc", "2"]),
                             ("1 process", c1, [])]:
        p = subprocess.run([exes["volttrain"], "sft", "--config", cfg, *extra], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"volttrain sft ({name}) failed:\n{p.stderr[-3000:]}")
        runs[name] = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    s2, s1 = runs["2 ranks"], runs["1 process"]
    code = ("import sys, glob, os, json; from safetensors.torch import load_file\n"
            "a, b = sys.argv[1:3]; d = 0.0; n = 0\n"
            "for f in sorted(glob.glob(os.path.join(a, 'last', '*.safetensors'))):\n"
            "    x, y = load_file(f), load_file(os.path.join(b, 'last', os.path.basename(f)))\n"
            "    for k in x:\n"
            "        d = max(d, (x[k].double() - y[k].double()).abs().max().item()); n += 1\n"
            "print(json.dumps({'max_abs_diff': d, 'tensors': n}))\n")
    w = json.loads(subprocess.run([python, "-c", code, out2, out1], stdout=subprocess.PIPE,
                                  check=True, text=True).stdout)
    res = {
        "backend": "nccl" if on_gpu else "gloo",
        "steps": [s2["steps"], s1["steps"]],
        "tokens": [s2["tokens"], s1["tokens"]],
        "final_train_loss": [s2["final_train_loss"], s1["final_train_loss"]],
        "final_eval_loss": [s2["final_eval_loss"], s1["final_eval_loss"]],
        "weights_max_abs_diff": w["max_abs_diff"],
        "weight_tensors_compared": w["tensors"],
    }
    ok = (s2["steps"] == s1["steps"] == 4 and s2["tokens"] == s1["tokens"]
          and abs(s2["final_train_loss"] - s1["final_train_loss"]) < 1e-5
          and abs(s2["final_eval_loss"] - s1["final_eval_loss"]) < 1e-5
          and w["tensors"] > 0 and w["max_abs_diff"] < 1e-5)
    res["status"] = "pass" if ok else "FAIL"
    return res


def median(xs):
    return statistics.median(xs) if xs else None


def run(args):
    pack = os.path.abspath(args.dir)
    manifest_path = os.path.join(pack, "manifest.json")
    if not os.path.exists(manifest_path):
        sys.exit(f"gpu-check: {manifest_path} is missing; run `./dev gpu-check --prepare` on a "
                 "machine with cargo first and carry gpu-check/ here")
    with open(manifest_path) as f:
        manifest = json.load(f)
    python = sys.executable
    t_start = time.time()
    torch_version, libs, gpus, gpu_name = torch_env(python)
    smoke = args.cpu_smoke
    if not smoke and gpus == 0:
        sys.exit("gpu-check: torch sees no CUDA device here; use --cpu-smoke to check the driver "
                 "on a CPU machine")
    log(f"torch {torch_version}, {gpus} GPU(s) {gpu_name}; libs: {libs.split(os.pathsep)[0]}")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    exes = unpack(pack, os.path.join(work, "bin"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = libs + (os.pathsep + env["LD_LIBRARY_PATH"]
                                     if env.get("LD_LIBRARY_PATH") else "")
    env["VOLTTRAIN_PYTHON_REF"] = python
    env.setdefault("RUST_BACKTRACE", "1")
    # Test binaries name their fixtures by the build machine's checkout path: point it here.
    src = manifest["source_dir"]
    if os.path.realpath(src) != os.path.realpath(ROOT) and not os.path.exists(src):
        try:
            os.makedirs(os.path.dirname(src), exist_ok=True)
            os.symlink(ROOT, src)
            log(f"linked {src} -> {ROOT} (fixture paths of the test binaries)")
        except OSError as e:
            log(f"cannot link {src} -> {ROOT} ({e}); tests that read fixtures may fail")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "cpu-smoke" if smoke else "gpu",
        "gpu": gpu_name or None,
        "gpu_count": gpus,
        "torch": torch_version,
        "binaries": {k: manifest[k] for k in ("built", "profile", "git")},
        "failures": [],
    }
    envr = run_json([exes["volttrain"], "env", "--json"], env, 120, "volttrain env --json")
    result["env"] = envr
    if "nccl" not in envr["distributed_backends"]:
        result["failures"].append(f"NCCL not compiled in: {envr['nccl_build']}")

    tests = []
    if not args.skip_tests:
        run_tests(exes, env, smoke, tests)
    result["tests"] = tests
    result["failures"] += [f"test {t['test']}" for t in tests if t["status"] == "FAIL"]
    if not smoke:
        result["failures"] += [f"test {t['test']} skipped on a GPU machine" for t in tests
                               if t["status"] == "skipped"]

    tiny = os.path.join(work, "tiny")
    gc = exes["volttrain-gpu-check"]
    dev = ["--cpu"] if smoke else []
    run_json([gc, "write-model", "--shape", "tiny", "--batch", "2", "--seq", "32", tiny], env,
             120, "write tiny model")
    try:
        result["collectives"] = run_json([gc, "collectives", *dev, "--model", tiny], env, 300,
                                         "collectives")
        log(f"collectives ({result['collectives']['backend']}): "
            f"{len(result['collectives']['ran'])} checks passed")
        if not smoke and result["collectives"]["backend"] != "nccl":
            result["failures"].append("collectives did not run on nccl")
    except Exception as e:  # noqa: BLE001
        result["collectives"] = {"error": str(e)}
        result["failures"].append("collectives")
    if (gpus >= 2 and not smoke) or smoke:
        # On the smoke run the same comparison with two Gloo ranks on the CPU.
        try:
            result["data_parallel"] = dp_parity(exes, env, work, python, not smoke)
        except Exception as e:  # noqa: BLE001
            result["data_parallel"] = {"status": "FAIL", "error": str(e)}
        if result["data_parallel"]["status"] != "pass":
            result["failures"].append("data-parallel parity")
        log(f"data parallel ({result['data_parallel'].get('backend', '?')}): "
            f"{result['data_parallel']['status']}")
    else:
        result["data_parallel"] = {"status": f"skipped: {gpus} GPU; NCCL data parallel needs 2 "
                                             "or more (world size 1 ran above)"}

    shape_name = "tiny" if smoke else args.shape
    batch, seq = (2, 32) if smoke else (args.batch, args.seq)
    warmup, steps = (1, 3) if smoke else (args.warmup, args.steps)
    shape = dict(SHAPES[shape_name], seq=seq, batch=batch)
    model = os.path.join(work, f"model-{shape_name}-{batch}x{seq}")
    if not os.path.exists(os.path.join(model, "batch.safetensors")):
        log(f"writing the random {shape_name} checkpoint to {model}")
        run_json([gc, "write-model", "--shape", shape_name, "--batch", str(batch), "--seq",
                  str(seq), model], env, 600, "write model")
    peak = None if smoke else peak_flops(gpu_name, args.peak_tflops)
    rows = []
    for mode in MODES:
        fpt = flops_per_token(shape, mode)
        row = {"mode": mode, "shape": shape_name, "batch": batch, "seq": seq,
               "flops_per_token": fpt, "peak_bf16_flops": peak}
        for side, cmd in [
            ("volttrain", [gc, "steps", "--mode", mode, "--shape", shape_name, "--batch",
                           str(batch), "--seq", str(seq), "--warmup", str(warmup), "--steps",
                           str(steps), *dev, model]),
            ("reference", [python, os.path.join(ROOT, "reference", "bench_gpu.py"), "--model",
                           model, "--mode", mode, "--warmup", str(warmup), "--steps",
                           str(steps), *dev]),
        ]:
            try:
                r = run_json(cmd, env, 900, f"{side} {mode}")
            except Exception as e:  # noqa: BLE001
                r = {"error": str(e)}
                result["failures"].append(f"{side} {mode}")
            if "step_seconds" in r:
                s = median(r["step_seconds"])
                r["tokens_per_s"] = r["tokens_per_step"] / s
                r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None
            row[side] = r
            log(f"{mode} {side}: " + (f"{r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r
                                      else json.dumps(r)[:300]))
        v, ref = row["volttrain"], row["reference"]
        if "tokens_per_s" in v and "tokens_per_s" in ref:
            row["speedup"] = v["tokens_per_s"] / ref["tokens_per_s"]
        rows.append(row)
    result["steps"] = rows
    # The issue's goals, checked on GPU runs only.
    goals = {}
    by = {r["mode"]: r for r in rows}
    if not smoke:
        lv = by["lora"]["volttrain"]
        goals["lora_mfu_at_least_0.40"] = (lv.get("mfu") or 0) >= 0.40
        goals["lora_faster_than_peft"] = (by["lora"].get("speedup") or 0) > 1.0
        q, l = by["qlora"]["volttrain"].get("peak_bytes"), lv.get("peak_bytes")
        goals["qlora_peak_at_most_half_of_lora"] = bool(q and l and q <= 0.5 * l)
    result["goals"] = goals
    result["seconds"] = round(time.time() - t_start, 1)

    print_table(result)
    out = os.path.abspath(args.out or (os.path.join(work, "bench-results-gpu-smoke.json")
                                       if smoke else os.path.join(RESULTS, "bench-results-gpu.json")))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    log(f"wrote {out} ({result['seconds']:.0f} s)")
    if result["failures"]:
        log("FAILED: " + "; ".join(result["failures"]))
        sys.exit(1)


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def print_table(result):
    gib = 2 ** 30
    print(f"\nVoltTrain GPU check, {result['date']}, {result['gpu'] or 'CPU (smoke run)'}, "
          f"torch {result['torch']}\n")
    print("| step | VoltTrain tokens/s | MFU | peak GiB | reference | ref tokens/s | ref MFU "
          "| ref peak GiB | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["steps"]:
        v, ref = r["volttrain"], r["reference"]
        name = {"lora": "bf16 LoRA r16", "qlora": "NF4 QLoRA r16 (bf16 compute)",
                "full": "bf16 full fine-tuning"}[r["mode"]]
        if result["mode"] == "cpu-smoke":
            name += " [cpu fp32 smoke]"
        pk = lambda d: d.get("peak_bytes") / gib if d.get("peak_bytes") else None  # noqa: E731
        print(f"| {name}, {r['shape']} {r['batch']}x{r['seq']} | {fmt(v.get('tokens_per_s'), '.0f')} "
              f"| {fmt(v.get('mfu'), '.1%')} | {fmt(pk(v), '.2f')} "
              f"| {ref.get('impl', ref.get('unavailable', ref.get('error', '-'))[:40])} "
              f"| {fmt(ref.get('tokens_per_s'), '.0f')} | {fmt(ref.get('mfu'), '.1%')} "
              f"| {fmt(pk(ref), '.2f')} | {fmt(r.get('speedup'), '.2f')}x |")
    c = result.get("collectives", {})
    print(f"\ncollectives: {c.get('backend', '-')} world size 1 on {c.get('device', '-')}: "
          f"{len(c.get('ran', []))} checks {'passed' if 'ran' in c else 'FAILED'}; "
          f"data parallel: {result['data_parallel']['status']}")
    t = result["tests"]
    print(f"CUDA-only tests: {sum(x['status'] == 'pass' for x in t)} passed, "
          f"{sum(x['status'] == 'skipped' for x in t)} skipped, "
          f"{sum(x['status'] == 'FAIL' for x in t)} failed")
    if result["goals"]:
        print("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                    for k, v in result["goals"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build and pack the binaries (needs cargo)")
    p.add_argument("--dir", default=os.path.join(ROOT, "gpu-check"))
    p.add_argument("--debug", action="store_true", help="debug profile (faster to build)")
    r = sub.add_parser("run", help="run the check with the packed binaries")
    r.add_argument("--dir", default=os.path.join(ROOT, "gpu-check"))
    r.add_argument("--work", default=os.path.join(ROOT, "gpu-check", "work"))
    r.add_argument("--out", default=None,
                   help="default: bench/results/bench-results-gpu.json (gpu-check/work/ for "
                   "--cpu-smoke)")
    r.add_argument("--cpu-smoke", action="store_true")
    r.add_argument("--skip-tests", action="store_true")
    r.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU when its name is not in the table")
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
