//! ferry's data plane. It obeys a [`plan::Plan`] made by `control`; it never reads sysfs
//! or config files itself.
#![deny(unsafe_code)]

/// The resolved plan the data plane runs with.
pub mod plan;
