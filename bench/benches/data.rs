//! Criterion bench of the collator: padding and packing batches of the bundled chat data.

use criterion::{Criterion, criterion_group, criterion_main};
use volttrain::data::{Collator, DatasetConfig, Example, PaddingSide, SftDataset, Tokenizer};

fn collate(c: &mut Criterion) {
    let root = volttrain_bench::repo_root();
    let (tok, ds) = match Tokenizer::from_dir(root.join("assets/tiny-llama")).and_then(|tok| {
        let cfg = DatasetConfig {
            cache: false,
            ..DatasetConfig::new(root.join("assets/data/train.jsonl"))
        };
        let ds = SftDataset::load(&cfg, &tok)?;
        Ok((tok, ds))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bench data: cannot load the bundled assets: {e}");
            return;
        }
    };
    let pad = tok.pad().map(|p| p.id as i64).unwrap_or(0);
    let collator = Collator::new(pad, PaddingSide::Right);
    let batch: Vec<&Example> = ds.examples.iter().take(16).collect();
    c.bench_function("collate_pad_16", |b| {
        b.iter(|| collator.collate(&batch).map(|x| x.num_tokens))
    });
    let rows: Vec<Vec<&Example>> = ds
        .pack(256)
        .into_iter()
        .take(4)
        .map(|r| r.into_iter().map(|i| &ds.examples[i]).collect())
        .collect();
    c.bench_function("collate_packed_4x256", |b| {
        b.iter(|| collator.collate_packed(&rows).map(|x| x.num_tokens))
    });
}

criterion_group!(benches, collate);
criterion_main!(benches);
