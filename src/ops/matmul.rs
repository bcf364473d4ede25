//! f32 matrix products on the CPU, `a @ b (+ bias)`, split into one tile per thread, each a
//! single-threaded call of the `gemm` crate (the kernel candle's matmul calls too) or, on
//! request, of a system CBLAS library such as OpenBLAS (see [`super::blas`]).
//!
//! Why not candle's matmul: it hands the whole product to gemm's own threading, which for
//! the prior's shapes (288 rows at 512x512 with guidance, 384 -> 1536 columns) ran no faster
//! on two threads than on one (91 against 94 GFLOP/s here); it also zeroes the output before
//! gemm overwrites it, and a bias is one more pass. Here the larger of the two output
//! dimensions is split across the threads, each tile is written only by its thread (the bias
//! first, then gemm adds the product to it), and the output is never zeroed.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A linear layer's weight, (n, k) as stored, plus on the CPU in f32 a copy laid out as gemm
/// reads it: column-major, i.e. (k, n) row-major, seen through its transposed (n, k) view.
///
/// For a row-major output gemm multiplies with the weight as its left operand, which it wants
/// in columns; the stored rows it repacks element by element on every call, on each thread
/// for its tile (and for each chunk of a tall tile). In columns it reads the weight as it lies.
/// Measured on the mid-size model's products in the pipeline (288 rows, 2 threads):
/// 267-286 -> 355-400 GFLOP/s.
///
/// The copy costs about a pass over fresh memory, so it is made only where it pays: by a
/// weight's second product (a sampling step, a second prompt) with rows in
/// [`COLUMN_MAJOR_ROWS`]. A layer used once per image (the text encoders, the VQGAN) makes no
/// copy for one image: on the published sizes at 256x256 copies at first use took 4-6 s more
/// per image, most of it copying the text encoders' weights. Once the copy exists, every
/// product reads it, and the stored weight's pages in its file's mapping are dropped from the
/// process (they fault back in if read).
#[derive(Debug)]
pub struct LinearWeight {
    stored: Tensor,
    /// products with rows in [`COLUMN_MAJOR_ROWS`] on the CPU kernel so far
    uses: std::sync::atomic::AtomicUsize,
    column_major: std::sync::OnceLock<Tensor>,
}

impl Clone for LinearWeight {
    fn clone(&self) -> Self {
        Self {
            stored: self.stored.clone(),
            uses: self.uses.load(std::sync::atomic::Ordering::Relaxed).into(),
            column_major: self.column_major.clone(),
        }
    }
}

impl LinearWeight {
    pub fn new(stored: Tensor) -> Self {
        Self {
            stored,
            uses: 0.into(),
            column_major: Default::default(),
        }
    }

    /// The weight as loaded, (n, k).
    pub fn stored(&self) -> &Tensor {
        &self.stored
    }

    /// The (n, k) weight for a product with `x` (.., k): its column-major copy once it exists
    /// (made by the second product with rows in [`COLUMN_MAJOR_ROWS`] that the tiled CPU
    /// kernel runs), else the stored weight.
    pub fn for_input(&self, x: &Tensor) -> Result<&Tensor> {
        if let Some(copy) = self.column_major.get() {
            return Ok(copy);
        }
        let k = x.dims().last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / k;
        let w = &self.stored;
        if !COLUMN_MAJOR_ROWS.contains(&rows)
            || !super::cpu_kernel(x)
            || w.dtype() != DType::F32
            || !w.device().is_cpu()
        {
            return Ok(w);
        }
        if self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            return Ok(w);
        }
        let copy = column_major(w)?;
        Ok(self.column_major.get_or_init(|| copy))
    }
}

/// The products whose weight [`LinearWeight`] copies into columns: shorter ones read the stored
/// rows as they lie already (see [`product_chunk`]); taller ones repack the weight for 512 rows
/// or more (see [`product`]'s chunks), which amortises it. The published decoder at 256x256
/// (2 threads) took 0.3-0.5 s longer with copies from 128 rows up (its level 0's 1024-row
/// products); with copies below 512 rows only, as long as before within the noise.
const COLUMN_MAJOR_ROWS: std::ops::Range<usize> = SHORT_TILE_ROWS..512;

/// Rows of the output per task of [`column_major`]'s copy.
const TRANSPOSE_ROWS: usize = 32;

