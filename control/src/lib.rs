//! ferryctl's library: the config file, the planner, the doctor and the human-readable
//! renderings. Decisions are made here and only here; `hw` probes and `dataplane` obeys.
#![forbid(unsafe_code)]

/// Reading a capabilities file.
pub mod capsfile;
/// The TOML config file.
pub mod config;
/// `ferryctl demo` and `bench migrate`: a region-mode migration of a simulated guest.
pub mod demo;
/// Preflight checks with fixes.
pub mod doctor;
/// Why a command failed, and its exit status.
pub mod error;
/// The simulated guest: memory image, dirtying workload, dirty log.
pub mod guest;
/// Capabilities + config -> plan, with a reason for every value.
pub mod planner;
/// Human-readable renderings.
pub mod render;
/// `ferryctl stream open` and `ferryctl migrate` (libvirt): both ends from the source host.
pub mod streams;
/// `ferryctl send` / `recv` with the embedded data plane.
pub mod transfer;
