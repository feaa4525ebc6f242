//! vramcal: measure, estimate and calibrate the peak memory of LLM fine-tuning steps.
//!
//! Two pipelines share one vocabulary:
//! * measuring: [`config`] (model sizes) → [`spec`] (training setup) → [`model`] (a trainable
//!   decoder, loading [`weights`]) → [`measure`] (real steps, peak allocator memory per phase)
//!   → [`report`] (CSV rows and tables);
//! * estimating: [`spec`] → [`estimate`] (itemized peak) → [`calibrate`] (coefficients fitted
//!   to measured rows) → `vramcal check` (estimates against measurements).

#![warn(missing_docs)]

pub mod calibrate;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod error;
pub mod estimate;
pub mod export;
#[cfg(not(target_arch = "wasm32"))]
pub mod hub;
pub mod input;
pub mod measure;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod size;
pub mod spec;
pub mod throughput;
pub mod weights;

pub use error::{Error, Result};

/// This vramcal's version (the `tool_version` of the rows and tables it writes).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
