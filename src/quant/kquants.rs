//! ggml's K-quants: 256-element super-blocks made of 8 sub-blocks of 32 (Q4_K, Q5_K) or 16
//! sub-blocks of 16 (Q6_K), whose scales are themselves quantised against one f16 super-scale.
//!
//! These follow `quantize_row_q{4,5,6}_K_ref` and `dequantize_row_q{4,5,6}_K` in ggml's
//! `ggml-quants.c`. The scale search (`make_qkx2_quants`, `make_qx_quants`) tries many candidate
//! scales and keeps the best by a floating-point error measure, so a single differently-rounded
//! `f32` operation can pick another candidate and change whole sub-blocks. Hence the code keeps
//! C's exact operation order: `w*l*x` is `(w*l)*x`, sums run left to right, nothing is fused.

use super::{QK_K, read_f16, write_f16};

// block_q4_K: d:f16, dmin:f16, scales[12] (eight 6-bit scales + eight 6-bit mins), qs[128] = 144 bytes
pub(crate) const Q4_K_BYTES: usize = 4 + K_SCALE_SIZE + QK_K / 2;
// block_q5_K: d:f16, dmin:f16, scales[12], qh[32] (5th bits), qs[128] (low nibbles) = 176 bytes
pub(crate) const Q5_K_BYTES: usize = 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2;
// block_q6_K: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (i8), d:f16 = 210 bytes.
// Note d comes last.
pub(crate) const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
pub(crate) const Q6_K_D_OFFSET: usize = QK_K / 2 + QK_K / 4 + QK_K / 16;

/// Bytes of packed 6-bit scales and mins in Q4_K/Q5_K (ggml's `K_SCALE_SIZE`).
const K_SCALE_SIZE: usize = 12;

/// Below this, a group is treated as all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest (ties to even) by adding 1.5 * 2^23, which pushes
/// the fraction out of the mantissa, then reading the integer back from the mantissa bits.
/// Only meaningful for |fval| <= 2^22 - 1 (ggml asserts that in debug builds); outside that
/// range it returns the same garbage as ggml, which is what byte identity asks for.
#[inline]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `get_scale_min_k4`: unpacks the 6-bit scale and min of sub-block `j` (0..8) from the
/// 12 packed bytes. Sub-blocks 0..4 keep their 6 bits in the low bits of bytes j (scale) and
/// j+4 (min); sub-blocks 4..8 keep their low 4 bits in byte j+4 (scale low nibble, min high
/// nibble) and their top 2 bits in the spare top bits of bytes j-4 (scale) and j (min).
#[inline]
pub(crate) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let d = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d, m)
    }
}

