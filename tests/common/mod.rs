//! Shared test fixtures: a small causal LM, an in-memory batch source, a momentum-SGD optimizer.
#![allow(dead_code)]

use tch::{Device, Kind, Tensor};

use volttrain::Result;
use volttrain::data::Batch;
use volttrain::error::TchResultExt;
use volttrain::model::{CausalLm, ForwardInput, LayerCtx};
use volttrain::nn::Linear;
use volttrain::optim::{NamedParam, Optimizer, ParamGroup, StateDict};
use volttrain::trainer::BatchSource;

/// A tiny decoder: embedding, `n` residual blocks `h + W2 dropout(tanh(W1 h))`, tied head.
/// Enough structure for loop, accumulation, checkpointing and resume tests.
pub struct ToyLm {
    pub embed: Tensor,
    pub blocks: Vec<(Linear, Linear)>,
    pub dropout: f64,
    cfg: serde_json::Value,
}

impl ToyLm {
    pub fn new(vocab: i64, hidden: i64, layers: usize, dropout: f64, seed: i64) -> Self {
        let mut rng = seed as u64;
        let embed = (uniform(&mut rng, &[vocab, hidden]) * 0.5).set_requires_grad(true);
        let blocks = (0..layers)
            .map(|_| {
                let w1 = (uniform(&mut rng, &[hidden * 2, hidden]) * 0.3).set_requires_grad(true);
                let w2 = (uniform(&mut rng, &[hidden, hidden * 2]) * 0.3).set_requires_grad(true);
                (Linear::new(w1, None), Linear::new(w2, None))
            })
            .collect();
        ToyLm {
            embed,
            blocks,
            dropout,
            cfg: serde_json::json!({"architectures": ["ToyLm"]}),
        }
    }
}

impl CausalLm for ToyLm {
    fn architecture(&self) -> &str {
        "ToyLm"
    }
    fn hf_config(&self) -> &serde_json::Value {
        &self.cfg
    }
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }
    fn vocab_size(&self) -> i64 {
        self.embed.size()[0]
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn kind(&self) -> Kind {
        Kind::Float
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Tensor::f_embedding(&self.embed, ids, -1, false, false).ctx("embed")
    }
    fn prepare(&self, input: &ForwardInput<'_>) -> Result<LayerCtx> {
        let s = input.input_ids.size();
        let z = Tensor::zeros([s[0], s[1], 1], (Kind::Float, Device::Cpu));
        Ok(LayerCtx {
            cos: z.shallow_clone(),
            sin: z,
            mask: None,
            sliding_mask: None,
            local: None,
            padding: None,
        })
    }
    fn layer(&self, i: usize, h: &Tensor, _ctx: &LayerCtx, train: bool) -> Result<Tensor> {
        let (a, b) = &self.blocks[i];
        let x = a.forward(h, train)?.tanh();
        let x = x.dropout(self.dropout, train);
        Ok(h + b.forward(&x, train)?)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        h.f_matmul(&self.embed.tr()).ctx("head")
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.shallow_clone(),
        )];
        for (i, (a, b)) in self.blocks.iter().enumerate() {
            for (n, t) in a.named_parameters() {
                v.push((format!("model.layers.{i}.up.{n}"), t));
            }
            for (n, t) in b.named_parameters() {
                v.push((format!("model.layers.{i}.down.{n}"), t));
            }
        }
        v
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, (a, b)) in self.blocks.iter_mut().enumerate() {
            v.push((format!("model.layers.{i}.up"), a));
            v.push((format!("model.layers.{i}.down"), b));
        }
        v
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (i, (a, b)) in self.blocks.iter().enumerate() {
            v.push((format!("model.layers.{i}.up"), a));
            v.push((format!("model.layers.{i}.down"), b));
        }
        v
    }
    fn lm_head_param(&self) -> &str {
        "model.embed_tokens.weight"
    }
    fn embed_param(&self) -> &str {
        "model.embed_tokens.weight"
    }
    fn freeze_base(&mut self) {
        for (_, t) in self.named_parameters() {
            let _ = t.set_requires_grad(false);
        }
    }
    fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.named_parameters())
    }
}

/// Uniform(-1, 1) values from a local LCG: test fixtures must not depend on libtorch's global
/// generator, which parallel tests share.
pub fn uniform(state: &mut u64, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_slice(&v).view(shape)
}

/// Tests whose results depend on libtorch's global generator (dropout) hold this lock, and so
/// does every test that runs the trainer (which reseeds that generator each layer), so parallel
/// tests cannot reseed it under one another.
pub static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Deterministic batches from a fixed list, shuffled per epoch by (seed, epoch).
pub struct VecSource {
    pub batches: Vec<(Vec<i64>, Vec<i64>, usize, usize)>, // ids, labels, b, t
    pub seed: u64,
    pub shuffle: bool,
}

