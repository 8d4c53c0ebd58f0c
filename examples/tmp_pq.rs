use volttrain::data::*;
fn main() {
    let tok = Tokenizer::from_dir("assets/tiny-llama").unwrap();
    for p in ["/tmp/z.parquet", "/tmp/n.parquet"] {
        let c = DatasetConfig {
            cache: false,
            ..DatasetConfig::new(p)
        };
        match SftDataset::load(&c, &tok) {
            Ok(d) => println!("{p}: {} examples", d.len()),
            Err(e) => println!("{p}: ERR {e}"),
        }
    }
}
