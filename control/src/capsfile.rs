//! Loading a capabilities report written by `ferryctl probe --json` (or a fixture).

use std::path::Path;

use hw::caps::{CAPS_SCHEMA_VERSION, Capabilities};

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot read capabilities file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("capabilities file {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error(
        "capabilities file {path} has schema_version {found}; this ferryctl reads version {CAPS_SCHEMA_VERSION} (run `ferryctl probe --json` again)"
    )]
    Version { path: String, found: u32 },
}

pub fn load(path: &Path) -> Result<Capabilities, CapsError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CapsError::Read { path: p.clone(), source })?;
    let caps: Capabilities = serde_json::from_str(&text).map_err(|source| CapsError::Parse { path: p.clone(), source })?;
    if caps.schema_version != CAPS_SCHEMA_VERSION {
        return Err(CapsError::Version { path: p, found: caps.schema_version });
    }
    Ok(caps)
}