/// `w` (n, k) f32 on the CPU, any strides, copied into a (k, n) row-major buffer on every core,
/// returned as the buffer's (n, k) transposed view; then the pages `w` spans are dropped from
/// the process where they lie in a file's mapping (`crate::mapping::release_pages`).
fn column_major(w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let copy = {
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            candle_core::bail!("column_major: the weight is not f32 on the CPU");
        };
        let (rs, cs) = (layout.stride()[0], layout.stride()[1]);
        let src = &data[layout.start_offset()..];
        let mut out: Vec<f32> = Vec::with_capacity(k * n);
        out.spare_capacity_mut()[..k * n]
            .par_chunks_mut((TRANSPOSE_ROWS * n).max(1))
            .enumerate()
            .for_each(|(t, rows)| {
                let p0 = t * TRANSPOSE_ROWS;
                // blocks of 32 x 32 elements: the source's 32 rows stay in cache while read
                for j0 in (0..n).step_by(TRANSPOSE_ROWS) {
                    for (i, row) in rows.chunks_mut(n).enumerate() {
                        for j in j0..(j0 + TRANSPOSE_ROWS).min(n) {
                            row[j].write(src[j * rs + (p0 + i) * cs]);
                        }
                    }
                }
            });
        // SAFETY: the chunks cover all k * n elements, each written above.
        unsafe { out.set_len(k * n) };
        if n > 0 && k > 0 {
            let span = ((n - 1) * rs + (k - 1) * cs + 1) * std::mem::size_of::<f32>();
            crate::mapping::release_pages(src.as_ptr().cast(), span);
        }
        out
    };
    Tensor::from_vec(copy, (k, n), w.device())?.t()
}

/// `x (.., k) @ w^T + bias` for a linear layer's `w` (n, k) and optional `bias` (n): the
/// tiled CPU kernel for f32 on the CPU, candle's matmul elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_then(x, w, bias, Then::default())
}

/// What [`linear_then`] applies to the product in the same pass (on the CPU, while each
/// tile is in cache; elsewhere as separate ops, in this order).
#[derive(Debug, Clone, Copy, Default)]
pub struct Then<'a> {
    /// a term of the output's shape added to the product
    pub add: Option<&'a Tensor>,
    /// then the erf GELU
    pub gelu: bool,
    /// then a multiplication by this scalar (as `y * scale` would, in the output's dtype)
    pub scale: Option<f64>,
    /// then a term of the output's shape added last: a residual `x + f(x)`, in torch's order
    pub residual: Option<&'a Tensor>,
}

/// `then(x @ w^T + bias)`: [`linear`] with a skip term, a GELU, a scale and a residual fused
/// in. The CPU sums `(bias + add) + x w^T`, the other devices `(x w^T + bias) + add`: the same
/// up to f32 rounding. The scale and the residual come last on every device, as torch applies
/// them, so fusing them changes no bits.
pub fn linear_then(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, then: Then) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims.last().copied().unwrap_or(1);
    let rows = x.elem_count() / k.max(1);
    let n = w.dim(0)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let x2 = x.reshape((rows, k))?;
    let f32s = [Some(x), Some(w), bias, then.add, then.residual]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    if super::cpu_kernel(x) && f32s {
        let op = Product {
            bias: bias.cloned(),
            gelu: then.gelu,
            scale: then.scale.map(|s| s as f32),
            residual: then.residual.map(|r| r.reshape((rows, n))).transpose()?,
        };
        let wt = w.t()?;
        let y = match then.add {
            Some(add) => x2.apply_op3_no_bwd(&wt, &add.reshape((rows, n))?, &op)?,
            None => x2.apply_op2_no_bwd(&wt, &op)?,
        };
        return y.reshape(out_dims);
    }
    let mut y = x2.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let mut y = y.reshape(out_dims)?;
    if let Some(add) = then.add {
        y = (y + add)?;
    }
    if then.gelu {
        y = super::gelu_erf(&y)?;
    }
    if let Some(scale) = then.scale {
        y = (y * scale)?;
    }
    if let Some(residual) = then.residual {
        y = (residual + y)?;
    }
    Ok(y)
}

/// `a (m, k) @ b (k, n)`, or batched `a (B, m, k) @ b (B, k, n)`: the tiled CPU kernel for
/// f32 on the CPU (a batch: one product per thread at a time), candle's matmul elsewhere.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let tiled = super::cpu_kernel(a) && a.dtype() == DType::F32 && b.dtype() == DType::F32;
    match (a.rank(), b.rank()) {
        (2, 2) if tiled => a.apply_op2_no_bwd(b, &Product::default()),
        (3, 3) if tiled && a.dim(0)? == b.dim(0)? => a.apply_op2_no_bwd(b, &Batched),
        _ => a.matmul(b),
    }
}

