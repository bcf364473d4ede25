//! The networks, built from their config structs and a `VarBuilder` whose paths mirror the
//! diffusers / transformers safetensors keys. No file access here.

pub mod cascade;
pub mod clip;
pub mod common;
pub mod decoder;
pub mod prior;
pub mod vqgan;

pub use clip::ClipTextModel;
pub use decoder::{DecoderCond, WuerstchenDiffNeXt};
pub use prior::{PriorCond, WuerstchenPrior};
pub use vqgan::PaellaVqDecoder;
