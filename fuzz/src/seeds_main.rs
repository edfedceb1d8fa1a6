//! Writes the seed corpus: `scripts/fuzz --seeds` runs this as `seeds fuzz/seeds` (one
//! directory per target; seeds of the same name are replaced, others left alone).

// The coverage hooks the instrumented build calls come from libFuzzer; its `main` is not used.
use libfuzzer_sys as _;

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let mut n = 0;
    for (target, name, bytes) in tiandi_fuzz::seeds::all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
        n += 1;
    }
    println!("{n} seeds in {}", dir.display());
    Ok(())
}
