//! Progress reporting, as a trait the pipeline calls: terminal bars in the binary, nothing in
//! tests and library use.

/// Told about each stage and each step of it.
pub trait Progress {
    /// A new stage (`"prior"`, `"decoder"`, `"vqgan"`) of `total` steps begins.
    fn start(&mut self, stage: &str, total: usize);
    /// One step of the current stage is done.
    fn step(&mut self);
    /// The current stage is done.
    fn finish(&mut self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self) {}
    fn finish(&mut self) {}
}
