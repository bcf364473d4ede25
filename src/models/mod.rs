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

/// A network's conditioning for a batch of images (computed once per prompt), of which a
/// step can take some images' part.
pub trait BatchConditioning: Sized + Sync {
    /// Images `start..start + len` of the batch.
    fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Self>;
}
