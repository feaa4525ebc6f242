//! A small single-threaded f32 matrix product for the CPU attention kernel
//! ([`super::cpu_attention`]): `C (+)= A·B` with `B` and `C` row-major and `A` at any strides,
//! computed in register tiles of 6 rows × 16 columns (AVX2 + FMA, chosen at run time; plain
//! loops elsewhere), the tile shape of BLIS's and the `gemm` crate's Haswell kernels (Van Zee &
//! van de Geijn 2015, "BLIS: A Framework for Rapidly Instantiating BLAS Functionality").
//!
//! It allocates nothing, so the attention kernel can run it on every thread of candle's pool
//! without making the measured peaks depend on how the threads interleave (the `gemm` crate
//! allocates packing buffers on each call).

/// A row-major matrix view: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `C[m×n] = A[m×k]·B[k×n]`, or `C += A·B` with `accumulate`. `B` and `C` have unit column
/// stride (`b.cs == 1`, rows `ldc` apart in `c`).
///
/// # Panics
/// If a view is too short for its shape (a bug in the caller).
#[allow(clippy::too_many_arguments)] // GEMM's shape, operands and destination, as in BLAS
pub(super) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert_eq!(b.cs, 1, "matmul: B must have unit column stride");
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand is read or written at, without overflow.
    let end = |rows: usize, rs: usize, cols: usize, cs: usize| -> Option<usize> {
        (rows - 1)
            .checked_mul(rs)?
            .checked_add((cols - 1).checked_mul(cs)?)
    };
    assert!(
        end(m, ldc, n, 1).is_some_and(|e| e < c.len()),
        "matmul: C too short"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        end(m, a.rs, k, a.cs).is_some_and(|e| e < a.data.len()),
        "matmul: A too short"
    );
    assert!(
        end(k, b.rs, n, 1).is_some_and(|e| e < b.data.len()),
        "matmul: B too short"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the bounds were checked above.
        unsafe { x86::matmul(m, n, k, a, b, c, ldc, accumulate) };
        return;
    }
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if !accumulate {
            row.fill(0.0);
        }
        for p in 0..k {
            let x = a.data[i * a.rs + p * a.cs];
            let br = &b.data[p * b.rs..p * b.rs + n];
            for (c, b) in row.iter_mut().zip(br) {
                *c += x * b;
            }
        }
    }
}

/// Whether this CPU runs the AVX2 + FMA tiles (checked once).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::View;
    use std::arch::x86_64::*;

    /// Rows per register tile.
    const MR: usize = 6;
    /// Columns per register tile (two 8-lane vectors).
    const NR: usize = 16;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul(
        m: usize,
        n: usize,
        k: usize,
        a: View<'_>,
        b: View<'_>,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), c.as_mut_ptr());
        let mut j = 0;
        while j < n {
            let w = (n - j).min(NR);
            let mut i = 0;
            while i < m {
                let h = (m - i).min(MR);
                let at = ap.add(i * a.rs);
                let bt = bp.add(j);
                let ct = cp.add(i * ldc + j);
                if w == NR {
                    match h {
                        6 => tile::<6>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                        5 => tile::<5>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                        4 => tile::<4>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                        3 => tile::<3>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                        2 => tile::<2>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                        _ => tile::<1>(k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc),
                    }
                } else {
                    edge(h, w, k, at, a.rs, a.cs, bt, b.rs, ct, ldc, acc);
                }
                i += h;
            }
            j += w;
        }
    }

    /// A full-width tile of `H` rows: `2·H` accumulators held in registers over `k`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile<const H: usize>(
        k: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        brs: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        let mut r = [[_mm256_setzero_ps(); 2]; H];
        if acc {
            for (i, r) in r.iter_mut().enumerate() {
                r[0] = _mm256_loadu_ps(c.add(i * ldc));
                r[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
            }
        }
        for p in 0..k {
            let b0 = _mm256_loadu_ps(b.add(p * brs));
            let b1 = _mm256_loadu_ps(b.add(p * brs + 8));
            for (i, r) in r.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(i * ars + p * acs));
                r[0] = _mm256_fmadd_ps(x, b0, r[0]);
                r[1] = _mm256_fmadd_ps(x, b1, r[1]);
            }
        }
        for (i, r) in r.iter().enumerate() {
            _mm256_storeu_ps(c.add(i * ldc), r[0]);
            _mm256_storeu_ps(c.add(i * ldc + 8), r[1]);
        }
    }

    /// A tile narrower than 16 columns: plain loops (vectorized by the compiler where it can).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn edge(
        h: usize,
        w: usize,
        k: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        brs: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        for i in 0..h {
            let mut r = [0f32; NR];
            if acc {
                for (jj, r) in r.iter_mut().enumerate().take(w) {
                    *r = *c.add(i * ldc + jj);
                }
            }
            for p in 0..k {
                let x = *a.add(i * ars + p * acs);
                for (jj, r) in r.iter_mut().enumerate().take(w) {
                    *r = x.mul_add(*b.add(p * brs + jj), *r);
                }
            }
            for (jj, r) in r.iter().enumerate().take(w) {
                *c.add(i * ldc + jj) = *r;
            }
        }
    }
}
