//! Peak memory of quantizing while loading (issue #6): a random Llama checkpoint written as a
//! Hugging Face directory (fp32 or bf16 safetensors) is loaded in a child process with a
//! load-time quantizer, and the child reports its peak *anonymous* memory (`RssAnon`, sampled on
//! a thread) above the pre-load baseline. File-backed pages of the mmapped checkpoint are left
//! out on purpose: the kernel can drop them at will, so they are not memory the load holds.
//!
//! The claim checked: peak - baseline <= bytes the loaded model holds + the largest single tensor
//! of the file as fp32 (the compute kind) + the quantizer's working set on its largest input
//! (measured in the same child: NF4's blockwise search keeps a few temporaries of the input's
//! size, some int64) + [`SLACK_BYTES`]. For contrast the same child measures
//! "load fp32, then quantize", whose peak is the whole fp32 model.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use volttrain::error::{Error, Result, TchResultExt};
use volttrain::model::llama::expected_tensors;
use volttrain::model::safetensors::{SafetensorsFile, save_safetensors};
use volttrain::model::{
    CausalLm, LoadOptions, decoder_config, default_quantize_filter, load_model,
};
use volttrain::nn::LinearWeight;
use volttrain::quant::{QuantConfig, QuantType, Quantizer};

use crate::rss::{PeakSampler, release_freed_memory, rss_anon_bytes};
use crate::{Measurement, PerfOpts, Stats, run_json};

/// Allowance for what a load allocates besides tensors: the loader threads' stacks and glibc
/// arenas (each new thread gets its own arena, whose headers are touched pages), libtorch's
/// per-thread state, the loader's name tables, and allocator residue that `malloc_trim` cannot
/// return (partly used pages). Measured at 2 to 4 MiB on the test model with one loader thread
/// (the bench note's `overhead`: peak - held - largest - workspace); 8 MiB, the size of one
/// default thread-stack reservation, leaves room for that without approaching a model's size.
pub const SLACK_BYTES: u64 = 8 << 20;

/// The shape of a Llama-style checkpoint to write.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointShape {
    pub hidden: i64,
    pub layers: i64,
    pub intermediate: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub vocab: i64,
}

impl CheckpointShape {
    /// SmolLM2-135M: hidden 576, 30 layers, intermediate 1536, 9 heads / 3 KV heads, vocab
    /// 49152, tied embeddings.
    pub const SMOLLM2_135M: CheckpointShape = CheckpointShape {
        hidden: 576,
        layers: 30,
        intermediate: 1536,
        heads: 9,
        kv_heads: 3,
        vocab: 49152,
    };

    /// The `config.json` of a `LlamaForCausalLM` with this shape and tied embeddings.
    pub fn config_json(&self, kind: Kind) -> Value {
        let dtype = match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "torch_dtype": dtype,
        })
    }
}

/// Writes `dir/config.json` and `dir/model.safetensors` with random weights (N(0, 0.02), norms
/// 1) stored as `kind`.
pub fn write_checkpoint(dir: &Path, shape: &CheckpointShape, kind: Kind) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let v = shape.config_json(kind);
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    volttrain::error::write_atomic(&cfg_path, text.as_bytes())?;
    let cfg = decoder_config(&cfg_path, &v)?;
    let _g = tch::no_grad_guard();
    let mut tensors = Vec::new();
    for (name, dims) in expected_tensors(&cfg) {
        let t = if name.ends_with("norm.weight") {
            Tensor::f_ones(dims.as_slice(), (kind, Device::Cpu)).ctx(format!("ones {name}"))?
        } else {
            Tensor::f_randn(dims.as_slice(), (Kind::Float, Device::Cpu))
                .ctx(format!("randn {name}"))?
                .f_mul_scalar(0.02)
                .ctx(format!("scale {name}"))?
                .f_to_kind(kind)
                .ctx(format!("{name} to {kind:?}"))?
        };
        tensors.push((name, t));
    }
    save_safetensors(&dir.join("model.safetensors"), &tensors, None)
}

/// Sizes of a checkpoint's tensors, read from its safetensors header.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileSizes {
    /// Every tensor as fp32: the model fully loaded in the compute kind.
    pub fp32_bytes: u64,
    /// The largest single tensor as fp32, and its name.
    pub largest_fp32_bytes: u64,
    pub largest_name: String,
}

