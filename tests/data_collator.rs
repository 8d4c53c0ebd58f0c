//! Collator against transformers' `DataCollatorForSeq2Seq` (padding) and
//! `DataCollatorWithFlattening` (packing), packed attention against separate attention, and the
//! batch iterator (shuffle per (seed, epoch), shards, resume).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tch::{Kind, Tensor};
use volttrain::data::loader::{BatchIter, DataLoader, LoaderOptions};
use volttrain::data::{
    Collator, DatasetConfig, Example, IGNORE_INDEX, PaddingSide, SftDataset, Tokenizer,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_ref(args: &[&str]) -> serde_json::Value {
    let py = std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into());
    let out = Command::new(py)
        .arg(root().join("reference/data_ref.py"))
        .args(args)
        .output()
        .expect("run reference/data_ref.py");
    assert!(
        out.status.success(),
        "data_ref.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(s.lines().last().unwrap()).unwrap()
}

fn dataset() -> (Tokenizer, SftDataset) {
    let tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let c = DatasetConfig {
        cache: false,
        ..DatasetConfig::new(root().join("tests/fixtures/data/mixed.jsonl"))
    };
    let ds = SftDataset::load(&c, &tok).unwrap();
    (tok, ds)
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let t = t.to_kind(Kind::Int64);
    (0..t.size()[0])
        .map(|i| Vec::<i64>::try_from(t.get(i)).unwrap())
        .collect()
}

fn json_rows(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn reference(tok: &Tokenizer, ex: &[&Example], side: &str) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.json");
    let examples: Vec<_> = ex
        .iter()
        .map(|e| serde_json::json!({"input_ids": e.input_ids, "labels": e.labels}))
        .collect();
    std::fs::write(
        &p,
        serde_json::json!({"examples": examples, "padding_side": side}).to_string(),
    )
    .unwrap();
    data_ref(&[
        "collate",
        "--tok",
        tok.dir().to_str().unwrap(),
        "--input",
        p.to_str().unwrap(),
    ])
}

#[test]
fn padding_matches_data_collator_for_seq2seq() {
    let (tok, ds) = dataset();
    let ex: Vec<&Example> = ds.examples.iter().collect();
    assert!(ex.iter().map(|e| e.len()).collect::<BTreeSet<_>>().len() > 2);
    let pad = tok.pad().unwrap().id as i64;
    for (side, ps) in [("right", PaddingSide::Right), ("left", PaddingSide::Left)] {
        let b = Collator::new(pad, ps).collate(&ex).unwrap();
        let r = reference(&tok, &ex, side);
        assert_eq!(
            rows(&b.input_ids),
            json_rows(&r["padded"]["input_ids"]),
            "{side}"
        );
        assert_eq!(
            rows(&b.attention_mask),
            json_rows(&r["padded"]["attention_mask"]),
            "{side}"
        );
        assert_eq!(rows(&b.labels), json_rows(&r["padded"]["labels"]), "{side}");
        assert_eq!(b.input_ids.kind(), Kind::Int64);
        assert_eq!(b.num_tokens, ds.num_tokens());
        // Left padding: positions count from the first real token.
        if ps == PaddingSide::Left {
            let pos = rows(b.position_ids.as_ref().unwrap());
            for (p, e) in pos.iter().zip(&ex) {
                let n = e.len();
                let t = p.len();
                assert_eq!(p[t - n..].to_vec(), (0..n as i64).collect::<Vec<_>>());
            }
        } else {
            assert!(b.position_ids.is_none());
        }
    }
}

#[test]
fn packing_matches_data_collator_with_flattening() {
    let (tok, ds) = dataset();
    let ex: Vec<&Example> = ds.examples.iter().collect();
    let pad = tok.pad().unwrap().id as i64;
    let c = Collator::new(pad, PaddingSide::Right);
    // Two rows: all examples, and the first two (padded to the first row's length).
    let b = c.collate_packed(&[ex.clone(), ex[..2].to_vec()]).unwrap();
    let r = reference(&tok, &ex, "right");
    let flat_ids = json_rows(&r["flat"]["input_ids"]).remove(0);
    let flat_lab = json_rows(&r["flat"]["labels"]).remove(0);
    let flat_pos = json_rows(&r["flat"]["position_ids"]).remove(0);
    assert_eq!(rows(&b.input_ids)[0], flat_ids);
    assert_eq!(rows(&b.labels)[0], flat_lab);
    assert_eq!(rows(b.position_ids.as_ref().unwrap())[0], flat_pos);
    let r2 = reference(&tok, &ex[..2], "right");
    let n2: usize = ex[..2].iter().map(|e| e.len()).sum();
    let row1 = rows(&b.labels)[1].clone();
    assert_eq!(
        row1[..n2].to_vec(),
        json_rows(&r2["flat"]["labels"]).remove(0)
    );
    assert!(row1[n2..].iter().all(|&l| l == IGNORE_INDEX));
    assert!(rows(&b.input_ids)[1][n2..].iter().all(|&t| t == pad));
    assert_eq!(
        b.attention_mask.size(),
        [2, 1, flat_ids.len() as i64, flat_ids.len() as i64]
    );
    assert_eq!(b.attention_mask.kind(), Kind::Bool);
}

/// softmax(q k^T / sqrt(d) masked) v for one sequence; `mask[q][k]` true = attend.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let d = q.size()[1] as f64;
    let s = q.matmul(&k.transpose(0, 1)) / d.sqrt();
    let s = s.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    s.softmax(-1, Kind::Float).matmul(v)
}

