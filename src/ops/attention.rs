//! Scaled dot-product attention, `softmax(q k^T * scale) v`, computed in blocks of query rows
//! (and, for very long keys, of heads) so that the scores never exist whole: at 1024x1536
//! with decoder guidance the whole scores of one layer would take ~10 GB, and past 2^31
//! elements candle's CUDA softmax (32-bit indexing) would compute garbage. Each block's rows
//! are computed exactly as they would be unblocked: the logits go to f32 before the scale and
//! softmax, whatever the storage dtype. On the CPU in f32 one kernel goes through a block of
//! rows of one head and the keys in blocks, flash-style, while their scores are in cache
//! ([`CpuAttention`]); its online softmax sums in another order than a whole row's.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::matmul::{gemm_tile, Operand, Out};
use super::softmax::{softmax_block, RunningRow};
use super::{scaled_softmax_last_dim, slice_of};

/// Default memory for one block's scores and their temporaries.
const DEFAULT_BUDGET: usize = 1 << 30;

/// Most elements one op may hold: candle's CUDA kernels index with `int`.
const MAX_ELEMENTS: usize = (1 << 31) - 1;

static BUDGET: AtomicUsize = AtomicUsize::new(DEFAULT_BUDGET);

/// Sets the bytes one attention block may use for its scores (the `--attention-budget`
/// option); blocks shrink to fit, down to one query row of one head.
pub fn set_attention_budget(bytes: usize) {
    BUDGET.store(bytes.max(1), Ordering::Relaxed);
}

/// The bytes one attention block may use for its scores.
pub fn attention_budget() -> usize {
    BUDGET.load(Ordering::Relaxed)
}

/// Bytes held per score element while a block is computed: the product in the storage dtype,
/// its f32 copy, the scaled copy (device-generic form) and the probabilities in f32 and back
/// in the storage dtype. An upper bound for every path.
pub fn bytes_per_score(dtype: DType) -> usize {
    let s = dtype.size_in_bytes();
    s + 4 + 4 + 4 + s
}

/// How attention over `bh` heads (batch x heads), `lq` queries and `lk` keys is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// heads per block
    pub heads: usize,
    /// query rows per block
    pub rows: usize,
}

impl ChunkPlan {
    /// Score elements of one block.
    pub fn elements(&self, lk: usize) -> usize {
        self.heads * self.rows * lk
    }
}

/// The largest blocks whose scores fit `budget` bytes and `MAX_ELEMENTS` elements: all heads
/// and as many query rows as fit, or, when one row of every head does not fit, fewer heads.
pub fn chunk_plan(bh: usize, lq: usize, lk: usize, dtype: DType, budget: usize) -> ChunkPlan {
    let per_row = lk.max(1);
    let max_elements = (budget / bytes_per_score(dtype)).clamp(1, MAX_ELEMENTS);
    let fits = max_elements / per_row; // (head, row) pairs per block
    if fits >= bh.max(1) {
        ChunkPlan {
            heads: bh,
            rows: (fits / bh.max(1)).clamp(1, lq.max(1)),
        }
    } else {
        ChunkPlan {
            heads: fits.max(1),
            rows: 1,
        }
    }
}

/// `q`: (B, H, Lq, D), `k` and `v`: (B, H, Lk, D), contiguous -> (B, H, Lq, D) in `v`'s dtype,
/// in blocks of at most `attention_budget()` bytes of scores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with_budget(q, k, v, scale, attention_budget())
}