/// [`FileSizes`] of `dir/model.safetensors`.
pub fn file_sizes(dir: &Path) -> Result<FileSizes> {
    let path = dir.join("model.safetensors");
    let f = SafetensorsFile::open(&path)?;
    let mut out = FileSizes {
        fp32_bytes: 0,
        largest_fp32_bytes: 0,
        largest_name: String::new(),
    };
    for name in f.names() {
        let shape = f
            .shape(name)
            .ok_or_else(|| Error::checkpoint(&path, format!("tensor `{name}` has no shape")))?;
        let bytes = shape.iter().product::<i64>().max(0) as u64 * 4;
        out.fp32_bytes += bytes;
        if bytes > out.largest_fp32_bytes {
            out.largest_fp32_bytes = bytes;
            out.largest_name = name.to_string();
        }
    }
    Ok(out)
}

/// Bytes a loaded model holds: dense parameters (each storage once: a tied head shares the
/// embedding) plus the packed storage of quantized linear weights.
pub fn held_bytes(model: &dyn CausalLm) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for (_, t) in model.named_parameters() {
        if seen.insert(t.data_ptr() as usize) {
            total += t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
        }
    }
    for (_, lin) in model.linears() {
        if let LinearWeight::Quantized(q) = &lin.weight {
            total += q.storage_bytes() as u64;
        }
    }
    total
}

/// The largest 2-D weight the default filter quantizes (`model.layers.*`), as `[rows, cols]`.
pub fn largest_quantized_shape(dir: &Path) -> Result<Option<(i64, i64)>> {
    let path = dir.join("model.safetensors");
    let f = SafetensorsFile::open(&path)?;
    let mut best: Option<(i64, i64)> = None;
    for name in f.names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !default_quantize_filter(module) {
            continue;
        }
        if let Some([r, c]) = f.shape(name).as_deref()
            && best.is_none_or(|(br, bc)| r * c > br * bc)
        {
            best = Some((*r, *c));
        }
    }
    Ok(best)
}

/// How the child loads the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// `LoadOptions::with_quantizer`: each linear quantized as soon as it is read.
    QuantizeWhileLoading,
    /// Load everything in fp32, then quantize the linears one by one (the contrast).
    Fp32ThenQuantize,
    /// `model.dtype` (issue #14): every tensor converted to the format's kind (`bf16`, `fp16`,
    /// `fp32`) as it is read, no quantizer.
    Convert,
    /// Load everything in fp32, then convert the model (the contrast).
    Fp32ThenConvert,
}

/// One child run: mode, format (a name of [`formats`]) and loader threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRun {
    pub mode: LoadMode,
    pub format: String,
    pub loader_threads: usize,
}

impl LoadRun {
    /// `quantize,nf4,1` or `fp32-then,nf4,1`: the child's command-line argument.
    pub fn to_arg(&self) -> String {
        let m = match self.mode {
            LoadMode::QuantizeWhileLoading => "quantize",
            LoadMode::Fp32ThenQuantize => "fp32-then",
            LoadMode::Convert => "convert",
            LoadMode::Fp32ThenConvert => "fp32-then-convert",
        };
        format!("{m},{},{}", self.format, self.loader_threads)
    }

    /// Parses [`LoadRun::to_arg`]'s form.
    pub fn parse(arg: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "--child-load `{arg}`: expected MODE,FORMAT,THREADS"
            ))
        };
        let mut it = arg.split(',');
        let mode = match it.next().ok_or_else(bad)? {
            "quantize" => LoadMode::QuantizeWhileLoading,
            "fp32-then" => LoadMode::Fp32ThenQuantize,
            "convert" => LoadMode::Convert,
            "fp32-then-convert" => LoadMode::Fp32ThenConvert,
            _ => return Err(bad()),
        };
        let format = it.next().ok_or_else(bad)?.to_string();
        let loader_threads = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if it.next().is_some() || loader_threads == 0 {
            return Err(bad());
        }
        match mode {
            LoadMode::Convert | LoadMode::Fp32ThenConvert => {
                convert_kind(&format)?;
            }
            _ => {
                quantizer(&format)?;
            }
        }
        Ok(LoadRun {
            mode,
            format,
            loader_threads,
        })
    }
}

