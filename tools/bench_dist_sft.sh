#!/usr/bin/env bash
# CPU data-parallel scaling of the real trainer: `volttrain sft --nproc 2` (2 Gloo processes x 1
# thread, batch B per rank) against 1 process x 1 thread with batch 2B: same model (bundled tiny
# Llama, LoRA r=16 on the llama preset), same global batch, same steps. Prints tokens/s (input
# tokens of the whole job per second, from the summary JSON of rank 0) per run, alternating the
# two set-ups REPEATS times, the ratio of medians, and the load average around each run.
#
#   tools/bench_dist_sft.sh [BIN] [STEPS] [BATCH_PER_RANK] [SEQ] [REPEATS]
#   tools/bench_dist_sft.sh target/release/volttrain 30 8 256 3
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/release/volttrain}"
steps="${2:-30}"; b="${3:-8}"; seq="${4:-256}"; repeats="${5:-3}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cfg() { # out batch
  cat > "$tmp/$1.yaml" <<YAML
model: {path: $root/assets/tiny-llama, device: cpu}
lora: {rank: 16, alpha: 32, dropout: 0.0, target_modules: llama}
dataset: {path: $root/assets/data/train.jsonl, max_seq_len: $seq}
training: {output_dir: $tmp/$1, epochs: 1, max_steps: $steps, batch_size: $2, lr: 0.01, seed: 42,
  threads: 1, log_every: 0, tensorboard: false, keep_last: 1}
YAML
}
cfg one $((2 * b)); cfg two "$b"
tps() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["tokens_per_sec"])'; }
ones=(); twos=()
for r in $(seq 1 "$repeats"); do
  rm -rf "$tmp/one" "$tmp/two"
  l0=$(cut -d' ' -f1 /proc/loadavg)
  t1=$(RUST_LOG=warn "$bin" sft --config "$tmp/one.yaml" | tps)
  t2=$(RUST_LOG=warn "$bin" sft --config "$tmp/two.yaml" --nproc 2 | tps)
  l1=$(cut -d' ' -f1 /proc/loadavg)
  echo "repeat $r: 1 proc x 1 thread ${t1} tok/s | 2 procs x 1 thread ${t2} tok/s | loadavg ${l0} -> ${l1}"
  ones+=("$t1"); twos+=("$t2")
done
python3 - "${ones[*]}" "${twos[*]}" <<'PY'
import statistics, sys
one = [float(x) for x in sys.argv[1].split()]
two = [float(x) for x in sys.argv[2].split()]
m1, m2 = statistics.median(one), statistics.median(two)
print(f"median: 1 proc {m1:.0f} tok/s, 2 procs {m2:.0f} tok/s, ratio {m2 / m1:.2f}x")
PY
