//! CUDA graphs for the sampling loop's network call, what torch.compile's "reduce-overhead"
//! mode does: a step of the prior or the decoder is thousands of small kernel launches whose
//! host-side cost exceeds their arithmetic at batch 1, and a captured graph replays all of
//! them in one launch.
//!
//! The first call runs eagerly with candle's cache of small host-to-device parameter uploads
//! switched on (so the second finds every one of them on the device: a capture may not
//! copy from the host); the second copies its inputs into buffers of its own, captures the
//! network on those, and launches the graph; every later call copies its inputs into the same
//! buffers and relaunches. Anything that cannot be captured (an upload the cache lacks, a
//! host read inside the network) ends the capture and leaves the rest of the loop eager.
//!
//! Opt-in with `WUERSTCHEN_CUDA_GRAPHS=1` until `wuerstchen selftest` has passed with it on a
//! GPU (its pipeline check runs the sampling loop); off CUDA it does nothing. The same switch
//! turns off cudarc's event tracking and keeps freed memory in the device's pool
//! (`RuntimeSpec::open`).

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Whether the sampling loops capture CUDA graphs (`WUERSTCHEN_CUDA_GRAPHS=1`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WUERSTCHEN_CUDA_GRAPHS").is_ok_and(|v| v == "1"))
}

/// A network call `model(x, r)` with the same input shapes at every step, replayed from a
/// CUDA graph from the second step on where graphs are switched on.
pub struct StepReplay<F> {
    model: F,
    #[cfg(feature = "cuda")]
    state: cuda::State,
}

impl<F: Fn(&Tensor, &Tensor) -> Result<Tensor>> StepReplay<F> {
    pub fn new(device: &Device, model: F) -> Self {
        let _ = device;
        Self {
            model,
            #[cfg(feature = "cuda")]
            state: cuda::State::new(device),
        }
    }

    /// `model(x, r)`: eagerly, or through the graph.
    pub fn call(&mut self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.state.call(&self.model, x, r);
        #[cfg(not(feature = "cuda"))]
        (self.model)(x, r)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
    use candle_core::{Device, Tensor};

    /// candle's guard that keeps its upload cache on (a type it does not export by name).
    type UploadCache = Box<dyn std::any::Any>;

    pub(super) enum State {
        /// graphs off, not CUDA, or a capture failed
        Eager,
        /// before the first call
        Start(candle_core::CudaDevice),
        /// after the eager first call, with the upload cache on
        Warm(candle_core::CudaDevice, UploadCache),
        Captured(Box<Captured>),
    }

    pub(super) struct Captured {
        /// the network's output in the graph's own memory, rewritten by each launch
        out: Tensor,
        /// the inputs the graph reads
        x: Tensor,
        r: Tensor,
        graph: CudaGraph,
        _uploads: UploadCache,
    }

    impl State {
        pub(super) fn new(device: &Device) -> Self {
            match device.as_cuda_device() {
                Ok(dev) if super::enabled() => State::Start(dev.clone()),
                _ => State::Eager,
            }
        }

        pub(super) fn call(
            &mut self,
            model: &impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
            x: &Tensor,
            r: &Tensor,
        ) -> Result<Tensor> {
            match std::mem::replace(self, State::Eager) {
                State::Eager => model(x, r),
                State::Start(dev) => {
                    let guard: UploadCache = Box::new(dev.enable_cuda_graph_htod_cache());
                    let out = model(x, r)?;
                    *self = State::Warm(dev, guard);
                    Ok(out)
                }
                State::Warm(dev, guard) => match capture(&dev, model, x, r, guard) {
                    Ok(captured) => {
                        let out = captured.launch(x, r);
                        *self = State::Captured(Box::new(captured));
                        out
                    }
                    Err(e) => {
                        tracing::debug!("no CUDA graph for this loop ({e}); running eagerly");
                        model(x, r)
                    }
                },
                State::Captured(captured) => {
                    let same = captured.x.shape() == x.shape() && captured.r.shape() == r.shape();
                    let out = if same { captured.launch(x, r) } else { model(x, r) };
                    *self = State::Captured(captured);
                    out
                }
            }
        }
    }

    impl Captured {
        fn launch(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
            self.x.slice_set(&x.contiguous()?, 0, 0)?;
            self.r.slice_set(&r.contiguous()?, 0, 0)?;
            self.graph.launch()?;
            // the next launch rewrites `out`
            Ok(self.out.copy()?)
        }
    }

    fn capture(
        dev: &candle_core::CudaDevice,
        model: &impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x: &Tensor,
        r: &Tensor,
        uploads: UploadCache,
    ) -> Result<Captured> {
        let (xs, rs) = (x.contiguous()?.copy()?, r.contiguous()?.copy()?);
        let stream: Arc<CudaStream> = dev.cuda_stream();
        stream.synchronize()?;
        // relaxed: other threads (the loading bars, a decoder loading beside the prior) may
        // make CUDA calls that a stricter mode would forbid while this stream captures
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let out = model(&xs, &rs);
        // memory the graph allocates and does not free (`out`) is freed by its next launch
        let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags);
        let out = out?;
        let graph = graph?.ok_or_else(|| anyhow::anyhow!("the capture recorded nothing"))?;
        Ok(Captured {
            out,
            x: xs,
            r: rs,
            graph,
            _uploads: uploads,
        })
    }
}
