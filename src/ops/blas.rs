//! A system CBLAS library, loaded at run time when asked for, for the CPU's f32 matrix
//! products.
//!
//! On an AMD EPYC (Zen 4) with two cores, OpenBLAS's `sgemm` (its AVX-512 kernels) ran the
//! published prior's 1728-row products at 95-100 GFLOP/s on one thread in an hour when the
//! `gemm` crate's kernel ran them at 72-75, and as fast as gemm's when that ran at its best;
//! see docs/PERFORMANCE.md. It is loaded, not linked, so that building needs no BLAS. Each call
//! is one tile on one thread (the tiling of [`super::matmul`] stays ours), so the library is
//! told to use one thread.
//!
//! Opt-in (`WUERSTCHEN_BLAS=libopenblas.so.0`, or another CBLAS library with 32-bit integers
//! by name or path; unset or `off`: gemm): OpenBLAS's kernels sum in an order that depends on
//! the shape of each call, and the tiles' shapes depend on the number of threads, so its
//! images can differ by a unit in a few values between thread counts, where gemm's are the
//! same bytes.

use std::ffi::c_int;
use std::sync::OnceLock;

use super::matmul::Operand;

/// `cblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

// CBLAS's enum values.
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The environment variable that picks the library.
pub const ENV: &str = "WUERSTCHEN_BLAS";

/// A loaded CBLAS library's `sgemm`.
pub struct Blas {
    sgemm: Sgemm,
    /// what was loaded, for logs and `bench`
    pub name: String,
    /// keeps the library mapped for as long as `sgemm` may be called
    _lib: libloading::Library,
}

impl Blas {
    /// Loads `name` (a file name the dynamic loader looks up, or a path) and makes it run each
    /// call on the calling thread.
    pub fn open(name: &str) -> Result<Self, String> {
        // SAFETY: loading runs the library's initialisers; a CBLAS library's only set up its
        // own state. The symbols are used with their C signatures.
        unsafe {
            let lib = libloading::Library::new(name).map_err(|e| e.to_string())?;
            let sgemm = *lib.get::<Sgemm>("cblas_sgemm").map_err(|e| e.to_string())?;
            // The thread-count setters of OpenBLAS, BLIS and MKL, whichever the library has.
            if let Ok(set) = lib.get::<unsafe extern "C" fn(c_int)>("openblas_set_num_threads") {
                set(1);
            } else if let Ok(set) = lib.get::<unsafe extern "C" fn(i64)>("bli_thread_set_num_threads") {
                set(1);
            } else if let Ok(set) = lib.get::<unsafe extern "C" fn(c_int) -> c_int>("MKL_Set_Num_Threads_Local") {
                set(1);
            }
            Ok(Self {
                sgemm,
                name: name.to_string(),
                _lib: lib,
            })
        }
    }

    /// `dst (m, n) (+)= a @ b` as one `cblas_sgemm` call, `dst` at row and column strides
    /// `(dst_rs, dst_cs)`; false (nothing done) where CBLAS cannot express the layouts (no
    /// unit stride) or a size does not fit its integers.
    ///
    /// # Safety
    /// As [`super::matmul::gemm_tile`]'s.
    pub(super) unsafe fn gemm(
        &self,
        dst: *mut f32,
        (dst_rs, dst_cs): (usize, usize),
        read_dst: bool,
        a: &Operand,
        b: &Operand,
        (m, k, n): (usize, usize, usize),
    ) -> bool {
        if m == 0 || n == 0 || k == 0 {
            return false;
        }
        // CBLAS writes row-major here: a column-major `dst` is the transposed product
        // `dst^T = b^T a^T`, which swaps the operands and their strides.
        let (a, b, m, n, ldc) = if dst_cs == 1 {
            (*a, *b, m, n, dst_rs)
        } else if dst_rs == 1 {
            (b.transposed(), a.transposed(), n, m, dst_cs)
        } else {
            return false;
        };
        let (Some((ta, lda)), Some((tb, ldb))) = (layout(a.rs, a.cs, m, k), layout(b.rs, b.cs, k, n)) else {
            return false;
        };
        if m > 1 && ldc < n {
            return false;
        }
        let ldc = ldc.max(n).max(1);
        let int = |v: usize| c_int::try_from(v).ok();
        let (Some(mi), Some(ni), Some(ki), Some(lda), Some(ldb), Some(ldc)) =
            (int(m), int(n), int(k), int(lda), int(ldb), int(ldc))
        else {
            return false;
        };
        let beta = if read_dst { 1.0 } else { 0.0 };
        (self.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            mi,
            ni,
            ki,
            1.0,
            a.data.as_ptr(),
            lda,
            b.data.as_ptr(),
            ldb,
            beta,
            dst,
            ldc,
        );
        true
    }
}