/// [`attention`] with an explicit budget.
pub fn attention_with_budget(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let bh = b * h;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && super::fused_attention() && d <= super::cuda::ATTENTION_MAX_HEAD_DIM {
        // the fused CUDA kernel holds no scores: no blocks needed
        let (q, k, v) = (
            q.reshape((bh, lq, d))?.contiguous()?,
            k.reshape((bh, lk, d))?.contiguous()?,
            v.reshape((bh, lk, d))?.contiguous()?,
        );
        return q
            .apply_op3_no_bwd(&k, &v, &FusedAttention { scale: scale as f32 })?
            .reshape((b, h, lq, d));
    }
    if cpu_attention_kernel(q.device(), q.dtype()) && [k, v].iter().all(|t| t.dtype() == DType::F32) && lk > 0 && d > 0
    {
        let (q, k, v) = (
            q.reshape((bh, lq, d))?.contiguous()?,
            k.reshape((bh, lk, d))?.contiguous()?,
            v.reshape((bh, lk, d))?.contiguous()?,
        );
        let op = CpuAttention { scale: scale as f32 };
        return q.apply_op3_no_bwd(&k, &v, &op)?.reshape((b, h, lq, d));
    }
    let plan = chunk_plan(bh, lq, lk, q.dtype(), budget);
    if plan.heads >= bh && plan.rows >= lq {
        return block(q, k, v, scale);
    }
    let (q, k, v) = (
        q.reshape((bh, lq, d))?,
        k.reshape((bh, lk, d))?,
        v.reshape((bh, lk, d))?,
    );
    let mut per_heads = Vec::with_capacity(bh.div_ceil(plan.heads));
    for h0 in (0..bh).step_by(plan.heads) {
        let nh = plan.heads.min(bh - h0);
        let (qh, kh, vh) = (q.narrow(0, h0, nh)?, k.narrow(0, h0, nh)?, v.narrow(0, h0, nh)?);
        let mut rows = Vec::with_capacity(lq.div_ceil(plan.rows));
        for r0 in (0..lq).step_by(plan.rows) {
            rows.push(block(&qh.narrow(1, r0, plan.rows.min(lq - r0))?, &kh, &vh, scale)?);
        }
        per_heads.push(Tensor::cat(&rows, 1)?);
    }
    Tensor::cat(&per_heads, 0)?.reshape((b, h, lq, d))
}

/// Query rows and keys per block of [`CpuAttention`] (torch's CPU flash attention takes 256
/// and 512 for long sequences): 512 KiB of scores, which stay in a core's L2 cache with the
/// block's keys, values and output rows from the product with `k` through the softmax to the
/// product with `v`.
const CPU_QUERY_BLOCK: usize = 256;
const CPU_KEY_BLOCK: usize = 512;

/// Whether attention on `device` in `dtype` runs as [`CpuAttention`]: f32 on the CPU, unless
/// generic forms are forced. The memory estimate counts its scores by the same rule.
pub fn cpu_attention_kernel(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu() && !super::generic_forms() && dtype == DType::F32
}

/// Query rows per task of [`CpuAttention`] over `lq` queries, and the bytes of scores the
/// task holds over `lk` keys. Each thread holds one task's scores.
pub fn cpu_task(lq: usize, lk: usize) -> (usize, usize) {
    let rows = CPU_QUERY_BLOCK.min(lq.max(1));
    (rows, rows * CPU_KEY_BLOCK.min(lk.max(1)) * 4)
}

