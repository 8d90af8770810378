//! Training: the run config and presets, the loop, the optimizer and schedule,
//! checkpoints, validation, the held-out generation check, and events.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod heldout;
pub mod observer;
pub mod optim;
pub mod trainer;

pub use config::RunConfig;
pub use observer::{TrainEvent, TrainObserver};
pub use trainer::{train, TrainOptions, TrainSummary};