/// The product as a custom op: (a, b) or (a, b, add), 2-D operands with any strides, plus
/// the bias, the GELU, the scale and the residual of [`Then`].
#[derive(Default)]
struct Product {
    bias: Option<Tensor>,
    gelu: bool,
    scale: Option<f32>,
    residual: Option<Tensor>,
}

/// A 2-D operand: its elements from the storage offset on, and its row and column strides.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> Operand<'a> {
    /// The transposed matrix: the same elements, the strides swapped.
    pub(super) fn transposed(self) -> Self {
        Operand {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(Self, usize, usize)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("matmul: {what} is {:?}, the tiled kernel takes f32", s.dtype());
        };
        let (r, c) = l.shape().dims2()?;
        let stride = l.stride();
        let op = Operand {
            data: &data[l.start_offset()..],
            rs: stride[0],
            cs: stride[1],
        };
        Ok((op, r, c))
    }
}

/// A pointer that tiles of one output share; each tile writes only its own elements.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: the tiles are disjoint (see `product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer, through a method so that a closure captures the whole (`Send`) struct.
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// How each output tile starts and ends: `bias` (n) and `add` (m, n, contiguous) summed into
/// it before the product is added, then the GELU, then the multiplication by `scale`, then
/// `residual` (m, n, contiguous) added.
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    add: Option<&'a [f32]>,
    gelu: bool,
    scale: Option<f32>,
    residual: Option<&'a [f32]>,
}