#[test]
fn packed_attention_equals_attention_per_example() {
    let (tok, ds) = dataset();
    let ex: Vec<&Example> = ds.examples.iter().collect();
    let c = Collator::new(tok.pad().unwrap().id as i64, PaddingSide::Right);
    let b = c.collate_packed(std::slice::from_ref(&ex)).unwrap();
    let t = b.input_ids.size()[1];
    tch::manual_seed(0);
    let (q, k, v) = (
        Tensor::randn([t, 16], (Kind::Float, tch::Device::Cpu)),
        Tensor::randn([t, 16], (Kind::Float, tch::Device::Cpu)),
        Tensor::randn([t, 16], (Kind::Float, tch::Device::Cpu)),
    );
    let packed = attention(&q, &k, &v, &b.attention_mask.get(0).get(0));
    let mut at = 0;
    for e in &ex {
        let n = e.len() as i64;
        let causal = Tensor::ones([n, n], (Kind::Bool, tch::Device::Cpu)).tril(0);
        let sl = |x: &Tensor| x.narrow(0, at, n);
        let alone = attention(&sl(&q), &sl(&k), &sl(&v), &causal);
        let diff = (sl(&packed) - alone).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "example at {at}: max diff {diff}");
        at += n;
    }
    assert_eq!(at, t);
}

fn opts(
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    rank: usize,
    world: usize,
    drop_last: bool,
) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed,
        shuffle,
        drop_last,
        rank,
        world,
        packing: None,
    }
}

#[test]
fn batch_order_is_deterministic_per_seed_and_epoch() {
    let a: Vec<Vec<usize>> = BatchIter::new(103, 0, &opts(8, 7, true, 0, 1, false))
        .unwrap()
        .collect();
    let b: Vec<Vec<usize>> = BatchIter::new(103, 0, &opts(8, 7, true, 0, 1, false))
        .unwrap()
        .collect();
    let c: Vec<Vec<usize>> = BatchIter::new(103, 1, &opts(8, 7, true, 0, 1, false))
        .unwrap()
        .collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 13);
    let flat: Vec<usize> = a.concat();
    assert_eq!(flat.iter().copied().collect::<BTreeSet<_>>().len(), 103);
    assert_ne!(flat, (0..103).collect::<Vec<_>>());
    let unshuffled: Vec<usize> = BatchIter::new(10, 3, &opts(4, 7, false, 0, 1, false))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(unshuffled, (0..10).collect::<Vec<_>>());
    assert_eq!(
        BatchIter::new(10, 0, &opts(4, 7, true, 0, 1, true))
            .unwrap()
            .num_batches(),
        2
    );
}

#[test]
fn shards_cover_the_epoch_like_distributed_sampler() {
    let world = 3;
    let shards: Vec<Vec<usize>> = (0..world)
        .map(|r| {
            BatchIter::new(10, 0, &opts(2, 1, true, r, world, false))
                .unwrap()
                .flatten()
                .collect()
        })
        .collect();
    // 10 items over 3 ranks: padded to 12, 4 per rank, every item seen.
    assert!(shards.iter().all(|s| s.len() == 4));
    let all: BTreeSet<usize> = shards.concat().into_iter().collect();
    assert_eq!(all.len(), 10);
    let order = volttrain::data::loader::epoch_order(10, 1, 0, true);
    for (r, s) in shards.iter().enumerate() {
        let want: Vec<usize> = (0..4).map(|i| order[(r + i * world) % 10]).collect();
        assert_eq!(s, &want);
    }
    assert!(BatchIter::new(10, 0, &opts(2, 1, true, 3, 3, false)).is_err());
}

#[test]
fn resume_continues_with_the_same_batches() {
    let (tok, ds) = dataset();
    let c = Collator::new(tok.pad().unwrap().id as i64, PaddingSide::Right);
    let dl = DataLoader::new(
        Arc::new(ds),
        c,
        LoaderOptions {
            batch_size: 2,
            seed: 11,
            ..Default::default()
        },
    );
    let full: Vec<Vec<Vec<i64>>> = dl
        .epoch(2, 0)
        .unwrap()
        .map(|b| rows(&b.unwrap().input_ids))
        .collect();
    let resumed: Vec<Vec<Vec<i64>>> = dl
        .epoch(2, 1)
        .unwrap()
        .map(|b| rows(&b.unwrap().input_ids))
        .collect();
    assert_eq!(full.len(), 3);
    assert_eq!(full[1..].to_vec(), resumed);
    let mut it = dl.batches(2, 0).unwrap();
    it.next();
    assert_eq!(it.position(), 1);
}

#[test]
fn packed_loader_uses_every_example_once_within_max_len() {
    let tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let c = DatasetConfig {
        cache: false,
        ..DatasetConfig::new(root().join("assets/data/eval.jsonl"))
    };
    let ds = Arc::new(SftDataset::load(&c, &tok).unwrap());
    let max_len = 128;
    let dl = DataLoader::new(
        ds.clone(),
        Collator::new(tok.pad().unwrap().id as i64, PaddingSide::Right),
        LoaderOptions {
            batch_size: 4,
            packing: Some(max_len),
            ..Default::default()
        },
    );
    assert!(dl.num_items() < ds.len());
    let mut tokens = 0;
    for b in dl.epoch(0, 0).unwrap() {
        let b = b.unwrap();
        assert!(b.is_packed());
        assert!(b.input_ids.size()[1] <= max_len as i64);
        tokens += b.num_tokens;
    }
    assert_eq!(tokens, ds.num_tokens());
}
