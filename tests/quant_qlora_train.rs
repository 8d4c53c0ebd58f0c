//! QLoRA through the trainer on the tiny Llama (made by transformers): with NF4 base weights
//! (double quantization), one SGD step changes the LoRA parameters by the same amounts with and
//! without gradient checkpointing, and by the same amounts as LoRA over a dense fp32 base that
//! holds the dequantized weights (the function QLoRA computes).

mod common;

use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
use volttrain::data::Batch;
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::nn::LinearWeight;
use volttrain::quant::{QuantConfig, QuantizedTensor};
use volttrain::trainer::{BatchSource, Trainer};

fn write_llama(dir: &Path) {
    let python = std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/make_model_fixtures.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(dir)
        .arg("llama")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct One;
impl BatchSource for One {
    fn num_batches(&self, _: usize) -> usize {
        1
    }
    fn batch(&mut self, _: usize, _: usize) -> volttrain::Result<Batch> {
        let ids: Vec<i64> = (0..32).map(|i| (i * 37 + 5) % 97).collect();
        Ok(Batch {
            input_ids: Tensor::from_slice(&ids).view([2, 16]),
            attention_mask: Tensor::ones([2, 16], (Kind::Int64, Device::Cpu)),
            position_ids: None,
            labels: Tensor::from_slice(&ids).view([2, 16]),
            num_tokens: 32,
            num_label_tokens: 32,
        })
    }
}

/// `quantized`: NF4 base; otherwise fp32 base holding the NF4-dequantized weights.
fn lora_deltas(dir: &Path, quantized: bool, ckpt: bool) -> Vec<(String, Tensor)> {
    let q = QuantConfig::from_legacy(true, false)
        .unwrap()
        .unwrap()
        .quantizer()
        .unwrap();
    let mut model: Box<dyn CausalLm> = if quantized {
        let opts = LoadOptions::new(Kind::Float, Device::Cpu).with_quantizer(q);
        load_model(dir, &opts).unwrap()
    } else {
        let mut m = load_model(dir, &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
        let mut n = 0;
        // the decoder's projections, as the quantizing loader's default filter picks them (the
        // LM head stays dense)
        for (name, lin) in m.linears_mut() {
            if !name.contains(".layers.") {
                continue;
            }
            if let LinearWeight::Dense(w) = &lin.weight {
                let qt: Box<dyn QuantizedTensor> = q.quantize(w).unwrap();
                lin.weight = LinearWeight::Dense(qt.dequantize(Kind::Float).unwrap());
                n += 1;
            }
        }
        assert_eq!(n, 14, "expected 7 projections in 2 layers");
        m
    };
    let quantized_layers = model
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| matches!(l.weight, LinearWeight::Quantized(_)))
        .count();
    assert_eq!(quantized_layers, if quantized { 14 } else { 0 });
    model.freeze_base();
    tch::manual_seed(17);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target: Targets::Preset("llama".into()),
        ..LoraConfig::default()
    };
    LoraInjector::new(cfg).inject(model.as_mut()).unwrap();
    // B starts at zero, so give it values: then A gets a gradient too
    for (n, p) in model.named_parameters() {
        if n.contains("lora_B") {
            let _g = tch::no_grad_guard();
            p.shallow_clone().copy_(&(Tensor::randn_like(&p) * 0.1));
        }
    }
    let names: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    assert!(names.iter().all(|(n, _)| n.contains("lora_")));
    let before: Vec<Tensor> = names.iter().map(|(_, t)| t.detach().copy()).collect();
    let opt = Box::new(
        <common::Sgd as volttrain::optim::Optimizer>::new(
            common::one_group(model.as_ref(), 1.0),
            common::SgdConfig { momentum: 0.0 },
        )
        .unwrap(),
    );
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::builder()
        .model(model)
        .train_data(Box::new(One))
        .optimizer(opt)
        .base_lr(1.0)
        .max_steps(Some(1))
        .gradient_checkpointing(ckpt)
        .output_dir(out.path())
        .build()
        .unwrap();
    t.fit().unwrap();
    names
        .iter()
        .zip(before)
        .map(|((n, p), b)| (n.clone(), &b - p.detach()))
        .collect()
}

#[test]
fn qlora_gradients_equal_dense_dequantized_base_with_and_without_checkpointing() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path());
    let model = dir.path().join("llama");
    let dense = lora_deltas(&model, false, false);
    for ckpt in [false, true] {
        let q = lora_deltas(&model, true, ckpt);
        assert_eq!(q.len(), dense.len());
        for ((n, a), (_, b)) in q.iter().zip(&dense) {
            let scale = b.abs().max().double_value(&[]).max(1e-12);
            let d = common::max_abs_diff(a, b) / scale;
            assert!(
                d < 1e-4,
                "checkpointing {ckpt}: {n} differs by {d} (relative)"
            );
        }
        let moved = q
            .iter()
            .filter(|(_, d)| d.abs().max().double_value(&[]) > 0.0)
            .count();
        assert_eq!(moved, q.len(), "every LoRA parameter gets a gradient");
    }
}