/// Attention on the CPU in f32 for (heads, L, D) contiguous operands, flash-style: one task
/// per head and block of query rows, which goes through the keys in blocks, each block's
/// scores, softmax and product with `v` done while they are in cache. The softmax is online:
/// each row keeps its running max and sum, its output accumulates the block products
/// (rescaled where the max rises) and is divided by the sum at the end. A task holds 512 KiB
/// of scores where whole rows took 8 MiB (128 MiB at 16 threads), at the same speed on two
/// cores; the softmax's arithmetic, not its memory, is its cost.
struct CpuAttention {
    scale: f32,
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("cpu-attention takes f32");
        };
        let (q, k, v) = (slice_of(q, l1)?, slice_of(k, l2)?, slice_of(v, l3)?);
        let ((bh, lq, d), (_, lk, _)) = (l1.shape().dims3()?, l2.shape().dims3()?);
        let (rows, score_bytes) = cpu_task(lq, lk);
        let mut dst: Vec<f32> = Vec::with_capacity(bh * lq * d);
        let out = Out(dst.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..bh)
            .flat_map(|h| (0..lq).step_by(rows).map(move |r0| (h, r0)))
            .collect();
        let scale = self.scale;
        tasks.into_par_iter().for_each(|(h, r0)| {
            let n = rows.min(lq - r0);
            // SAFETY: this task alone writes rows r0..r0 + n of head h of the (bh, lq, d)
            // output; zeroed here before they are read.
            let acc = unsafe {
                let at = out.ptr().add((h * lq + r0) * d);
                std::ptr::write_bytes(at, 0, n * d);
                std::slice::from_raw_parts_mut(at, n * d)
            };
            let q_rows = Operand {
                data: &q[(h * lq + r0) * d..],
                rs: d,
                cs: 1,
            };
            let mut states = vec![RunningRow::START; n];
            let mut scores: Vec<f32> = Vec::with_capacity(score_bytes / 4);
            for j0 in (0..lk).step_by(CPU_KEY_BLOCK) {
                let kb = CPU_KEY_BLOCK.min(lk - j0);
                // k^T: (d, kb) at k's (lk, d) layout
                let k_t = Operand {
                    data: &k[(h * lk + j0) * d..],
                    rs: 1,
                    cs: d,
                };
                // SAFETY: `scores` has room for the (n, kb) product, which gemm writes whole;
                // the operands cover their elements.
                unsafe {
                    gemm_tile(scores.as_mut_ptr(), (kb, 1), false, &q_rows, &k_t, (n, d, kb));
                    scores.set_len(n * kb);
                }
                softmax_block(&mut scores, kb, scale, &mut states, acc, d);
                let p = Operand {
                    data: &scores,
                    rs: kb,
                    cs: 1,
                };
                let v_block = Operand {
                    data: &v[(h * lk + j0) * d..],
                    rs: d,
                    cs: 1,
                };
                // SAFETY: `acc` holds the (n, d) rows, initialised.
                unsafe { gemm_tile(acc.as_mut_ptr(), (d, 1), true, &p, &v_block, (n, kb, d)) };
            }
            for (row, state) in acc.chunks_exact_mut(d).zip(&states) {
                state.finish(row);
            }
        });
        // SAFETY: the tasks cover every row of every head.
        unsafe { dst.set_len(bh * lq * d) };
        Ok((CpuStorage::F32(dst), Shape::from((bh, lq, d))))
    }
}

/// Attention through the fused CUDA kernel (`ops::cuda`); the CPU has [`CpuAttention`] for f32
/// and the blocked path for the half types.
#[cfg(feature = "cuda")]
struct FusedAttention {
    scale: f32,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-attention runs on CUDA only; the CPU takes the blocked path")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let out = super::cuda::attention((s1, l1), (s2, l2), (s3, l3), self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

/// One block, scores whole: `softmax(q k^T * scale)` in f32, then times `v`; any leading
/// dimensions (heads, batch) are one batch of products.
fn block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let batched = |t: &Tensor| -> Result<Tensor> {
        let (rows, cols) = (t.dim(D::Minus2)?, t.dim(D::Minus1)?);
        t.reshape((t.elem_count() / (rows * cols).max(1), rows, cols))
    };
    let (q, k, v) = (batched(&q.contiguous()?)?, batched(k)?, batched(v)?);
    let scores = super::matmul(&q, &k.t()?)?;
    let out = super::matmul(&scaled_softmax_last_dim(&scores, scale)?.to_dtype(v.dtype())?, &v)?;
    out.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rel_err;
    use candle_core::Device;

    #[test]
    fn plans_fit_the_budget_and_the_index_limit() {
        // everything fits: one block
        assert_eq!(
            chunk_plan(20, 4096, 4173, DType::BF16, usize::MAX),
            ChunkPlan { heads: 20, rows: 4096 }
        );
        // 1 GiB for bf16 scores (16 bytes each): 67108864 elements, 804 rows of 20 heads
        let p = chunk_plan(20, 4096, 4173, DType::BF16, 1 << 30);
        assert_eq!(p, ChunkPlan { heads: 20, rows: 804 });
        assert!(p.elements(4173) * bytes_per_score(DType::BF16) <= 1 << 30);
        // the decoder's level at 1792x1792 with guidance: never 2^31 elements in one op
        let p = chunk_plan(40, 12544, 12621, DType::F32, usize::MAX);
        assert!(p.elements(12621) <= MAX_ELEMENTS, "{p:?}");
        // less than one row of every head: fewer heads, one row
        assert_eq!(
            chunk_plan(8, 100, 1000, DType::F32, 3 * 1000 * 20),
            ChunkPlan { heads: 3, rows: 1 }
        );
        // nothing fits: still one row of one head
        assert_eq!(chunk_plan(8, 100, 1000, DType::F32, 1), ChunkPlan { heads: 1, rows: 1 });
    }

