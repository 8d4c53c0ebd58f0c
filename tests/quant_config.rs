//! The `quantization` config section, the legacy `train_4bit` / `train_8bit` switches, and the
//! quantizers they build.

use tch::{Device, Kind, Tensor};
use volttrain::quant::{ComputeDtype, Fp8Scaling, QuantConfig, QuantType};

fn parse(yaml: &str) -> Result<QuantConfig, serde_yaml::Error> {
    serde_yaml::from_str(yaml)
}

#[test]
fn section_parses_with_defaults() {
    let c = parse("type: nf4").unwrap();
    assert_eq!(c, QuantConfig::new(QuantType::Nf4));
    assert_eq!(
        (c.block_size, c.double_quant, c.compute_dtype, c.scaling),
        (64, false, None, None)
    );
    let c = parse("type: fp8_e5m2\nscaling: per_row\ncompute_dtype: bfloat16").unwrap();
    assert_eq!(c.quant_type, QuantType::Fp8E5m2);
    assert_eq!(c.scaling, Some(Fp8Scaling::PerRow));
    assert_eq!(c.compute_dtype, Some(ComputeDtype::Bfloat16));
    let c = parse("type: fp4\nblock_size: 128\ndouble_quant: true").unwrap();
    assert_eq!(
        (c.quant_type, c.block_size, c.double_quant),
        (QuantType::Fp4, 128, true)
    );
}

#[test]
fn unknown_fields_and_values_are_rejected() {
    let e = parse("type: nf4\nblocksize: 64").unwrap_err().to_string();
    assert!(e.contains("blocksize"), "{e}");
    let e = parse("type: int4").unwrap_err().to_string();
    assert!(e.contains("int4"), "{e}");
    let e = parse("type: fp8_e4m3\nscaling: per_block")
        .unwrap_err()
        .to_string();
    assert!(e.contains("per_block"), "{e}");
}