impl VecSource {
    /// `n` batches of `b x t` random tokens in `0..vocab`; the first quarter of each row is
    /// masked (-100) like a prompt, the last row of odd batches is right-padded.
    pub fn random(n: usize, b: usize, t: usize, vocab: i64, seed: u64) -> Self {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as i64
        };
        let mut batches = Vec::new();
        for k in 0..n {
            let mut ids = Vec::new();
            let mut labels = Vec::new();
            for r in 0..b {
                let pad_from = if k % 2 == 1 && r == b - 1 { t - 2 } else { t };
                for j in 0..t {
                    let tok = next();
                    ids.push(if j < pad_from { tok } else { 0 });
                    labels.push(if j < t / 4 || j >= pad_from {
                        -100
                    } else {
                        tok
                    });
                }
            }
            batches.push((ids, labels, b, t));
        }
        VecSource {
            batches,
            seed,
            shuffle: true,
        }
    }

    pub fn get(&self, i: usize) -> Batch {
        let (ids, labels, b, t) = &self.batches[i];
        let (b, t) = (*b as i64, *t as i64);
        let input_ids = Tensor::from_slice(ids).view([b, t]);
        let labels = Tensor::from_slice(labels).view([b, t]);
        let mut mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
        // pads are the positions where the label is -100 past the prompt quarter
        let pad = labels.eq(-100).logical_and(
            &Tensor::arange(t, (Kind::Int64, Device::Cpu))
                .ge(t / 4)
                .view([1, t]),
        );
        let _ = mask.masked_fill_(&pad, 0);
        let num_tokens = mask.sum(Kind::Int64).int64_value(&[]) as usize;
        let num_label_tokens = labels.ne(-100).sum(Kind::Int64).int64_value(&[]) as usize;
        Batch {
            input_ids,
            attention_mask: mask,
            position_ids: None,
            labels,
            num_tokens,
            num_label_tokens,
        }
    }
}

impl BatchSource for VecSource {
    fn num_batches(&self, _epoch: usize) -> usize {
        self.batches.len()
    }
    fn batch(&mut self, epoch: usize, index: usize) -> Result<Batch> {
        let n = self.batches.len();
        let i = if self.shuffle {
            (index * 7 + epoch * 3 + self.seed as usize) % n
        } else {
            index
        };
        Ok(self.get(i))
    }
}

/// SGD with momentum (torch.optim.SGD's rule: buf = mu*buf + g; p -= lr*buf), for trainer
/// tests that need optimizer state.
pub struct Sgd {
    groups: Vec<ParamGroup>,
    momentum: f64,
    bufs: std::collections::BTreeMap<String, Tensor>,
}

#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub momentum: f64,
}

impl Optimizer for Sgd {
    type Config = SgdConfig;
    fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self> {
        Ok(Sgd {
            groups,
            momentum: config.momentum,
            bufs: Default::default(),
        })
    }
    fn name(&self) -> &str {
        "sgd"
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }
    fn step(&mut self) -> Result<()> {
        let _g = tch::no_grad_guard();
        for g in &mut self.groups {
            for p in &mut g.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let buf = match self.bufs.get(&p.name) {
                    Some(b) => b * self.momentum + &grad,
                    None => grad.copy(),
                };
                let _ = p.tensor.f_sub_(&(&buf * g.lr)).ctx("sgd")?;
                self.bufs.insert(p.name.clone(), buf);
            }
        }
        Ok(())
    }
    fn state_dict(&self) -> Result<StateDict> {
        let mut s = StateDict::default();
        for (n, b) in &self.bufs {
            s.tensors.insert(format!("{n}.momentum_buffer"), b.copy());
        }
        Ok(s)
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.bufs = state
            .tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_suffix(".momentum_buffer")
                    .map(|n| (n.to_string(), v.copy()))
            })
            .collect();
        Ok(())
    }
}

/// One group with every trainable parameter of `model`.
pub fn one_group(model: &dyn CausalLm, lr: f64) -> Vec<ParamGroup> {
    vec![ParamGroup {
        name: "all".into(),
        params: model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, tensor)| NamedParam { name, tensor })
            .collect(),
        lr,
        lr_mult: 1.0,
        weight_decay: 0.0,
    }]
}

/// Max absolute difference of two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// 2 rows of 12 tokens, the second right-padded by 3; the first 4 tokens of each row are a
/// prompt (labels -100): the batch the trainer-vs-transformers tests share.
pub fn padded_prompt_batch() -> Batch {
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 97).collect();
    let mut labels = ids.clone();
    let mut mask = vec![1i64; 24];
    for j in 0..4 {
        labels[j] = -100;
        labels[12 + j] = -100;
    }
    for j in 9..12 {
        labels[12 + j] = -100;
        mask[12 + j] = 0;
    }
    Batch {
        input_ids: Tensor::from_slice(&ids).view([2, 12]),
        attention_mask: Tensor::from_slice(&mask).view([2, 12]),
        position_ids: None,
        labels: Tensor::from_slice(&labels).view([2, 12]),
        num_tokens: 21,
        num_label_tokens: 13,
    }
}

/// [`padded_prompt_batch`] written as `<dir>/batch.safetensors` (`ids`, `mask`, `labels`), for
/// the Python reference to read.
pub fn write_padded_prompt_batch(dir: &std::path::Path) -> std::path::PathBuf {
    let b = padded_prompt_batch();
    let file = dir.join("batch.safetensors");
    Tensor::write_safetensors(
        &[
            ("ids", &b.input_ids),
            ("mask", &b.attention_mask),
            ("labels", &b.labels),
        ],
        &file,
    )
    .unwrap();
    file
}

/// A source of one batch per epoch: [`padded_prompt_batch`].
pub struct PaddedPromptSource;

impl BatchSource for PaddedPromptSource {
    fn num_batches(&self, _: usize) -> usize {
        1
    }
    fn batch(&mut self, _: usize, _: usize) -> Result<Batch> {
        Ok(padded_prompt_batch())
    }
}

/// The largest |a - b| over the positions `keep` marks nonzero (`keep` is `[batch, seq]`, `a`
/// and `b` `[batch, seq, ...]`, e.g. logits with the attention mask: padding is not compared).
pub fn max_err(a: &Tensor, b: &Tensor, keep: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let keep = keep.ne(0).unsqueeze(-1).expand_as(a);
    (a - b).abs().masked_select(&keep).max().double_value(&[])
}
