//! Shared helpers for ferry's benchmarks.

use std::path::{Path, PathBuf};

use hw::Capabilities;

/// The capability fixtures checked in with `control`'s tests, by name.
pub fn fixtures() -> Vec<(String, Capabilities)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/tests/fixtures/caps");
    let mut out: Vec<(String, Capabilities)> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            let caps = serde_json::from_str(&std::fs::read_to_string(&p).expect("read fixture")).expect("fixture parses");
            (p.file_stem().unwrap().to_string_lossy().into_owned(), caps)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures_load() {
        assert!(super::fixtures().len() >= 7);
    }
}