/// The load-time formats measured.
pub fn formats() -> [(&'static str, QuantType); 3] {
    [
        ("nf4", QuantType::Nf4),
        ("int8", QuantType::Int8),
        ("fp8_e4m3", QuantType::Fp8E4m3),
    ]
}

/// The kind of a [`LoadMode::Convert`] format name.
pub fn convert_kind(format: &str) -> Result<Kind> {
    match format {
        "bf16" => Ok(Kind::BFloat16),
        "fp16" => Ok(Kind::Half),
        "fp32" => Ok(Kind::Float),
        _ => Err(Error::invalid(format!(
            "unknown load dtype `{format}` (known: bf16, fp16, fp32)"
        ))),
    }
}

fn quantizer(format: &str) -> Result<Arc<dyn Quantizer>> {
    let (_, t) = formats()
        .into_iter()
        .find(|(n, _)| *n == format)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown load-time format `{format}` (known: nf4, int8, fp8_e4m3)"
            ))
        })?;
    QuantConfig::new(t).quantizer()
}

/// What a child measured, in bytes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    pub baseline: u64,
    pub peak: u64,
    pub held: u64,
    pub after: u64,
    /// The quantizer's own working set: peak anonymous memory while quantizing one fp32 tensor
    /// of the largest quantized shape, above the memory before (the input tensor excluded).
    pub workspace: u64,
}

impl ChildReport {
    /// Peak anonymous memory above the pre-load baseline.
    pub fn peak_above_baseline(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }

    /// The claim's bound: held + the largest tensor as fp32 + the quantizer's workspace +
    /// [`SLACK_BYTES`].
    pub fn bound(&self, sizes: &FileSizes) -> u64 {
        self.held + sizes.largest_fp32_bytes + self.workspace + SLACK_BYTES
    }
}

/// The child's side: loads `dir` as `run` says and measures. Call it in a fresh process (the
/// bench binary's `--child-load`), so that nothing else is in its anonymous memory.
pub fn child(run: &LoadRun, dir: &Path) -> Result<ChildReport> {
    if matches!(run.mode, LoadMode::Convert | LoadMode::Fp32ThenConvert) {
        return child_convert(run, dir);
    }
    let _g = tch::no_grad_guard();
    let q = quantizer(&run.format)?;
    // initialize libtorch (allocator, intra-op pool) before the baseline
    let w = Tensor::f_randn([64, 64], (Kind::Float, Device::Cpu)).ctx("warm-up randn")?;
    drop(q.quantize(&w)?);
    drop(w);
    // the quantizer's working set on the largest tensor it will see
    let workspace = match largest_quantized_shape(dir)? {
        Some((r, c)) => {
            let w = Tensor::f_randn([r, c], (Kind::Float, Device::Cpu)).ctx("workspace randn")?;
            let sampler = PeakSampler::start()?;
            let before = rss_anon_bytes()?;
            drop(q.quantize(&w)?);
            let peak = sampler.finish()?;
            drop(w);
            peak.saturating_sub(before)
        }
        None => 0,
    };
    release_freed_memory();
    let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
    opts.threads = run.loader_threads;
    let sampler = PeakSampler::start()?;
    let baseline = rss_anon_bytes()?;
    let model = match run.mode {
        LoadMode::QuantizeWhileLoading => load_model(dir, &opts.with_quantizer(q))?,
        LoadMode::Convert | LoadMode::Fp32ThenConvert => {
            return Err(Error::invalid(
                "convert modes are measured by child_convert",
            ));
        }
        LoadMode::Fp32ThenQuantize => {
            let mut m = load_model(dir, &opts)?;
            for (name, lin) in m.linears_mut() {
                if !default_quantize_filter(&name) {
                    continue;
                }
                if let LinearWeight::Dense(w) = &lin.weight {
                    let qt = q.quantize(w).map_err(|e| {
                        Error::invalid(format!("quantizing `{name}` with {}: {e}", q.name()))
                    })?;
                    lin.weight = LinearWeight::Quantized(qt);
                }
            }
            m
        }
    };
    let peak = sampler.finish()?;
    let held = held_bytes(model.as_ref());
    let after = rss_anon_bytes()?;
    drop(model);
    Ok(ChildReport {
        baseline,
        peak,
        held,
        after,
        workspace,
    })
}

