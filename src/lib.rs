//! Tunebench engine: model loading, PEFT methods, data, training and inference for
//! fine-tuning Llama-family language models on a workstation.
//!
//! The engine has no GUI dependencies; the CLI (`src/bin/`) and later the desktop shell and
//! HTTP server are thin layers over it. See ARCHITECTURE.md for the map.
#![deny(missing_docs)]

pub mod data;
pub mod error;
pub mod infer;
pub mod model;
pub mod paths;
pub mod peft;
pub mod train;

pub use error::{Error, Result};
