//! ferryctl's library: the config file, the planner, the doctor and the human-readable
//! renderings. Decisions are made here and only here; `hw` probes and `dataplane` obeys.
#![forbid(unsafe_code)]

/// The TOML config file.
pub mod config;
/// Capabilities + config -> plan, with a reason for every value.
pub mod planner;
/// Preflight checks with fixes.
pub mod doctor;
/// Human-readable renderings.
pub mod render;
/// Reading a capabilities file.
pub mod capsfile;
/// `ferryctl send` / `recv` with the embedded data plane.
pub mod transfer;
