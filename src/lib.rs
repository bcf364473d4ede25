//! Würstchen v2 text-to-image (arXiv 2306.00637) and its successor Stable Cascade on candle,
//! loading diffusers-format weights and computing what diffusers 0.42.1 computes.

#[cfg(unix)]
pub mod blocks;
pub mod cascade;
pub mod commands;
pub mod config;
pub mod error;
pub mod graph;
pub mod hub;
pub mod image_processor;
pub mod mapping;
pub mod memory;
pub mod models;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod prompts;
pub mod record;
pub mod request;
pub mod rng;
pub mod scheduler;
pub mod selftest;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

/// The unit tests run with the binary's allocator, so that weights live in their mappings there too.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: mapping::MappingAware = mapping::MappingAware;