/// How row-major CBLAS reads an (r, c) operand at strides (rs, cs): as it lies (`NO_TRANS`,
/// leading dimension rs) when its columns are contiguous, as the transpose of a row-major
/// (c, r) matrix (`TRANS`, leading dimension cs) when its rows are; `None` otherwise (also for
/// a broadcast, whose rows overlap). With one row (or column) the leading dimension reads
/// nothing, and any value CBLAS accepts will do.
fn layout(rs: usize, cs: usize, r: usize, c: usize) -> Option<(c_int, usize)> {
    if (c <= 1 || cs == 1) && (r <= 1 || rs >= c.max(1)) {
        Some((NO_TRANS, if r <= 1 { c.max(1) } else { rs }))
    } else if (r <= 1 || rs == 1) && (c <= 1 || cs >= r.max(1)) {
        Some((TRANS, if c <= 1 { r.max(1) } else { cs }))
    } else {
        None
    }
}

/// The library [`ENV`] asks for, if any (unset, empty and `off` ask for none).
pub fn requested() -> Option<String> {
    std::env::var(ENV).ok().filter(|v| !v.is_empty() && v != "off")
}

/// The library [`ENV`] names, loaded once per process; `None`: the `gemm` crate's kernel.
pub fn get() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let name = requested()?;
        match Blas::open(&name) {
            Ok(blas) => {
                tracing::debug!("f32 matrix products on the CPU through {name}");
                Some(blas)
            }
            Err(e) => {
                tracing::warn!("{ENV}={name}: cannot load it ({e}); matrix products use the gemm crate");
                None
            }
        }
    })
    .as_ref()
}

/// What runs the CPU's f32 matrix products: the loaded library's name, or `gemm`.
pub fn kernel_name() -> String {
    get().map_or_else(|| "gemm".to_string(), |b| b.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop over strided operands, in f64.
    fn reference(a: &Operand, b: &Operand, (m, k, n): (usize, usize, usize)) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn layouts_cblas_can_and_cannot_read() {
        assert_eq!(layout(8, 1, 4, 5), Some((NO_TRANS, 8)));
        assert_eq!(layout(1, 8, 4, 5), Some((TRANS, 8)));
        // one row or one column: any stride of the other kind
        assert_eq!(layout(0, 1, 1, 5), Some((NO_TRANS, 5)));
        assert_eq!(layout(3, 7, 4, 1), Some((NO_TRANS, 3)));
        assert_eq!(layout(2, 3, 4, 5), None);
        // a broadcast row (stride 0) is not a matrix CBLAS can read
        assert_eq!(layout(0, 1, 4, 5), None);
    }

    /// Every layout the tiles use against a reference, where the system has OpenBLAS (CI
    /// installs it where it can).
    #[test]
    fn openblas_computes_every_tile_layout() {
        let name = if cfg!(target_os = "macos") {
            "libopenblas.dylib"
        } else {
            "libopenblas.so.0"
        };
        let blas = match Blas::open(name) {
            Ok(blas) => blas,
            Err(e) => {
                eprintln!("no {name} here ({e}); the gemm crate's kernel runs instead");
                return;
            }
        };
        let (m, k, n) = (37, 45, 29);
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (av, bv) = (vals(m * k * 2, 1), vals(k * n * 2, 2));
        // a row-major, column-major, and with a row stride wider than its columns
        let a_layouts = [(k, 1), (1, m), (2 * k, 1)];
        let b_layouts = [(n, 1), (1, k), (1, 2 * k)];
        for &(ars, acs) in &a_layouts {
            for &(brs, bcs) in &b_layouts {
                let a = Operand {
                    data: &av,
                    rs: ars,
                    cs: acs,
                };
                let b = Operand {
                    data: &bv,
                    rs: brs,
                    cs: bcs,
                };
                let want = reference(&a, &b, (m, k, n));
                for (dst_rs, dst_cs) in [(n, 1), (1, m)] {
                    for read_dst in [false, true] {
                        let start = if read_dst { 0.5f32 } else { f32::NAN };
                        let mut dst = vec![start; m * n];
                        // SAFETY: dst holds m * n elements at these strides; the operands cover theirs.
                        let done =
                            unsafe { blas.gemm(dst.as_mut_ptr(), (dst_rs, dst_cs), read_dst, &a, &b, (m, k, n)) };
                        assert!(done);
                        for i in 0..m {
                            for j in 0..n {
                                let got = dst[i * dst_rs + j * dst_cs] as f64;
                                let want = want[i * n + j] + if read_dst { 0.5 } else { 0.0 };
                                assert!(
                                    (got - want).abs() < 1e-4,
                                    "a {:?} b {:?} dst {:?} read {read_dst}: {got} vs {want}",
                                    (ars, acs),
                                    (brs, bcs),
                                    (dst_rs, dst_cs)
                                );
                            }
                        }
                    }
                }
            }
        }
        // neither stride 1: not expressible, nothing written
        let a = Operand {
            data: &av,
            rs: 2,
            cs: 3,
        };
        let b = Operand {
            data: &bv,
            rs: n,
            cs: 1,
        };
        let mut dst = vec![0f32; m * n];
        // SAFETY: as above (the call declines before reading).
        assert!(!unsafe { blas.gemm(dst.as_mut_ptr(), (n, 1), false, &a, &b, (m, k, n)) });
    }
}