#[test]
fn invalid_combinations_name_the_key() {
    let cases = [
        ("type: nf4\nblock_size: 48", "quantization.block_size"),
        ("type: int8\nblock_size: 128", "quantization.block_size"),
        (
            "type: int8\ndouble_quant: true",
            "quantization.double_quant",
        ),
        ("type: nf4\nscaling: per_row", "quantization.scaling"),
    ];
    for (yaml, key) in cases {
        let e = parse(yaml).unwrap().quantizer().unwrap_err().to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}

#[test]
fn legacy_switches_map_to_nf4_double_quant_and_int8() {
    let c = QuantConfig::from_legacy(true, false).unwrap().unwrap();
    assert_eq!(
        (c.quant_type, c.block_size, c.double_quant),
        (QuantType::Nf4, 64, true)
    );
    let c = QuantConfig::from_legacy(false, true).unwrap().unwrap();
    assert_eq!(c.quant_type, QuantType::Int8);
    assert!(QuantConfig::from_legacy(false, false).unwrap().is_none());
    let e = QuantConfig::from_legacy(true, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.train_4bit"), "{e}");

    // a section wins over an agreeing switch; a contradicting one is an error
    let fp4 = parse("type: fp4").unwrap();
    let r = QuantConfig::resolve(Some(fp4.clone()), true, false)
        .unwrap()
        .unwrap();
    assert_eq!(r.quant_type, QuantType::Fp4);
    let e = QuantConfig::resolve(Some(fp4), false, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.train_8bit") && e.contains("fp4"), "{e}");
    assert_eq!(
        QuantConfig::resolve(None, false, true)
            .unwrap()
            .unwrap()
            .quant_type,
        QuantType::Int8
    );
}

#[test]
fn quantizers_produce_their_formats_and_sizes() {
    tch::manual_seed(9);
    let w = Tensor::randn([512, 1024], (Kind::Float, Device::Cpu));
    let n = (512 * 1024) as f64;
    let expect = [
        ("type: nf4\ndouble_quant: true", "nf4", 0.5 + 1.0 / 64.0),
        ("type: fp4", "fp4", 0.5 + 4.0 / 64.0),
        ("type: int8", "int8", 1.0),
        ("type: fp8_e4m3", "fp8_e4m3", 1.0),
        ("type: fp8_e5m2\nscaling: per_row", "fp8_e5m2", 1.0),
    ];
    for (yaml, format, bpp) in expect {
        let q = parse(yaml).unwrap().quantizer().unwrap();
        assert_eq!(q.name(), format);
        let t = q.quantize(&w).unwrap();
        assert_eq!(t.format(), format);
        assert_eq!(t.shape(), (512, 1024));
        let got = t.storage_bytes() as f64 / n;
        // scales and code tables add a little on top of the codes
        assert!(
            got >= bpp && got < bpp + 0.02,
            "{format}: {got} bytes/param, expected about {bpp}"
        );
        let deq = t.dequantize(Kind::Float).unwrap();
        let rel = (&deq - &w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]);
        assert!(rel < 0.2, "{format}: relative round-trip error {rel}");
    }
}

#[test]
fn compute_dtype_casts_the_product() {
    tch::manual_seed(10);
    let w = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([4, 64], (Kind::Float, Device::Cpu));
    let plain = parse("type: int8")
        .unwrap()
        .quantizer()
        .unwrap()
        .quantize(&w)
        .unwrap();
    let bf16 = parse("type: int8\ncompute_dtype: bfloat16")
        .unwrap()
        .quantizer()
        .unwrap()
        .quantize(&w)
        .unwrap();
    let y32 = plain.linear(&x).unwrap();
    let y16 = bf16.linear(&x).unwrap();
    assert_eq!(
        y16.kind(),
        Kind::Float,
        "output comes back in the input's dtype"
    );
    // the bf16 product equals the product of bf16-rounded operands, not the fp32 one
    let expect = x
        .to_kind(Kind::BFloat16)
        .linear::<&Tensor>(&plain.dequantize(Kind::BFloat16).unwrap(), None)
        .to_kind(Kind::Float);
    assert_eq!((&y16 - &expect).abs().max().double_value(&[]), 0.0);
    let d = (&y16 - &y32).abs().max().double_value(&[]);
    assert!(d > 0.0 && d < 0.5, "bf16 vs fp32 product differ by {d}");
}

#[test]
fn every_format_round_trips_through_safetensors() {
    use volttrain::quant::from_named_tensors;
    tch::manual_seed(12);
    let w = Tensor::randn([96, 160], (Kind::Float, Device::Cpu));
    let dir = tempfile::tempdir().unwrap();
    for yaml in [
        "type: nf4",
        "type: nf4\ndouble_quant: true",
        "type: fp4\nblock_size: 32\ndouble_quant: true",
        "type: int8",
        "type: fp8_e4m3",
        "type: fp8_e5m2\nscaling: per_row",
    ] {
        let q = parse(yaml)
            .unwrap()
            .quantizer()
            .unwrap()
            .quantize(&w)
            .unwrap();
        let path = dir.path().join("q.safetensors");
        Tensor::write_safetensors(&q.named_tensors(), &path).unwrap();
        let back = from_named_tensors(
            q.format(),
            q.shape(),
            Tensor::read_safetensors(&path).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (back.format(), back.shape(), back.storage_bytes()),
            (q.format(), q.shape(), q.storage_bytes())
        );
        let (a, b) = (
            q.dequantize(Kind::Float).unwrap(),
            back.dequantize(Kind::Float).unwrap(),
        );
        assert!(
            a.equal(&b),
            "{yaml}: dequantized weights differ after the round trip"
        );
        // a missing part and a wrong shape are errors naming the problem
        let mut parts = q.named_tensors();
        let (name, _) = parts.remove(0);
        let e = from_named_tensors(q.format(), q.shape(), parts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name), "{yaml}: {e}");
        // (the packed 4-bit codes carry no shape, only a count: a transposed shape would pass)
        let e = from_named_tensors(q.format(), (96, 96), q.named_tensors())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected") || e.contains("divide"),
            "{yaml}: {e}"
        );
    }
    let e = from_named_tensors("int4", (2, 2), vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown quantized format"), "{e}");
}
