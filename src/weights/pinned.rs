//! Uploads to a CUDA device through two page-locked buffers (`WUERSTCHEN_PINNED_UPLOAD=1`,
//! see [`super::pinned_upload`]).
//!
//! A copy from pageable memory (the file's mapping) makes the driver stage it through its own
//! small pinned buffer and wait for each piece. Here the CPU fills one of two pinned buffers
//! from the mapping (on every core) while the DMA engine sends the other, so reading the file
//! and the PCIe transfer overlap. Tensors go up in their stored dtype; the caller casts them on
//! the device. Opt-in until a GPU run of `selftest` has passed with it.

use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaSlice, DevicePtrMut, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Bytes per staging buffer: large enough that a transfer runs at PCIe speed, small enough
/// that two of them are nothing beside the weights.
const CHUNK: usize = 32 << 20;

/// Two pinned host buffers, each with the event of the last transfer out of it.
pub struct Staging {
    device: CudaDevice,
    buffers: [(PinnedHostSlice<u8>, CudaEvent); 2],
    next: usize,
}

impl Staging {
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let ctx = device.cuda_stream().context().clone();
        let buffer = || -> Result<(PinnedHostSlice<u8>, CudaEvent)> {
            // SAFETY: the buffer is only read by transfers of bytes written into it first.
            let pinned = unsafe { ctx.alloc_pinned::<u8>(CHUNK) }.w()?;
            Ok((pinned, ctx.new_event(None).w()?))
        };
        Ok(Self {
            device: device.clone(),
            buffers: [buffer()?, buffer()?],
            next: 0,
        })
    }

    /// The device this stages for.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// `bytes` (little-endian elements of `stored`) as a tensor of `shape` on the device.
    pub fn upload(&mut self, bytes: &[u8], stored: DType, shape: &[usize]) -> Result<Tensor> {
        let dev = &self.device.clone();
        let storage = match stored {
            DType::F32 => self.upload_as::<f32>(bytes, dev)?,
            DType::BF16 => self.upload_as::<half::bf16>(bytes, dev)?,
            DType::F16 => self.upload_as::<half::f16>(bytes, dev)?,
            DType::F64 => self.upload_as::<f64>(bytes, dev)?,
            other => candle_core::bail!("no pinned upload for {other:?}"),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    fn upload_as<T: CudaDType + DeviceRepr>(&mut self, bytes: &[u8], dev: &CudaDevice) -> Result<CudaStorage> {
        let size = std::mem::size_of::<T>();
        if bytes.len() % size != 0 {
            candle_core::bail!("{} bytes are not whole {size}-byte elements", bytes.len());
        }
        let stream = dev.cuda_stream();
        // SAFETY: every byte of the slice is written by the transfers below before any use.
        let mut slice: CudaSlice<T> = unsafe { stream.alloc(bytes.len() / size) }.w()?;
        {
            let (dst, _written) = slice.device_ptr_mut(&stream);
            for (i, piece) in bytes.chunks(CHUNK).enumerate() {
                let (pinned, sent) = &mut self.buffers[self.next];
                self.next = 1 - self.next;
                // The buffer's previous transfer must be done before it is overwritten.
                sent.synchronize().w()?;
                let host = &mut pinned.as_mut_slice().w()?[..piece.len()];
                host.par_chunks_mut(1 << 20)
                    .zip(piece.par_chunks(1 << 20))
                    .for_each(|(to, from)| to.copy_from_slice(from));
                let offset = (i * CHUNK) as u64;
                // SAFETY: `dst + offset` has `piece.len()` bytes left in the slice, and the host
                // buffer is not written again before `sent` says this transfer is done.
                unsafe { result::memcpy_htod_async(dst + offset, host, stream.cu_stream()) }.w()?;
                sent.record(&stream).w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
    }
}

impl Drop for Staging {
    /// The buffers are freed only once no transfer reads from them.
    fn drop(&mut self) {
        for (_, sent) in &self.buffers {
            if let Err(e) = sent.synchronize() {
                tracing::warn!("waiting for a weight upload to finish: {e}");
            }
        }
    }
}