/// The inverse of [`get_scale_min_k4`]: stores 6-bit `ls` and `lm` for sub-block `j`. Must be
/// called for j = 0..8 in order, since sub-blocks 4..8 OR their top bits into bytes written
/// for sub-blocks 0..4.
fn set_scale_min_k4(j: usize, ls: u8, lm: u8, q: &mut [u8]) {
    if j < 4 {
        q[j] = ls;
        q[j + 4] = lm;
    } else {
        q[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
        q[j - 4] |= (ls >> 4) << 6;
        q[j] |= (lm >> 4) << 6;
    }
}

/// ggml's `make_qkx2_quants` (with `use_mad = false`): finds a scale and a min for
/// `x ≈ scale * L - the_min`, L in 0..=nmax, minimising the weighted squared error. Starts
/// from the plain min/max fit, then tries `nstep + 1` stretched scales
/// (`(rmin + rdelta*is + nmax) / (max - min)`), refitting scale and min by weighted least
/// squares for each. Writes the chosen levels to `l`; returns `(scale, the_min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    // The min is subtracted, so it must not be positive (levels start at zero).
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` for `rmse_type = 1` and no importance weights (the only use in the
/// reference quantisers, always on 16 values): a symmetric scale for `x ≈ scale * (L - nmax)`,
/// L - nmax in -nmax..nmax, weighting each value by x². Tries 18 scales around
/// `nmax / max|x|` and keeps the best least-squares fit. Writes `L` (biased by `nmax`) and
/// returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32; 16], l: &mut [i8; 16]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        *l = [0; 16];
        return 0.0;
    }
    let level = |iscale: f32, xi: f32| nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
    let store = |iscale: f32, l: &mut [i8; 16]| {
        for (li, &xi) in l.iter_mut().zip(x) {
            *li = (level(iscale, xi) + nmax) as i8;
        }
    };
    // Weighted least squares with weight x²: (sum w*x*l, sum w*l*l).
    let fit = |iscale: f32| {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for &xi in x {
            let lf = level(iscale, xi) as f32;
            let w = xi * xi;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    store(iscale, l);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Shared by Q4_K and Q5_K: picks per-sub-block scales and mins with `make_qkx2_quants`,
/// quantises them to 6 bits against the super-block's `d` and `dmin`, writes those (bytes
/// 0..16 of the block) and returns the final levels, recomputed from the stored scales.
fn quantize_scales_mins_k(x: &[f32], y: &mut [u8], nmax: i32, rmin: f32, rdelta: f32, nstep: i32) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];

    // Scales are non-negative since the min is subtracted; so are the returned mins.
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * (j + 1)];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) =
            make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * (j + 1)], &mut laux, rmin, rdelta, nstep);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }

    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut y[4..4 + K_SCALE_SIZE];
    for j in 0..QK_K / 32 {
        // `uint8_t ls = nearest_int(...)`: C's conversion to uint8_t keeps the low byte.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        set_scale_min_k4(j, ls, lm, packed);
    }
    write_f16(y, 0, max_scale / 63.0);
    write_f16(y, 2, max_min / 63.0);

    // Requantise every value against the scale and min as they will be read back (f16 super
    // scales times 6-bit sub-scales). A sub-block whose scale came out zero keeps the levels
    // make_qkx2_quants chose.
    let d_all = read_f16(y, 0);
    let dmin_all = read_f16(y, 2);
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, &y[4..4 + K_SCALE_SIZE]);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

pub(crate) fn quantize_q4_k(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q4_K_BYTES)) {
        let l = quantize_scales_mins_k(x, y, 15, -1.0, 0.1, 20);
        // Each 64 values share 32 bytes: the first 32 in the low nibbles, the next 32 in the
        // high nibbles.
        let qs = &mut y[4 + K_SCALE_SIZE..];
        for (q, ls) in qs.chunks_exact_mut(32).zip(l.chunks_exact(64)) {
            for i in 0..32 {
                q[i] = ls[i] | (ls[i + 32] << 4);
            }
        }
    }
}

pub(crate) fn quantize_q5_k(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q5_K_BYTES)) {
        let l = quantize_scales_mins_k(x, y, 31, -0.5, 0.1, 15);
        // Low nibbles as in Q4_K; the fifth bits of each group of 64 take two bit planes of
        // qh: bit 2k for the first 32 values of group k, bit 2k+1 for the next 32.
        let (qh, qs) = y[4 + K_SCALE_SIZE..].split_at_mut(QK_K / 8);
        qh.fill(0);
        for (k, (q, ls)) in qs.chunks_exact_mut(32).zip(l.chunks_exact(64)).enumerate() {
            let m1 = 1u8 << (2 * k);
            let m2 = 2u8 << (2 * k);
            for i in 0..32 {
                let mut l1 = ls[i];
                if l1 > 15 {
                    l1 -= 16;
                    qh[i] |= m1;
                }
                let mut l2 = ls[i + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[i] |= m2;
                }
                q[i] = l1 | (l2 << 4);
            }
        }
    }
}

pub(crate) fn quantize_q6_k(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q6_K_BYTES)) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        let (x16, _) = x.as_chunks::<16>();
        let (l16, _) = l.as_chunks_mut::<16>();
        for ((xs, ls), s) in x16.iter().zip(l16.iter_mut()).zip(scales.iter_mut()) {
            let scale = make_qx_quants_rmse1(32, xs, ls);
            *s = scale;
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }

        if max_abs_scale < GROUP_MAX_EPS {
            // All (near) zero: ggml writes an all-zero block.
            y.fill(0);
            write_f16(y, Q6_K_D_OFFSET, 0.0);
            continue;
        }

        // The sub-block scale with the largest magnitude maps to -128 (as in Q4_0, the one end
        // of the i8 range that can always be used).
        let iscale = -128.0f32 / max_scale;
        write_f16(y, Q6_K_D_OFFSET, 1.0 / iscale);
        let scales_off = QK_K / 2 + QK_K / 4;
        for ib in 0..QK_K / 16 {
            y[scales_off + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }

        let d_all = read_f16(y, Q6_K_D_OFFSET);
        for j in 0..QK_K / 16 {
            let d = d_all * f32::from(y[scales_off + j] as i8);
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let li = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (li + 32) as i8;
            }
        }

        // Each 128 values take 64 bytes of ql and 32 of qh. Value l of quarter k (l in 0..32,
        // k in 0..4) keeps its low nibble in ql[l + 32*(k&1)] (low nibble for k < 2, high for
        // k >= 2) and its top two bits in qh[l] at bit 2k.
        let (ql_all, rest) = y.split_at_mut(QK_K / 2);
        let qh_all = &mut rest[..QK_K / 4];
        for ((ql, qh), ls) in ql_all.chunks_exact_mut(64).zip(qh_all.chunks_exact_mut(32)).zip(l.chunks_exact(128)) {
            for i in 0..32 {
                let [l1, l2, l3, l4] = [ls[i], ls[i + 32], ls[i + 64], ls[i + 96]].map(|v| v as u8);
                ql[i] = (l1 & 0x0f) | ((l3 & 0x0f) << 4);
                ql[i + 32] = (l2 & 0x0f) | ((l4 & 0x0f) << 4);
                qh[i] = (l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6);
            }
        }
    }
}

pub(crate) fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q4_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(x, 0);
        let min = read_f16(x, 2);
        let packed = &x[4..4 + K_SCALE_SIZE];
        let qs = &x[4 + K_SCALE_SIZE..];
        for (k, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = get_scale_min_k4(2 * k, packed);
            let (sc2, m2) = get_scale_min_k4(2 * k + 1, packed);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            for i in 0..32 {
                out[i] = d1 * f32::from(q[i] & 0x0f) - m1;
                out[i + 32] = d2 * f32::from(q[i] >> 4) - m2;
            }
        }
    }
}

pub(crate) fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q5_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(x, 0);
        let min = read_f16(x, 2);
        let packed = &x[4..4 + K_SCALE_SIZE];
        let qh = &x[4 + K_SCALE_SIZE..4 + K_SCALE_SIZE + QK_K / 8];
        let qs = &x[4 + K_SCALE_SIZE + QK_K / 8..];
        for (k, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = get_scale_min_k4(2 * k, packed);
            let (sc2, m2) = get_scale_min_k4(2 * k + 1, packed);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
            for i in 0..32 {
                let hi1 = if qh[i] & u1 != 0 { 16 } else { 0 };
                let hi2 = if qh[i] & u2 != 0 { 16 } else { 0 };
                out[i] = d1 * f32::from((q[i] & 0x0f) + hi1) - m1;
                out[i + 32] = d2 * f32::from((q[i] >> 4) + hi2) - m2;
            }
        }
    }
}

pub(crate) fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q6_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(x, Q6_K_D_OFFSET);
        let ql_all = &x[..QK_K / 2];
        let qh_all = &x[QK_K / 2..QK_K / 2 + QK_K / 4];
        let sc_all = &x[QK_K / 2 + QK_K / 4..Q6_K_D_OFFSET];
        for (h, out) in y.chunks_exact_mut(128).enumerate() {
            let ql = &ql_all[64 * h..64 * (h + 1)];
            let qh = &qh_all[32 * h..32 * (h + 1)];
            let sc = &sc_all[8 * h..8 * (h + 1)];
            for i in 0..32 {
                let is = i / 16;
                let q1 = i32::from((ql[i] & 0x0f) | (qh[i] & 3) << 4) - 32;
                let q2 = i32::from((ql[i + 32] & 0x0f) | ((qh[i] >> 2) & 3) << 4) - 32;
                let q3 = i32::from((ql[i] >> 4) | ((qh[i] >> 4) & 3) << 4) - 32;
                let q4 = i32::from((ql[i + 32] >> 4) | ((qh[i] >> 6) & 3) << 4) - 32;
                // (d * scale) * q, in that order, as ggml computes it.
                out[i] = d * f32::from(sc[is] as i8) * q1 as f32;
                out[i + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
                out[i + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
                out[i + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
            }
        }
    }
}
