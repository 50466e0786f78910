//! The session layer: what every job (one-shot transfer, migration, stream channel) does
//! around its data: bounding what a peer may cost before and after it authenticates.

pub mod accept;
pub mod errors;
pub mod limits;
pub mod seal;
