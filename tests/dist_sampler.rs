//! `dist::shard_indices` against `torch.utils.data.DistributedSampler`, run live through
//! `$VOLTTRAIN_PYTHON_REF` (falls back to `python3`).

use volttrain::dist::{shard_indices, torch_randperm};

const CASES: &[(usize, usize, u64, u64, bool)] = &[
    // (n, world, seed, epoch, shuffle)
    (10, 2, 0, 0, true),
    (10, 3, 0, 1, true),
    (1000, 4, 42, 3, true),
    (7, 8, 5, 2, true), // fewer samples than ranks: padding repeats the list
    (11, 3, 1, 0, false),
    (1, 2, 9, 0, true),
    (4099, 2, (1u64 << 32) + 17, 1, true), // seed above 32 bits
];

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

const SCRIPT: &str = r#"
import json, sys, torch
from torch.utils.data import DistributedSampler
cases = json.loads(sys.argv[1])
out = []
for n, world, seed, epoch, shuffle in cases:
    shards = []
    for rank in range(world):
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        s.set_epoch(epoch)
        shards.append(list(s))
    g = torch.Generator(); g.manual_seed(seed + epoch)
    out.append({"shards": shards, "perm": torch.randperm(n, generator=g).tolist()})
print(json.dumps(out))
"#;

#[test]
fn shards_equal_torch_distributed_sampler() {
    let cases: Vec<serde_json::Value> = CASES
        .iter()
        .map(|&(n, w, s, e, sh)| serde_json::json!([n, w, s, e, sh]))
        .collect();
    let out = std::process::Command::new(python())
        .args(["-c", SCRIPT, &serde_json::Value::Array(cases).to_string()])
        .output()
        .expect("run the Python reference ($VOLTTRAIN_PYTHON_REF)");
    assert!(
        out.status.success(),
        "python reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (&(n, world, seed, epoch, shuffle), r) in CASES.iter().zip(&refs) {
        let perm: Vec<usize> = serde_json::from_value(r["perm"].clone()).unwrap();
        assert_eq!(
            torch_randperm(n, seed + epoch),
            perm,
            "randperm n={n} seed={seed}+{epoch}"
        );
        let shards: Vec<Vec<usize>> = serde_json::from_value(r["shards"].clone()).unwrap();
        for (rank, want) in shards.iter().enumerate() {
            let got = shard_indices(n, rank, world, seed, epoch, shuffle);
            assert_eq!(
                &got, want,
                "n={n} rank={rank}/{world} seed={seed} epoch={epoch}"
            );
        }
    }
}
