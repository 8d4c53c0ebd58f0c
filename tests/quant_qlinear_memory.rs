//! The quantized linear keeps no dense weight for backward: a chain of NF4 layers run with a
//! gradient to record grows the resident set by less than one dense weight until backward,
//! where the plain `x.linear(dequantize(W))` chain (the control, measured the same way) grows
//! it by every dense weight. Alone in its test binary, so no other test allocates meanwhile.

use tch::{Device, Kind, Tensor};
use volttrain::quant::{FourBitQuantizer, FourBitType, QuantizedTensor, Quantizer};

fn rss_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn nf4_forward_with_grad_keeps_no_dense_weight() {
    const LAYERS: usize = 6;
    const DIM: i64 = 1536; // a dense fp32 weight is 9 MiB
    let dense_bytes = (DIM * DIM * 4) as u64;
    tch::manual_seed(0);
    let q = FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap();
    let layers: Vec<Box<dyn QuantizedTensor>> = (0..LAYERS)
        .map(|_| {
            let w = Tensor::randn([DIM, DIM], (Kind::Float, Device::Cpu)) * 0.02;
            q.quantize(&w).unwrap()
        })
        .collect();
    let x = Tensor::randn([8, DIM], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    // warm up both paths once (allocator, thread pool)
    for _ in 0..2 {
        let y = layers[0].linear(&x).unwrap();
        y.sum(Kind::Float).backward();
        let w = layers[0].dequantize(Kind::Float).unwrap();
        let _ = x.linear::<&Tensor>(&w, None);
    }

    let grow = |f: &dyn Fn() -> Tensor| {
        // free heap goes back to the system first, so that growth means memory held
        // SAFETY: `malloc_trim` takes no pointers and only returns free pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        let before = rss_bytes();
        let y = f();
        // and again: what stays resident is what the graph holds
        // SAFETY: as above.
        unsafe {
            libc::malloc_trim(0);
        }
        let after = rss_bytes();
        y.sum(Kind::Float).backward();
        after.saturating_sub(before)
    };
    let ours = grow(&|| {
        let mut h = x.shallow_clone();
        for l in &layers {
            h = l.linear(&h).unwrap();
        }
        h
    });
    let control = grow(&|| {
        let mut h = x.shallow_clone();
        for l in &layers {
            let w = l.dequantize(Kind::Float).unwrap();
            h = h.linear::<&Tensor>(&w, None);
        }
        h
    });
    eprintln!(
        "resident growth until backward: shim {} KiB, dense control {} KiB, one weight {} KiB",
        ours / 1024,
        control / 1024,
        dense_bytes / 1024
    );
    // the measurement sees what autograd keeps: the control holds all LAYERS dense weights
    assert!(
        control >= (LAYERS as u64 - 1) * dense_bytes,
        "control grew by only {control} bytes; the measurement cannot tell"
    );
    assert!(
        ours < dense_bytes,
        "the quantized chain holds {ours} bytes, a dense weight or more ({dense_bytes} each)"
    );
}
