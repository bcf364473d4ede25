//! Time tokenizer loads: `cargo run --release --example tokenizer_load -- MODEL_DIR [LOADS]`.
#[global_allocator]
static ALLOCATOR: wuerstchen::mapping::MappingAware = wuerstchen::mapping::MappingAware;

use wuerstchen::hub::LocalDir;
use wuerstchen::tokenizer::ClipTokenizer;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("model folder");
    let loads: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let src = LocalDir::new(dir);
    for _ in 0..loads {
        let t = std::time::Instant::now();
        let tok = ClipTokenizer::load(&src, "tokenizer")?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(&tok);
        print!("{ms:.1} ");
    }
    println!();
    Ok(())
}