/// [`child`] for the `model.dtype` modes: no quantizer, workspace 0.
fn child_convert(run: &LoadRun, dir: &Path) -> Result<ChildReport> {
    let _g = tch::no_grad_guard();
    let kind = convert_kind(&run.format)?;
    // initialize libtorch (allocator, intra-op pool, conversion kernels) before the baseline
    let w = Tensor::f_randn([64, 64], (Kind::Float, Device::Cpu)).ctx("warm-up randn")?;
    drop(w.f_to_kind(kind).ctx("warm-up convert")?);
    drop(w);
    release_freed_memory();
    let sampler = PeakSampler::start()?;
    let baseline = rss_anon_bytes()?;
    let model = match run.mode {
        LoadMode::Convert => {
            let mut opts = LoadOptions::new(kind, Device::Cpu);
            opts.threads = run.loader_threads;
            load_model(dir, &opts)?
        }
        _ => {
            let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
            opts.threads = run.loader_threads;
            let m = load_model(dir, &opts)?;
            // what a caller without `model.dtype` would do: convert every parameter afterwards
            for (_, mut p) in m.named_parameters() {
                let c = p.f_to_kind(kind).ctx("convert parameter")?;
                p.f_set_data(&c).ctx("convert parameter")?;
            }
            m
        }
    };
    let peak = sampler.finish()?;
    let held = held_bytes(model.as_ref());
    let after = rss_anon_bytes()?;
    drop(model);
    Ok(ChildReport {
        baseline,
        peak,
        held,
        after,
        workspace: 0,
    })
}

/// Runs `exe --child-load RUN --child-model DIR --threads N` (the bench binary) and returns its
/// report.
pub fn measure(exe: &Path, dir: &Path, run: &LoadRun, threads: usize) -> Result<ChildReport> {
    let arg = run.to_arg();
    let what = format!("load child `{arg}` on {}", dir.display());
    let mut cmd = Command::new(exe);
    cmd.args(["--child-load", &arg, "--child-model"])
        .arg(dir)
        .args(["--threads", &threads.to_string()]);
    let v = run_json(&mut cmd, &what)?;
    serde_json::from_value(v).map_err(|e| Error::invalid(format!("{what}: not a load report: {e}")))
}

const MIB: f64 = (1u64 << 20) as f64;

/// Runs the quantize-while-loading memory workload on a SmolLM2-135M-shaped checkpoint, in bf16
/// and fp32 on disk, for each of [`formats`], with the default loader threads.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let exe = std::env::current_exe().map_err(|e| Error::invalid(format!("current_exe: {e}")))?;
    let threads = LoadOptions::default().threads;
    let shape = CheckpointShape::SMOLLM2_135M;
    let mut out = Vec::new();
    for (kind, kname) in [(Kind::BFloat16, "bf16"), (Kind::Float, "fp32")] {
        let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        write_checkpoint(tmp.path(), &shape, kind)?;
        let sizes = file_sizes(tmp.path())?;
        for (format, _) in formats() {
            let mk = |mode| LoadRun {
                mode,
                format: format.to_string(),
                loader_threads: threads,
            };
            let r = measure(
                &exe,
                tmp.path(),
                &mk(LoadMode::QuantizeWhileLoading),
                opts.threads,
            )?;
            let c = measure(
                &exe,
                tmp.path(),
                &mk(LoadMode::Fp32ThenQuantize),
                opts.threads,
            )?;
            let peak = r.peak_above_baseline();
            let bound = r.bound(&sizes);
            out.push(Measurement {
                workload: format!("quant_load_{format}_{kname}"),
                metric: "MiB peak anon".into(),
                volttrain: Stats::single(peak as f64 / MIB),
                reference: Some(Stats::single(c.peak_above_baseline() as f64 / MIB)),
                reference_name: "load fp32, then quantize".into(),
                higher_is_better: false,
                note: format!(
                    "SmolLM2-135M shape, {kname} on disk, {threads} loader threads: held {:.1} MiB + largest tensor ({}) {:.1} MiB + quantizer workspace {:.1} MiB + slack {:.0} MiB = bound {:.1} MiB, {} (overhead {:.1} MiB); full fp32 model {:.1} MiB",
                    r.held as f64 / MIB,
                    sizes.largest_name,
                    sizes.largest_fp32_bytes as f64 / MIB,
                    r.workspace as f64 / MIB,
                    SLACK_BYTES as f64 / MIB,
                    bound as f64 / MIB,
                    if peak <= bound { "holds" } else { "EXCEEDED" },
                    (peak as f64 - (r.held + sizes.largest_fp32_bytes + r.workspace) as f64) / MIB,
                    sizes.fp32_bytes as f64 / MIB,
                ),
            });
        }
    }
    Ok(out)
}