    #[test]
    fn blocked_equals_whole_within_f32_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, lq, lk, d) = (2, 3, 37, 45, 8);
        let q = Tensor::randn(0f32, 1., (b, h, lq, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?;
        let scale = (d as f64).powf(-0.5);
        let whole = attention_with_budget(&q, &k, &v, scale, usize::MAX)?;
        // an independent reference: candle's softmax over the whole scores
        let want = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(&v)?;
        assert!(rel_err(&whole, &want) < 1e-6);
        // the blocks of the device-generic path (f32 on the CPU takes the fused kernel)
        let per_score = bytes_per_score(DType::F32);
        for budget in [per_score * lk * b * h * 5, per_score * lk * 4, 1] {
            let blocked = crate::ops::with_generic_forms(|| attention_with_budget(&q, &k, &v, scale, budget))?;
            let err = rel_err(&blocked, &whole);
            assert!(err < 1e-6, "budget {budget}: {err}");
        }
        // half precision: the same blocks, the same rounding
        let (qh, kh, vh) = (
            q.to_dtype(DType::BF16)?,
            k.to_dtype(DType::BF16)?,
            v.to_dtype(DType::BF16)?,
        );
        let whole = attention_with_budget(&qh, &kh, &vh, scale, usize::MAX)?;
        let blocked = attention_with_budget(&qh, &kh, &vh, scale, 1)?;
        assert_eq!(whole.dtype(), DType::BF16);
        assert!(rel_err(&blocked.to_dtype(DType::F32)?, &whole.to_dtype(DType::F32)?) < 1e-6);
        Ok(())
    }

    /// Queries and keys long enough that the CPU kernel splits each head into several tasks
    /// and each task's keys into several blocks, with logits that grow along the keys so that
    /// every block raises the rows' running max (and rescales what they accumulated).
    #[test]
    fn cpu_kernel_matches_a_whole_softmax_over_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, lq, lk, d) = (1, 2, 300, 1300, 8);
        assert!(
            lq > cpu_task(lq, lk).0 && lk > CPU_KEY_BLOCK,
            "several tasks and key blocks"
        );
        let q = (Tensor::randn(0f32, 1., (b, h, lq, d), &dev)?.abs()? + 0.5)?;
        let rising = Tensor::arange(0f32, lk as f32, &dev)?
            .affine(4.0 / lk as f64, 0.0)?
            .reshape((1, 1, lk, 1))?;
        let k = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?.broadcast_add(&rising)?;
        let v = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?;
        let scale = (d as f64).powf(-0.5);
        let ours = attention(&q, &k, &v, scale)?;
        let want = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(&v)?;
        assert!(rel_err(&ours, &want) < 1e-6);
        Ok(())
    }

    /// A NaN among one query row's scores makes that row NaN, as in a whole softmax, and
    /// leaves the others.
    #[test]
    fn cpu_kernel_keeps_a_nan_in_its_row() -> Result<()> {
        let dev = Device::Cpu;
        let (lq, lk, d) = (5, 1100, 4);
        let mut qv = vec![0.5f32; lq * d];
        qv[2 * d + 1] = f32::NAN;
        let q = Tensor::from_vec(qv, (1, 1, lq, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 1, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, 1, lk, d), &dev)?;
        let out = attention(&q, &k, &v, 0.5)?.reshape((lq, d))?.to_vec2::<f32>()?;
        for (i, row) in out.iter().enumerate() {
            assert_eq!(row.iter().all(|x| x.is_nan()), i == 2, "row {i}: {row:?}");
            assert!(i == 2 || row.iter().all(|x| x.is_finite()), "row {i}: {row:?}");
        }
        Ok(())
    }
}
