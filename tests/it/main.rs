//! The integration tests, as one test binary (`it`): one link of candle and the crate instead
//! of one per file. Each file below is a module; a test's name starts with its module, e.g.
//! `cargo test --test it batch::` or `cargo test --test it properties`.
//!
//! `common` holds fixture paths, reference tensors and the scrubbed-environment binary;
//! `hub_support` a local stand-in for the Hub. Fixtures stay in `tests/fixtures`.

mod common;
mod hub_support;

mod batch;
mod cascade;
mod cli;
mod errors;
mod hub;
mod precision;
mod properties;
mod reference;
mod tiny_model;