/// `residual + scale * gelu((bias + add) + a @ b)` into a new (m, n) row-major buffer.
///
/// Each row comes out the same whatever rows are beside it, so an image's numbers do not
/// depend on the batch it is in (and [`super::split_batch`] can run a batch's halves apart).
/// gemm's general kernels sum each element over k in an order set by k alone; its other paths
/// (one row, small outputs: see [`gemm_general`]) sum in orders of their own. So an output too
/// small for the general kernels (a timestep embedding's rows, one per image) is computed as
/// the corner of one that is not, padded with zeros ([`padded_product`]).
fn product(a: &Operand, b: &Operand, (m, k, n): (usize, usize, usize), epi: &Epilogue) -> Vec<f32> {
    let general = general_shape(m, n);
    if m > 0 && n > 0 && general != (m, n) {
        return padded_product(a, b, (m, k, n), general, epi);
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out(dst.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    // tiles along the larger output dimension, at least 16 rows or columns each, and only
    // tiles that gemm sums as it sums the whole product (see `gemm_general`), so that the
    // numbers do not depend on the thread count
    let (along_rows, len) = if m >= n { (true, m) } else { (false, n) };
    let general = |tiles: usize| {
        let t = len / tiles; // the smallest tile
        if along_rows {
            gemm_general(t, n)
        } else {
            gemm_general(m, t)
        }
    };
    let mut tiles = threads.min(len.div_ceil(16)).max(1);
    while tiles > 1 && !general(tiles) {
        tiles -= 1;
    }
    (0..tiles).into_par_iter().for_each(|t| {
        let (start, end) = (t * len / tiles, (t + 1) * len / tiles);
        let (rows, cols) = if along_rows {
            (start..end, 0..n)
        } else {
            (0..m, start..end)
        };
        // A tall tile in chunks of rows, so that each chunk's output stays in cache from its
        // bias through gemm's passes over k to the GELU (at least 512 rows, so that
        // repacking `b` for each chunk costs a few per cent at most), all of about one size
        // (none under 256 rows: gemm sums them as it sums the whole tile).
        let chunks = rows.len().div_ceil((CHUNK_BYTES / (4 * cols.len().max(1))).max(512));
        for c in 0..chunks {
            let rows = rows.start + c * rows.len() / chunks..rows.start + (c + 1) * rows.len() / chunks;
            // SAFETY: `dst` has room for m * n elements; this chunk covers rows x cols of it,
            // which no other tile touches, and writes every element before `set_len` below.
            unsafe { product_chunk(out, a, b, (n, k), (rows, cols.clone()), epi) };
        }
    });
    // SAFETY: every element was written by its tile.
    unsafe { dst.set_len(m * n) };
    dst
}

/// Whether gemm 0.19 multiplies an (m, n) output with its general, cache-blocked kernels,
/// whose sums over k follow k alone (its blocks of k are set by k and the caches). Smaller
/// outputs take paths that sum in other orders: a horizontal dot-product kernel up to 256
/// elements, blocks of 512 along k up to 64 x 64, matrix-vector products for one row or
/// column. So a tile of a general product must be general too, or the numbers would change
/// with the tiles, which follow the thread count.
fn gemm_general(m: usize, n: usize) -> bool {
    m > 1 && n > 1 && m * n > 256 && (m > 64 || n > 64)
}

/// The smallest output shape of at least (m, n) that gemm multiplies with its general kernels
/// ([`gemm_general`]): at least two columns, then as few rows as that takes (at most 129).
fn general_shape(m: usize, n: usize) -> (usize, usize) {
    let n = n.max(2);
    let mut m = m;
    while !gemm_general(m, n) {
        m += 1;
    }
    (m, n)
}

/// [`product`] as the (m, n) corner of a (pm, pn) product whose extra rows of `a` and columns
/// of `b` (and of the epilogue's terms) are zeros. For the small products it serves, the
/// copies cost about what the product does.
fn padded_product(
    a: &Operand,
    b: &Operand,
    (m, k, n): (usize, usize, usize),
    (pm, pn): (usize, usize),
    epi: &Epilogue,
) -> Vec<f32> {
    // `src`'s (rows, cols) at its strides into a zeroed row-major (height, width) buffer
    let padded = |src: &Operand, (rows, cols): (usize, usize), (height, width): (usize, usize)| {
        let mut v = vec![0f32; height * width];
        for r in 0..rows {
            for c in 0..cols {
                v[r * width + c] = src.data[r * src.rs + c * src.cs];
            }
        }
        v
    };
    fn row_major(data: &[f32], cols: usize) -> Operand<'_> {
        Operand { data, rs: cols, cs: 1 }
    }
    let pa = padded(a, (m, k), (pm, k));
    let pb = (pn != n).then(|| padded(b, (k, n), (k, pn)));
    let pb = pb.as_deref().map_or(*b, |data| row_major(data, pn));
    // the epilogue's terms: the bias one row, the others (m, n)
    let term =
        |t: Option<&[f32]>, rows: usize, height: usize| t.map(|t| padded(&row_major(t, n), (rows, n), (height, pn)));
    let (bias, add, residual) = (term(epi.bias, 1, 1), term(epi.add, m, pm), term(epi.residual, m, pm));
    let epi = Epilogue {
        bias: bias.as_deref(),
        add: add.as_deref(),
        gelu: epi.gelu,
        scale: epi.scale,
        residual: residual.as_deref(),
    };
    let mut out = product(&row_major(&pa, k), &pb, (pm, k, pn), &epi);
    if pn == n {
        out.truncate(m * n);
        out
    } else {
        out.chunks(pn).take(m).flat_map(|row| &row[..n]).copied().collect()
    }
}

/// Output bytes per chunk of a tall tile: a few MiB, which the caches hold.
const CHUNK_BYTES: usize = 4 << 20;

/// Tiles of fewer rows than this, with a weight stored in rows, are computed into a
/// column-major buffer (see [`product_chunk`]).
const SHORT_TILE_ROWS: usize = 128;

/// One chunk of a tile of [`product`]: `rows` x `cols` of the (m, n) output at `out`.
///
/// gemm computes a row-major output as the transposed product, with `b` (a linear layer's
/// weight) as its left operand, which it packs element by element on every call. For a few
/// rows (the prior's 72 at 256x256 with guidance) that repacking is not amortised: gemm
/// multiplies such a tile faster into a column-major buffer, reading the weight as it lies,
/// and the buffer is turned back into rows after (1.1-1.4x on the prior's shapes at 72 rows,
/// 0.8-0.9x at 288; the same numbers). A weight already in columns ([`LinearWeight`]) is read
/// as it lies for a row-major output, which needs no such turn.
///
/// # Safety
/// `out` must have room for the (m, n) output; no other thread may touch this chunk.
unsafe fn product_chunk(
    out: Out,
    a: &Operand,
    b: &Operand,
    (n, k): (usize, usize),
    (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
    epi: &Epilogue,
) {
    let (m, w) = (rows.len(), cols.len());
    let tile = out.ptr().add(rows.start * n + cols.start);
    let row = |r: usize| std::slice::from_raw_parts_mut(tile.add(r * n), w);
    let added = |r: usize| epi.add.map(|add| &add[(rows.start + r) * n..][cols.clone()]);
    let bias = epi.bias.map(|b| &b[cols.clone()]);
    let read_dst = bias.is_some() || epi.add.is_some();
    let a = Operand {
        data: &a.data[rows.start * a.rs..],
        ..*a
    };
    let b = Operand {
        data: &b.data[cols.start * b.cs..],
        ..*b
    };
    if m < SHORT_TILE_ROWS && b.rs == 1 {
        // element (r, c) at c * m + r
        let mut col_major: Vec<f32> = vec![0.0; m * w];
        if read_dst {
            for r in 0..m {
                let added = added(r);
                for c in 0..w {
                    col_major[c * m + r] = match (bias, added) {
                        (Some(b), Some(t)) => b[c] + t[c],
                        (Some(b), None) => b[c],
                        (None, Some(t)) => t[c],
                        (None, None) => 0.0,
                    };
                }
            }
        }
        gemm_tile(col_major.as_mut_ptr(), (1, m), read_dst, &a, &b, (m, k, w));
        for r in 0..m {
            for (c, o) in row(r).iter_mut().enumerate() {
                *o = col_major[c * m + r];
            }
        }
    } else {
        for r in 0..m {
            match (bias, added(r)) {
                (Some(b), Some(t)) => row(r)
                    .iter_mut()
                    .zip(b.iter().zip(t))
                    .for_each(|(o, (b, t))| *o = b + t),
                (Some(b), None) => row(r).copy_from_slice(b),
                (None, Some(t)) => row(r).copy_from_slice(t),
                (None, None) => break,
            }
        }
        gemm_tile(tile, (n, 1), read_dst, &a, &b, (m, k, w));
    }
    if epi.gelu {
        (0..m).for_each(|r| super::gelu::gelu_in_place(row(r)));
    }
    // `x + o * s`, as the separate ops round it: the product scaled, then the residual added
    match (epi.scale, epi.residual) {
        (Some(s), Some(residual)) => {
            for r in 0..m {
                let res = &residual[(rows.start + r) * n..][cols.clone()];
                row(r).iter_mut().zip(res).for_each(|(o, x)| *o = x + *o * s);
            }
        }
        (Some(s), None) => (0..m).for_each(|r| row(r).iter_mut().for_each(|o| *o *= s)),
        (None, Some(residual)) => {
            for r in 0..m {
                let res = &residual[(rows.start + r) * n..][cols.clone()];
                row(r).iter_mut().zip(res).for_each(|(o, x)| *o += x);
            }
        }
        (None, None) => {}
    }
}

/// One single-threaded product `dst (m, n) (+)= a @ b`, `dst` at row and column strides
/// `(dst_rs, dst_cs)`: through the CBLAS library [`super::blas`] loaded, if any (and where it
/// can read these layouts), else the `gemm` crate.
///
/// # Safety
/// `dst` must have room for the (m, n) tile at its strides, initialised if `read_dst`; `a`
/// and `b` must cover their (m, k) and (k, n) elements at their strides.
pub(super) unsafe fn gemm_tile(
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    read_dst: bool,
    a: &Operand,
    b: &Operand,
    (m, k, n): (usize, usize, usize),
) {
    if let Some(blas) = super::blas::get() {
        if blas.gemm(dst, (dst_rs, dst_cs), read_dst, a, b, (m, k, n)) {
            return;
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        read_dst,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Batched products: each (m, k) @ (k, n) pair on one thread.
struct Batched;

impl CustomOp2 for Batched {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!(
                "batched matmul: {:?} @ {:?}, the tiled kernel takes f32",
                s1.dtype(),
                s2.dtype()
            );
        };
        let ((batch, m, k), (_, k2, n)) = (l1.shape().dims3()?, l2.shape().dims3()?);
        if k != k2 {
            candle_core::bail!("batched matmul: (.., {m}, {k}) @ (.., {k2}, {n})");
        }
        let (sa, sb) = (l1.stride(), l2.stride());
        let (a, b) = (&a[l1.start_offset()..], &b[l2.start_offset()..]);
        let mut dst: Vec<f32> = Vec::with_capacity(batch * m * n);
        let out = Out(dst.as_mut_ptr());
        (0..batch).into_par_iter().for_each(|i| {
            let lhs = Operand {
                data: &a[i * sa[0]..],
                rs: sa[1],
                cs: sa[2],
            };
            let rhs = Operand {
                data: &b[i * sb[0]..],
                rs: sb[1],
                cs: sb[2],
            };
            // SAFETY: product `i` writes only its own (m, n) block of `dst`, every element
            // of it; the operands cover their elements at their layouts' strides.
            unsafe { gemm_tile(out.ptr().add(i * m * n), (n, 1), false, &lhs, &rhs, (m, k, n)) };
        });
        // SAFETY: every block was written.
        unsafe { dst.set_len(batch * m * n) };
        Ok((CpuStorage::F32(dst), Shape::from((batch, m, n))))
    }
}

impl Product {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        add: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, m, k) = Operand::of(s1, l1, "the left operand")?;
        let (b, k2, n) = Operand::of(s2, l2, "the right operand")?;
        if k != k2 {
            candle_core::bail!("matmul: ({m}, {k}) @ ({k2}, {n})");
        }
        let add = match add {
            Some((CpuStorage::F32(data), l)) if l.shape().elem_count() == m * n => Some(super::slice_of(data, l)?),
            Some((s, l)) => candle_core::bail!("matmul: added term {:?} {:?} for ({m}, {n})", s.dtype(), l.dims()),
            None => None,
        };
        let contiguous = |t: &Option<Tensor>| t.as_ref().map(|t| t.contiguous()).transpose();
        let (bias, residual) = (contiguous(&self.bias)?, contiguous(&self.residual)?);
        let guards = [&bias, &residual].map(|t| t.as_ref().map(|t| t.storage_and_layout()));
        let f32s = |at: usize, len: usize, what: &str| match &guards[at] {
            Some((guard, l)) => match &**guard {
                candle_core::Storage::Cpu(CpuStorage::F32(data)) if l.shape().elem_count() == len => {
                    super::slice_of(data, l).map(Some)
                }
                _ => candle_core::bail!("matmul: the {what} is not {len} f32 values on the CPU"),
            },
            None => Ok(None),
        };
        let epi = Epilogue {
            bias: f32s(0, n, "bias")?,
            add,
            gelu: self.gelu,
            scale: self.scale,
            residual: f32s(1, m * n, "residual")?,
        };
        let out = product(&a, &b, (m, k, n), &epi);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "tiled-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for Product {
    fn name(&self) -> &'static str {
        "tiled-matmul-bias"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rel_err;
    use candle_core::Device;

    #[test]
    fn tiles_give_candles_product() -> Result<()> {
        let dev = Device::Cpu;
        // tall, wide, tiny and strided operands; with and without bias. Positive values: the
        // two sum in different orders (small outputs are padded for gemm's general kernels),
        // and with mixed signs a 1 x 3 x 1 product can cancel to where any two orders differ
        // by more than 1e-6 relative (3 runs in 100 failed so)
        let operand = |shape: (usize, usize)| Tensor::rand(0.5f32, 1.5, shape, &dev);
        for (m, k, n) in [(288, 40, 96), (5, 7, 300), (1, 3, 1), (37, 64, 37)] {
            let x = operand((m, k))?;
            let w = operand((n, k))?;
            let b = Tensor::rand(0.5f32, 1.5, n, &dev)?;
            let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            assert!(rel_err(&linear(&x, &w, Some(&b))?, &want) < 1e-6, "{m}x{k}x{n}");
            assert!(rel_err(&linear(&x, &w, None)?, &x.matmul(&w.t()?)?) < 1e-6);
            assert!(rel_err(&matmul(&x, &w.t()?)?, &x.matmul(&w.t()?)?) < 1e-6);
            // a column block of a wider weight, as the ResBlocks keep theirs
            let wide = operand((n, k + 9))?;
            let block = wide.narrow(1, 4, k)?;
            let want = x.matmul(&block.contiguous()?.t()?)?;
            assert!(rel_err(&linear(&x, &block, None)?, &want) < 1e-6);
            // leading dimensions pass through
            let x3 = x.reshape((1, m, k))?;
            assert_eq!(linear(&x3, &w, None)?.dims(), &[1, m, n]);
        }
        Ok(())
    }

    #[test]
    fn the_epilogue_adds_applies_gelu_scales_then_adds_the_residual() -> Result<()> {
        let dev = Device::Cpu;
        // wide, tall, and tall enough for tiles of several row chunks (the last one partial)
        for (m, k, n) in [(40, 24, 300), (300, 24, 40), (2300, 8, 2048)] {
            let x = Tensor::randn(0f32, 1., (2, m / 2, k), &dev)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1., n, &dev)?;
            let add = Tensor::randn(0f32, 1., (2, m / 2, n), &dev)?;
            let plain = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
            let res = Tensor::randn(0f32, 1., (2, m / 2, n), &dev)?;
            for (bias, add, gelu, scale, residual) in [
                (Some(&b), Some(&add), true, None, None),
                (None, Some(&add), false, None, Some(&res)),
                (Some(&b), None, true, None, None),
                (Some(&b), None, false, None, Some(&res)),
                (Some(&b), None, true, Some(-0.37), Some(&res)),
                (None, Some(&add), false, Some(1.9), None),
            ] {
                let mut want = match bias {
                    Some(_) => plain.clone(),
                    None => x.broadcast_matmul(&w.t()?)?,
                };
                if let Some(add) = add {
                    want = (want + add)?;
                }
                if gelu {
                    want = want.gelu_erf()?;
                }
                if let Some(scale) = scale {
                    want = (want * scale)?;
                }
                if let Some(residual) = residual {
                    want = (residual + want)?;
                }
                let then = Then {
                    add,
                    gelu,
                    scale,
                    residual,
                };
                let got = linear_then(&x, &w, bias, then)?;
                assert_eq!(got.dims(), want.dims());
                if scale.is_some() || residual.is_some() {
                    // scaled and added last, as the separate ops would: the same bits
                    let mut separate = linear_then(
                        &x,
                        &w,
                        bias,
                        Then {
                            add,
                            gelu,
                            ..Default::default()
                        },
                    )?;
                    if let Some(scale) = scale {
                        separate = (separate * scale)?;
                    }
                    if let Some(residual) = residual {
                        separate = (residual + separate)?;
                    }
                    let separate = separate.flatten_all()?.to_vec1::<f32>()?;
                    assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, separate);
                }
                let err = rel_err(&got, &want);
                assert!(
                    err < 1e-6,
                    "{m}x{k}x{n} bias {} add {} gelu {gelu}: {err}",
                    bias.is_some(),
                    add.is_some()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn batched_products_give_candles() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (6, 37, 16), &dev)?;
        let b = Tensor::randn(0f32, 1., (6, 45, 16), &dev)?;
        // b transposed (a strided view), as attention multiplies q by k^T
        let want = a.matmul(&b.transpose(1, 2)?)?;
        assert!(rel_err(&matmul(&a, &b.transpose(1, 2)?)?, &want) < 1e-6);
        let scores = want.contiguous()?;
        assert!(rel_err(&matmul(&scores, &b)?, &scores.matmul(&b)?) < 1e-6);
        Ok(())
    }

    #[test]
    fn each_row_is_the_same_whatever_rows_are_beside_it() -> Result<()> {
        // a BLAS library's sums follow each call's shape (`WUERSTCHEN_BLAS`)
        if super::super::blas::requested().is_some() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        // outputs on both sides of each of gemm's paths: one row or column, up to 256
        // elements, up to 64 x 64, general; k short and long
        for (k, n) in [
            (64, 768),
            (64, 128),
            (7, 1),
            (16, 2),
            (300, 40),
            (64, 64),
            (64, 65),
            (1, 200),
        ] {
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1., n, &dev)?;
            let x = Tensor::randn(0f32, 1., (300, k), &dev)?;
            let add = Tensor::randn(0f32, 1., (300, n), &dev)?;
            let res = Tensor::randn(0f32, 1., (300, n), &dev)?;
            let rows = |m: usize| -> Result<Vec<Vec<f32>>> {
                let then = Then {
                    add: Some(&add.narrow(0, 0, m)?),
                    gelu: true,
                    scale: Some(0.7),
                    residual: Some(&res.narrow(0, 0, m)?),
                };
                let plain = linear(&x.narrow(0, 0, m)?, &w, None)?;
                let fused = three.install(|| linear_then(&x.narrow(0, 0, m)?, &w, Some(&b), then))?;
                // a strided left operand: the rows of a transposed copy, transposed back
                let strided = x.narrow(0, 0, m)?.t()?.contiguous()?.t()?;
                let by_view = linear(&strided, &w, None)?;
                assert!(
                    by_view.to_vec2::<f32>()? == plain.to_vec2::<f32>()?,
                    "{m}x{k}x{n}: a strided x"
                );
                Tensor::cat(&[plain, fused], 1)?.to_vec2::<f32>()
            };
            let all = rows(300)?;
            for m in [1, 2, 3, 5, 64, 65, 70, 130] {
                let got = rows(m)?;
                let differ = got.iter().zip(&all).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{m}x{k}x{n}: rows that differ from the same rows among 300");
            }
        }
        Ok(())
    }

    #[test]
    fn the_same_numbers_from_run_to_run_and_across_thread_counts() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (300, 640), &dev)?;
        let w = Tensor::randn(0f32, 1., (200, 640), &dev)?;
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = three.install(|| linear(&x, &w, None))?;
        let b = three.install(|| linear(&x, &w, None))?;
        assert_eq!(rel_err(&a, &b), 0.0);
        let c = one.install(|| linear(&x, &w, None))?;
        // a BLAS library's sums follow each call's shape (`WUERSTCHEN_BLAS`)
        let across_threads = if super::super::blas::requested().is_some() {
            1e-6
        } else {
            0.0
        };
        assert!(rel_err(&a, &c) <= across_threads);
        Ok(())
    }

    /// The column-major copy of a weight changes how gemm reads it, not the order of its sums:
    /// the same bits as the stored weight, at 1, 2 and 3 threads, for the products in
    /// [`COLUMN_MAJOR_ROWS`], shorter ones, taller ones in several row chunks, and a column
    /// block of a wider weight (as the ResBlocks keep theirs). The copy is made by the second
    /// product in that range, not by others.
    #[test]
    fn a_column_major_weight_gives_the_same_bits() -> Result<()> {
        if super::super::blas::requested().is_some() {
            return Ok(()); // a BLAS library's sums follow each call's layout
        }
        let dev = Device::Cpu;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        for (k, n, block) in [(96, 200, false), (700, 64, false), (8, 2048, false), (40, 130, true)] {
            let stored = if block {
                Tensor::randn(0f32, 1., (n, k + 13), &dev)?.narrow(1, 5, k)?
            } else {
                Tensor::randn(0f32, 1., (n, k), &dev)?
            };
            let bias = Tensor::randn(0f32, 1., n, &dev)?;
            let weight = LinearWeight::new(stored.clone());
            let inputs = [24, 150, 1100].map(|rows| Tensor::randn(0f32, 1., (3, rows, k), &dev));
            let [short, mid, tall] = inputs.map(|x| x.unwrap());
            let want: Vec<Vec<u32>> = [&short, &mid, &tall]
                .iter()
                .map(|x| bits(&linear(x, &stored, Some(&bias))?))
                .collect::<Result<_>>()?;
            for (x, what) in [
                (&short, "72 rows"),
                (&tall, "3300 rows"),
                (&short, "72 rows"),
                (&tall, "3300 rows"),
            ] {
                assert_eq!(weight.for_input(x)?.stride(), stored.stride(), "no copy for {what}");
            }
            assert_eq!(
                weight.for_input(&mid)?.stride(),
                stored.stride(),
                "no copy at first use"
            );
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| -> Result<()> {
                    for (x, want) in [&mid, &short, &tall].into_iter().zip([&want[1], &want[0], &want[2]]) {
                        let w = weight.for_input(x)?;
                        assert_eq!(w.dims(), &[n, k]);
                        assert_eq!(w.stride(), &[1, n], "the copy, in columns");
                        let got = bits(&linear(x, w, Some(&bias))?)?;
                        assert!(&got == want, "{k}x{n}, {:?}: {threads} threads", x.dims());
                    }
                    Ok(())
                })?;
            }
            // the stored weight reads the same after its pages were dropped
            assert!(bits(&linear(&short, &stored, Some(&bias))?)? == want[0]);
        }
        Ok(())
    }

    /// Splitting a product into one tile per thread must not move a tile onto another of
    /// gemm's paths: one row (the timestep mappers: gemm's matrix-vector product whole, its
    /// horizontal kernel in halves), a short wide output with k over 512 (general whole, k in
    /// blocks of 512 in 40 x 50 halves), tall tiles in chunks, a product too small to split,
    /// one whose halves take the short tiles' column-major path, and the prior's 72 rows.
    #[test]
    fn the_same_bits_whatever_the_thread_count() -> Result<()> {
        if super::super::blas::requested().is_some() {
            return Ok(()); // a BLAS library's sums follow each call's shape
        }
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 64, 512),
            (40, 600, 100),
            (129, 700, 64),
            (20000, 600, 70),
            (12, 900, 20),
            (200, 300, 150),
            (72, 1536, 3072),
        ] {
            let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
            // laid out as a linear layer's weight, (n, k)
            let b = Tensor::randn(0f32, 1., (n, k), &dev)?.t()?;
            let with = |threads: usize| -> Result<Vec<u32>> {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let c = pool.install(|| matmul(&a, &b))?.flatten_all()?.to_vec1::<f32>()?;
                Ok(c.iter().map(|v| v.to_bits()).collect())
            };
            let one = with(1)?;
            for threads in [2, 3, 16] {
                assert!(with(threads)? == one, "{m}x{k}x{n}: {threads} threads differ from 1");
            }
        }
        Ok(())
    }
}
