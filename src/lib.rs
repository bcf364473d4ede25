//! Würstchen v2 text-to-image (arXiv 2306.00637) on candle, loading diffusers-format weights
//! and computing what diffusers 0.42.1 computes.

pub mod error;
pub mod hub;
pub mod rng;
pub mod tokenizer;
pub mod config;
pub mod ops;
pub mod weights;
pub mod models;
pub mod scheduler;
pub mod pipeline;
pub mod progress;
pub mod output;
pub mod cli;
pub mod commands;
pub mod request;
pub mod tiny;
pub mod prompts;
