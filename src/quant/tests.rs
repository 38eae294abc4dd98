//! Tests of the quantisation module. Byte identity with ggml itself is checked outside cargo
//! (tests/interop/quant_reference.py runs ggml's C code); here: the format tables, error
//! bounds derived from each format, special inputs, refusals, and hand-computed bytes.

use super::*;

/// xorshift64*: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn gauss_vec(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.gauss() * sigma).collect()
    }
}

const QUANTIZED: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Largest error of rounding a positive `x` to f16: half an ulp (2^-11 relative) in the
/// normal range, half the smallest subnormal (2^-25) below it.
fn f16_err(x: f32) -> f32 {
    (x.abs() * (2.0f32).powi(-11)).max((2.0f32).powi(-25))
}

/// Checks every dequantised value of `x` (one row, whole blocks) against a bound that follows
/// from the format. Returns the largest error seen relative to the bound (≤ 1).
fn check_bounds(ty: GgmlType, x: &[f32], bytes: &[u8], deq: &[f32]) -> f32 {
    assert_eq!(x.len(), deq.len());
    let eps = f32::EPSILON;
    let mut worst = 0.0f32;
    let mut check = |i: usize, bound: f32, what: &str| {
        let err = (x[i] - deq[i]).abs();
        assert!(
            err <= bound,
            "{ty}: value {i} = {} came back as {} (error {err} > bound {bound}: {what})",
            x[i],
            deq[i]
        );
        if bound > 0.0 {
            worst = worst.max(err / bound);
        }
    };
    match ty {
        GgmlType::F32 => (0..x.len()).for_each(|i| check(i, 0.0, "F32 is exact")),
        // Half an ulp: 2^-11 relative (2^-25 absolute for subnormals).
        GgmlType::F16 => (0..x.len()).for_each(|i| check(i, f16_err(x[i]), "f16 rounding")),
        // Half an ulp: 2^-8 relative.
        GgmlType::BF16 => (0..x.len()).for_each(|i| check(i, x[i].abs() * (2.0f32).powi(-8) + 1e-45, "bf16 rounding")),
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => {
            // Symmetric: d = amax / qmax. Rounding to the grid costs d/2, except that Q4_0 and
            // Q5_0 clamp +8 (+16) to 7 (15), a full step; then d is rounded to f16, which moves
            // a level q by |q| * f16_err(d). The last term covers f32 rounding of x * (1/d).
            let (qmax, step_loss) = match ty {
                GgmlType::Q8_0 => (127.0, 0.5),
                GgmlType::Q4_0 => (8.0, 1.0),
                _ => (16.0, 1.0),
            };
            for (b, xb) in x.chunks(32).enumerate() {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / qmax;
                let bound = step_loss * d + qmax * f16_err(d) + 8.0 * eps * amax;
                (0..32).for_each(|i| check(32 * b + i, bound, "symmetric block"));
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            // Asymmetric: d = (max - min) / qmax, q = nearest level above min (d/2), then d and
            // min are rounded to f16.
            let qmax = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            for (b, xb) in x.chunks(32).enumerate() {
                let min = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = xb.iter().fold(-f32::MAX, |m, &v| m.max(v));
                let d = (max - min) / qmax;
                let bound = 0.5 * d + qmax * f16_err(d) + f16_err(min) + 8.0 * eps * (max.abs() + min.abs());
                (0..32).for_each(|i| check(32 * b + i, bound, "asymmetric block"));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            // The sub-block scales are searched, so there is no closed-form bound in terms of x;
            // but the last pass puts each value on the nearest level of the grid the stored
            // bytes describe. So: error ≤ half a step inside the grid's range, plus the distance
            // to the range outside it.
            let block_bytes = ty.type_size();
            for (b, (xb, yb)) in x.chunks(256).zip(bytes.chunks(block_bytes)).enumerate() {
                for (i, &v) in xb.iter().enumerate() {
                    let (step, lo, hi) = k_grid(ty, yb, i);
                    let outside = (lo - v).max(v - hi).max(0.0);
                    let bound = 0.5 * step + outside + 8.0 * eps * (v.abs() + lo.abs() + hi.abs());
                    check(256 * b + i, bound, "nearest level of the stored grid");
                }
            }
        }
    }
    worst
}

/// The grid that value `i` of a K-quant block can take: (step, lowest level, highest level).
fn k_grid(ty: GgmlType, y: &[u8], i: usize) -> (f32, f32, f32) {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (sc, m) = kquants::get_scale_min_k4(i / 32, &y[4..16]);
            let d = read_f16(y, 0) * f32::from(sc);
            let dm = read_f16(y, 2) * f32::from(m);
            let top = if ty == GgmlType::Q4_K { 15.0 } else { 31.0 };
            (d, -dm, d * top - dm)
        }
        _ => {
            let sc = y[192 + i / 16] as i8;
            let d = read_f16(y, 208) * f32::from(sc);
            let (a, b) = (d * -32.0, d * 31.0);
            (d.abs(), a.min(b), a.max(b))
        }
    }
}

fn round_trip(ty: GgmlType, x: &[f32], n_per_row: usize) -> (Vec<u8>, Vec<f32>) {
    let bytes = quantize(ty, x, n_per_row).unwrap_or_else(|e| panic!("{ty}: {e}"));
    assert_eq!(bytes.len(), x.len() / n_per_row * ty.row_bytes(n_per_row));
    let deq = dequantize(ty, &bytes, x.len()).unwrap_or_else(|e| panic!("{ty}: {e}"));
    (bytes, deq)
}

fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x.iter().zip(y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let den: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    (num / den).sqrt()
}

// ---- tables -------------------------------------------------------------------------------

#[test]
fn type_table_matches_ggml() {
    // (type, ggml id, block size, sizeof(block)) from ggml.h / ggml-common.h.
    let table = [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::BF16, 30, 1, 2),
    ];
    assert_eq!(table.len(), GgmlType::ALL.len());
    for (ty, id, block, size) in table {
        assert_eq!(ty.id(), id, "{ty}");
        assert_eq!(ty.block_size(), block, "{ty}");
        assert_eq!(ty.type_size(), size, "{ty}");
        assert_eq!(ty.row_bytes(block * 3), size * 3, "{ty}");
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
    assert_eq!(kquants::Q6_K_D_OFFSET, 208);
    for id in [4, 5, 9, 10, 11, 15, 16, 31, 1000] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}

#[test]
fn names_parse_case_insensitively() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::parse(ty.name()), Some(ty));
        assert_eq!(GgmlType::parse(&ty.name().to_lowercase()), Some(ty));
        assert_eq!(ty.to_string(), ty.name());
    }
    assert_eq!(GgmlType::parse("q4_k"), Some(GgmlType::Q4_K));
    assert_eq!(GgmlType::parse(" Bf16 "), Some(GgmlType::BF16));
    assert_eq!(GgmlType::Q6_K.name(), "Q6_K");
    for bad in ["", "q4", "q4_k_m", "f64", "q3_k"] {
        assert_eq!(GgmlType::parse(bad), None, "{bad:?}");
    }
}

// ---- round trips --------------------------------------------------------------------------

#[test]
fn random_rows_round_trip_within_format_bounds() {
    let mut rng = Rng::new(1);
    for ty in GgmlType::ALL {
        let mut lengths = vec![256, 512, 1024];
        if ty.block_size() <= 32 {
            lengths.extend([32, 96, 160]);
        }
        if ty.block_size() == 1 {
            lengths.extend([1, 7]);
        }
        for n in lengths {
            let rows = 3;
            let sigma = [0.02f32, 1.0, 30.0][n % 3];
            let x = rng.gauss_vec(rows * n, sigma);
            let (bytes, deq) = round_trip(ty, &x, n);
            let row_bytes = ty.row_bytes(n);
            for r in 0..rows {
                check_bounds(
                    ty,
                    &x[r * n..(r + 1) * n],
                    &bytes[r * row_bytes..(r + 1) * row_bytes],
                    &deq[r * n..(r + 1) * n],
                );
            }
        }
    }
}

#[test]
fn gaussian_quality_is_as_expected() {
    // Relative RMS error on N(0,1) weights, rows of 1024. The limits sit about 10% above what
    // the formats give here (measured: Q4_0 0.086, Q4_1 0.079, Q5_0 0.043, Q5_1 0.038,
    // Q8_0 0.0054, Q4_K 0.072, Q5_K 0.036, Q6_K 0.018, F16 0.00021, BF16 0.0017; for Q8_0
    // theory says d/sqrt(12) with d = amax/127, amax ≈ 2.3 over 32 normals: 0.0052). A layout
    // or scale mistake gives errors near 1.
    let mut rng = Rng::new(2);
    let x = rng.gauss_vec(16 * 1024, 1.0);
    let limits = [
        (GgmlType::Q4_0, 0.095),
        (GgmlType::Q4_1, 0.087),
        (GgmlType::Q5_0, 0.048),
        (GgmlType::Q5_1, 0.042),
        (GgmlType::Q8_0, 0.006),
        (GgmlType::Q4_K, 0.080),
        (GgmlType::Q5_K, 0.040),
        (GgmlType::Q6_K, 0.020),
        (GgmlType::F16, 0.00024),
        (GgmlType::BF16, 0.0019),
        (GgmlType::F32, 0.0),
    ];
    for (ty, limit) in limits {
        let (_, deq) = round_trip(ty, &x, 1024);
        let e = rel_rmse(&x, &deq);
        assert!(e <= limit, "{ty}: relative RMS error {e:.5} above {limit}");
    }
    // More bits, less error.
    let err = |ty| rel_rmse(&x, &round_trip(ty, &x, 1024).1);
    assert!(err(GgmlType::Q6_K) < err(GgmlType::Q5_K));
    assert!(err(GgmlType::Q5_K) < err(GgmlType::Q4_K));
    assert!(err(GgmlType::Q4_K) < err(GgmlType::Q4_0));
}

#[test]
fn rows_are_independent_of_parallel_split() {
    // Quantising many rows at once equals quantising each row alone.
    let mut rng = Rng::new(3);
    let (rows, n) = (37, 512);
    let x = rng.gauss_vec(rows * n, 1.0);
    for ty in GgmlType::ALL {
        let all = quantize(ty, &x, n).expect("quantize");
        let one_by_one: Vec<u8> = x.chunks(n).flat_map(|row| quantize(ty, row, n).expect("row")).collect();
        assert_eq!(all, one_by_one, "{ty}");
        // Rows are concatenated blocks too: one long row gives the same bytes.
        assert_eq!(quantize(ty, &x, rows * n).expect("long row"), all, "{ty}");
    }
}

#[test]
fn partial_blocks_are_refused() {
    let x = vec![0.5f32; 300];
    for ty in QUANTIZED {
        for n in [100, 33, 255, 300] {
            if n % ty.block_size() == 0 {
                continue;
            }
            let err = quantize(ty, &x[..n], n).expect_err("partial block");
            assert!(matches!(err, QuantError::BadRowLength { n: m, .. } if m == n), "{ty} {n}: {err:?}");
            let err = dequantize(ty, &[0u8; 400], n).expect_err("partial block");
            assert!(matches!(err, QuantError::BadRowLength { .. }), "{ty} {n}: {err:?}");
        }
    }
    let err = quantize(GgmlType::Q4_K, &x[..100], 100).expect_err("partial");
    assert_eq!(err.to_string(), "row of 100 values is not a multiple of the Q4_K block size 256");
    let err = quantize(GgmlType::Q8_0, &x[..250], 50).expect_err("partial");
    assert_eq!(err.to_string(), "row of 50 values is not a multiple of the Q8_0 block size 32");

    // Data that is not a whole number of rows, and empty rows.
    let err = quantize(GgmlType::Q8_0, &x[..96], 64).expect_err("ragged");
    assert!(matches!(err, QuantError::BadDataLength { len: 96, n_per_row: 64 }), "{err:?}");
    assert!(matches!(quantize(GgmlType::F16, &x, 0), Err(QuantError::BadDataLength { .. })));
    // No rows at all is fine.
    assert_eq!(quantize(GgmlType::Q4_K, &[], 256).expect("empty"), Vec::<u8>::new());
}

#[test]
fn dequantize_checks_byte_length() {
    let err = dequantize(GgmlType::Q4_K, &[0u8; 143], 256).expect_err("short");
    assert!(matches!(err, QuantError::BadLength { expected: 144, got: 143, n: 256, .. }), "{err:?}");
    assert_eq!(err.to_string(), "Q4_K data for 256 values must be 144 bytes long, but 143 bytes were given");
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 35], 32).is_err());
    assert!(dequantize(GgmlType::F32, &[0u8; 12], 4).is_err());
    assert_eq!(dequantize(GgmlType::Q6_K, &[], 0).expect("empty"), Vec::<f32>::new());
}

// ---- special inputs -----------------------------------------------------------------------

#[test]
fn all_zero_rows_give_exact_zeros() {
    let x = vec![0.0f32; 512];
    for ty in GgmlType::ALL {
        let (bytes, deq) = round_trip(ty, &x, 512);
        assert!(deq.iter().all(|&v| v == 0.0), "{ty}: {:?}", &deq[..8]);
        // Every format but Q4_0/Q5_0 (whose zero level is 8 / 16: nibble 8, or nibble 0 with the
        // fifth bit set) stores zeros as zero bytes.
        match ty {
            // d = 0 / -8 is -0.0 (f16 0x8000), as in ggml.
            GgmlType::Q4_0 => {
                assert!(bytes.chunks(18).all(|b| b[..2] == [0, 0x80] && b[2..].iter().all(|&q| q == 0x88)))
            }
            GgmlType::Q5_0 => {
                assert!(
                    bytes
                        .chunks(22)
                        .all(|b| b[..6] == [0, 0x80, 0xFF, 0xFF, 0xFF, 0xFF] && b[6..].iter().all(|&q| q == 0))
                )
            }
            _ => assert!(bytes.iter().all(|&b| b == 0), "{ty}"),
        }
    }
}

#[test]
fn all_equal_rows() {
    for value in [0.7f32, -3.25, 0.05, 1000.0] {
        let x = vec![value; 512];
        for ty in GgmlType::ALL {
            let (bytes, deq) = round_trip(ty, &x, 512);
            check_bounds(ty, &x, &bytes, &deq);
            // Constant blocks come back constant and close: the value is a grid end in every
            // format (within f16 rounding of the scale, times the level count for K-quants'
            // 6-bit scale steps).
            assert!(deq.iter().all(|&v| v == deq[0]), "{ty} {value}: not constant");
            let rel = ((deq[0] - value) / value).abs();
            assert!(rel < 0.01, "{ty} {value}: came back as {}", deq[0]);
        }
    }
    // Q4_1/Q5_1 store a constant block as d = 0 and min = the value: exactly f16(value).
    let (_, deq) = round_trip(GgmlType::Q4_1, &[0.7f32; 32], 32);
    assert!(deq.iter().all(|&v| v == f16_bits_to_f32(f32_to_f16_bits(0.7))));
}

#[test]
fn huge_outlier_among_gaussians() {
    let mut rng = Rng::new(4);
    let n = 1024;
    let mut x = rng.gauss_vec(2 * n, 1.0);
    x[300] = 1e4;
    x[n + 777] = -1e4;
    for ty in GgmlType::ALL {
        let (bytes, deq) = round_trip(ty, &x, n);
        let rb = ty.row_bytes(n);
        for r in 0..2 {
            check_bounds(ty, &x[r * n..(r + 1) * n], &bytes[r * rb..(r + 1) * rb], &deq[r * n..(r + 1) * n]);
        }
        // The outlier sets its block's scale and survives to within a few percent.
        for i in [300, n + 777] {
            assert!(((deq[i] - x[i]) / x[i]).abs() < 0.05, "{ty}: outlier {} -> {}", x[i], deq[i]);
        }
        // Blocks without the outlier are unaffected: the same bytes as without it.
        let mut clean = x.clone();
        clean[300] = 0.0;
        clean[n + 777] = 0.0;
        let clean_bytes = quantize(ty, &clean, n).expect("clean");
        let b = ty.block_size();
        let (sz, first) = (ty.type_size(), 300 / b);
        assert_eq!(bytes[..first * sz], clean_bytes[..first * sz], "{ty}: blocks before the outlier changed");
    }
}

#[test]
fn tiny_values() {
    // 1e-30 is far below f16's range: the block scales flush to zero and everything comes
    // back as zero (error 1e-30, within the bounds); F32 and BF16 keep it.
    let mut rng = Rng::new(5);
    let x: Vec<f32> = rng.gauss_vec(512, 1e-30);
    for ty in GgmlType::ALL {
        let (bytes, deq) = round_trip(ty, &x, 512);
        check_bounds(ty, &x, &bytes, &deq);
        match ty {
            GgmlType::F32 => assert_eq!(deq, x),
            GgmlType::BF16 => assert!(deq.iter().zip(&x).all(|(a, b)| (a - b).abs() <= b.abs() / 256.0)),
            _ => assert!(deq.iter().all(|&v| v == 0.0), "{ty}"),
        }
    }
    // Near the bottom of f16's range (subnormal scales) things still round-trip within bounds.
    let x: Vec<f32> = rng.gauss_vec(512, 1e-5);
    for ty in GgmlType::ALL {
        let (bytes, deq) = round_trip(ty, &x, 512);
        check_bounds(ty, &x, &bytes, &deq);
    }
}

#[test]
fn blocks_below_1e37_follow_ggml_x86() {
    // amax ≈ 1e-40 (an f32 subnormal): d = amax/127 is so small that 1.0f/d is infinite, so
    // every x * id is ±inf (or NaN for x = 0) and ggml's C float-to-int conversions give the
    // x86 "integer indefinite" 0x80000000, whose low byte is 0. Checked against ggml itself.
    let mut x = vec![1e-40f32; 32];
    x[3] = -1e-40;
    x[4] = 0.0;
    let q8 = quantize(GgmlType::Q8_0, &x, 32).expect("q8_0");
    assert!(q8.iter().all(|&b| b == 0), "{q8:?}");
    let q4 = quantize(GgmlType::Q4_0, &x, 32).expect("q4_0");
    assert_eq!(q4[..2], [0x00, 0x80]); // d = -1e-40/8 rounds to -0.0
    assert!(q4[2..].iter().all(|&b| b == 0), "{q4:?}");
    let q51 = quantize(GgmlType::Q5_1, &x, 32).expect("q5_1");
    assert!(q51[4..].iter().all(|&b| b == 0), "{q51:?}");
    // Whatever the levels, they dequantise to zero: the scale is zero too.
    for ty in QUANTIZED {
        let (_, deq) = round_trip(ty, &[1e-40f32; 256], 256);
        assert!(deq.iter().all(|&v| v == 0.0), "{ty}");
    }
}

#[test]
fn nan_and_infinity_are_refused_with_their_position() {
    let mut rng = Rng::new(6);
    for ty in GgmlType::ALL {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = rng.gauss_vec(3 * 256, 1.0);
            x[256 + 17] = bad;
            x[2 * 256 + 5] = f32::NAN; // a later one: the first is reported
            match quantize(ty, &x, 256) {
                Err(QuantError::NonFinite { row: 1, col: 17, value }) => {
                    assert_eq!(value.to_bits(), bad.to_bits(), "{ty}");
                }
                other => panic!("{ty} {bad}: expected NonFinite at row 1, column 17, got {other:?}"),
            }
        }
    }
    let mut x = vec![1.0f32; 64];
    x[49] = f32::NAN;
    let err = quantize(GgmlType::Q8_0, &x, 32).expect_err("NaN");
    assert_eq!(
        err.to_string(),
        "value NaN at row 1, column 17 cannot be quantised; the weights contain NaN or infinity"
    );
    x[49] = f32::NEG_INFINITY;
    let err = quantize(GgmlType::Q8_0, &x, 32).expect_err("inf");
    assert!(err.to_string().starts_with("value -inf at row 1, column 17"), "{err}");
}

#[test]
fn values_beyond_f16_scales_are_refused() {
    // F16 itself tops out at 65504 (values up to 65519.99 round down to it).
    assert!(quantize(GgmlType::F16, &[65504.0, -65519.0], 2).is_ok());
    let err = quantize(GgmlType::F16, &[1.0, 2.0, 1e5, 3.0], 2).expect_err("1e5 in F16");
    assert!(matches!(err, QuantError::TooLarge { row: 1, col: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("store this tensor as BF16 or F32"), "{err}");
    // Q8_0: d = amax / 127 must fit f16, so amax up to about 8.3e6 is fine.
    assert!(quantize(GgmlType::Q8_0, &[8.0e6; 32], 32).is_ok());
    let mut x = vec![1.0f32; 64];
    x[40] = -1e9;
    let err = quantize(GgmlType::Q8_0, &x, 64).expect_err("1e9 in Q8_0");
    assert!(matches!(err, QuantError::TooLarge { row: 0, col: 40, .. }), "{err:?}");
    assert!(err.to_string().starts_with("value -1000000000 at row 0, column 40 is too large for Q8_0"), "{err}");
    for ty in
        [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K]
    {
        let mut x = vec![0.5f32; 512];
        x[300] = 3e10;
        let err = quantize(ty, &x, 256).expect_err("3e10");
        assert!(matches!(err, QuantError::TooLarge { row: 1, col: 44, .. }), "{ty}: {err:?}");
    }
    // BF16 overflows only at the very top of f32's range.
    assert!(quantize(GgmlType::BF16, &[3.0e38], 1).is_ok());
    assert!(matches!(quantize(GgmlType::BF16, &[f32::MAX], 1), Err(QuantError::TooLarge { .. })));
    assert!(quantize(GgmlType::F32, &[f32::MAX], 1).is_ok());
}

// ---- hand-computed bytes ------------------------------------------------------------------

#[test]
fn q8_0_golden_bytes() {
    // x = 0, 1, ..., 31: amax = 31, d = 31/127 = 0.244094, which rounds to the f16
    // 2000 * 2^-13 = 0.244140625 = 0x33D0. q_j = roundf(j * 127/31):
    let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
    let q: [u8; 32] = [
        0, 4, 8, 12, 16, 20, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 66, 70, 74, 78, 82, 86, 90, 94, 98, 102, 107, 111,
        115, 119, 123, 127,
    ];
    let bytes = quantize(GgmlType::Q8_0, &x, 32).expect("q8_0");
    assert_eq!(bytes[..2], [0xD0, 0x33]);
    assert_eq!(bytes[2..], q);
    let deq = dequantize(GgmlType::Q8_0, &bytes, 32).expect("deq");
    for (j, v) in deq.iter().enumerate() {
        assert_eq!(*v, f32::from(q[j]) * (2000.0 / 8192.0));
    }
    // Negative values are two's complement bytes.
    let neg: Vec<f32> = x.iter().map(|v| -v).collect();
    let bytes = quantize(GgmlType::Q8_0, &neg, 32).expect("q8_0");
    assert_eq!(bytes[31 + 2], (-127i8) as u8);
}

#[test]
fn q4_0_golden_bytes() {
    // x_j = x_{j+16} = j - 8: the largest magnitude is -8, so d = -8 / -8 = 1 (f16 0x3C00) and
    // each value maps to the nibble x + 8 = j; element j sits in the low nibble of byte j,
    // element j+16 in the high nibble.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 - 8.0).collect();
    let bytes = quantize(GgmlType::Q4_0, &x, 32).expect("q4_0");
    let mut want = vec![0x00, 0x3C];
    want.extend((0..16u8).map(|j| j | (j << 4)));
    assert_eq!(bytes, want);
    assert_eq!(dequantize(GgmlType::Q4_0, &bytes, 32).expect("deq"), x);
}

#[test]
fn q5_0_golden_bytes() {
    // x_j = j - 16 for j in 0..32: the largest magnitude is -16, d = 1, levels q_j = j. Low
    // nibbles: element j (j < 16) in byte j's low half, element j+16 in its high half; the
    // fifth bit of element j is bit j of qh, set for j >= 16.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let bytes = quantize(GgmlType::Q5_0, &x, 32).expect("q5_0");
    let mut want = vec![0x00, 0x3C, 0x00, 0x00, 0xFF, 0xFF];
    want.extend((0..16u8).map(|j| j | (j << 4)));
    assert_eq!(bytes, want);
    assert_eq!(dequantize(GgmlType::Q5_0, &bytes, 32).expect("deq"), x);
}

#[test]
fn float_golden_bytes() {
    let x = [1.0f32, -2.0, 65504.0, 2f32.powi(-24), 0.0, -0.0];
    let f16 = quantize(GgmlType::F16, &x, 6).expect("f16");
    let bits: Vec<u16> = f16.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(bits, [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0000, 0x8000]);
    // BF16 rounds to nearest, ties to even.
    let x = [
        1.0f32,
        f32::from_bits(0x3F80_8000), // halfway between 0x3F80 and 0x3F81: to even 0x3F80
        f32::from_bits(0x3F81_8000), // halfway between 0x3F81 and 0x3F82: to even 0x3F82
        f32::from_bits(0x3F80_8001), // just above halfway: up
        f32::from_bits(0x0000_8000), // subnormal, halfway: to even (0)
        -3.0,
    ];
    let bf16 = quantize(GgmlType::BF16, &x, 6).expect("bf16");
    let bits: Vec<u16> = bf16.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(bits, [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x0000, 0xC040]);
    assert_eq!(legacy::f32_to_bf16_bits(f32::from_bits(0x7F80_0001)), 0x7FC0); // NaN made quiet
    assert_eq!(legacy::f32_to_bf16_bits(f32::INFINITY), 0x7F80);
    let f32b = quantize(GgmlType::F32, &[1.5], 1).expect("f32");
    assert_eq!(f32b, 1.5f32.to_le_bytes());
}

#[test]
fn k_quant_scale_packing() {
    // get_scale_min_k4 inverts set_scale_min_k4 for every 6-bit pair and sub-block.
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        let pairs: Vec<(u8, u8)> = (0..8).map(|_| ((rng.next_u64() % 64) as u8, (rng.next_u64() % 64) as u8)).collect();
        let mut packed = [0u8; 12];
        // Packing as ggml does it (ls/lm for sub-blocks 0..4 first).
        for (j, &(ls, lm)) in pairs.iter().enumerate() {
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        for (j, &pair) in pairs.iter().enumerate() {
            assert_eq!(kquants::get_scale_min_k4(j, &packed), pair);
        }
    }
}

#[test]
fn nearest_int_matches_ggml_trick() {
    // Ties go to even (the FPU's rounding of the addition), like rint, for |x| < 2^22.
    for (x, want) in
        [(0.5f32, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-7.51, -8), (4194303.0, 4194303)]
    {
        assert_eq!(kquants::nearest_int(x), want, "{x}");
    }
    let mut rng = Rng::new(8);
    for _ in 0..10_000 {
        let x = rng.gauss() * 1000.0;
        assert_eq!(kquants::nearest_int(x), x.round_ties_even() as i32, "{x}");
    }
}

/// ggml's software `ggml_compute_fp32_to_fp16`, transcribed, to check that `half` rounds the
/// same way.
fn ggml_fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000);
    let scale_to_zero = f32::from_bits(0x0880_0000);
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xFF00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

#[test]
fn f16_rounding_matches_ggml() {
    // Every 4099th f32 bit pattern (about a million, all exponents), plus each f16 rounding
    // boundary neighbourhood near the top and bottom of the range.
    let mut patterns: Vec<u32> = (0..=u32::MAX / 4099).map(|k| k * 4099).collect();
    for h in (0u32..0x7C00).step_by(7) {
        let mid = f16_bits_to_f32(h as u16).to_bits().saturating_add(1 << 12);
        patterns.extend([mid - 1, mid, mid + 1]);
    }
    patterns.extend([0x477F_E000, 0x477F_EFFF, 0x477F_F000, 0x3380_0000, 0x3300_0000, 0x3300_0001]);
    for bits in patterns {
        for b in [bits, bits | 0x8000_0000] {
            let f = f32::from_bits(b);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16_bits(f), ggml_fp32_to_fp16(f), "{f:e} ({b:#010x})");
        }
    }
}

#[test]
#[ignore = "all 2^32 f32 bit patterns: about 20 s in release on 2 cores; run with --ignored"]
fn f16_rounding_matches_ggml_exhaustively() {
    // Split the 2^32 patterns over the machine's threads (std only).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let per = (1u64 << 32).div_ceil(u64::from(threads));
    let first_bad = |check: &(dyn Fn(u32) -> bool + Sync)| -> Option<u32> {
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..u64::from(threads))
                .map(|t| {
                    let (lo, hi) = (t * per, ((t + 1) * per).min(1 << 32));
                    sc.spawn(move || (lo..hi).map(|b| b as u32).find(|&b| !check(b)))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok().flatten()).min()
        })
    };
    let bad = first_bad(&|b| {
        let f = f32::from_bits(b);
        f.is_nan() || f32_to_f16_bits(f) == ggml_fp32_to_fp16(f)
    });
    assert_eq!(bad, None, "first f16 mismatch at f32 bits {bad:#x?}");
    // And BF16 against a direct transcription of ggml_compute_fp32_to_bf16, NaN included.
    let bad = first_bad(&|u| {
        let want =
            if (u & 0x7fff_ffff) > 0x7f80_0000 { (u >> 16) | 64 } else { (u + (0x7fff + ((u >> 16) & 1))) >> 16 };
        u32::from(legacy::f32_to_bf16_bits(f32::from_bits(u))) == want
    });
    assert_eq!(bad, None, "first bf16 mismatch at f32 bits {bad:#x?}");
}

// ---- MLX ----------------------------------------------------------------------------------

#[test]
fn mlx_hand_made_4_bit() {
    // One group of 32: 0..15 twice. The larger-magnitude end is the max (15), so the scale is
    // negative: scale = -(15 - 0)/15 = -1, q0 = rint(15 / -1) = -15, scale = 15 / -15 = -1,
    // bias = 15, q = rint((w - 15) / -1) = 15 - w.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32).collect();
    let q = mlx::quantize(&x, 1, 32, 4, 32).expect("mlx");
    assert_eq!(q.scales, [-1.0]);
    assert_eq!(q.biases, [15.0]);
    // Value j at bits 4*(j%8) of word j/8: levels 15, 14, ..., 8 then 7, ..., 0.
    assert_eq!(q.weight, [0x89AB_CDEF, 0x0123_4567, 0x89AB_CDEF, 0x0123_4567]);
    assert_eq!(mlx::dequantize(&q), x);

    // Negative end larger: w = -8..7, scale = 15/15 = 1, q0 = rint(-8/1) = -8, scale = -8/-8
    // = 1, bias = -8, q = w + 8.
    let x: Vec<f32> = (0..64).map(|j| (j % 16) as f32 - 8.0).collect();
    let q = mlx::quantize(&x, 2, 32, 4, 32).expect("mlx");
    assert_eq!(q.scales, [1.0, 1.0]);
    assert_eq!(q.biases, [-8.0, -8.0]);
    assert_eq!(q.weight, [0x7654_3210, 0xFEDC_BA98, 0x7654_3210, 0xFEDC_BA98].repeat(2));
    assert_eq!(mlx::dequantize(&q), x);
}

#[test]
fn mlx_hand_made_8_bit() {
    // w = [0, 255, 2, 3, ..., 31]: edge = max = 255, scale = -255/255 = -1, bias = 255,
    // q = 255 - w; four bytes per word, the first value in the lowest byte.
    let mut x: Vec<f32> = (0..32).map(|j| j as f32).collect();
    x[1] = 255.0;
    let q = mlx::quantize(&x, 1, 32, 8, 32).expect("mlx");
    assert_eq!((q.scales[0], q.biases[0]), (-1.0, 255.0));
    assert_eq!(q.weight.len(), 8);
    assert_eq!(q.weight[0], 0xFCFD_00FF);
    assert_eq!(q.weight[7], u32::from_le_bytes([255 - 28, 255 - 29, 255 - 30, 255 - 31]));
    assert_eq!(mlx::dequantize(&q), x);
}

#[test]
fn mlx_zero_group_and_zero_preservation() {
    // A group of zeros: scale stays -max(0, 1e-7) = -1e-7, q0 = 0 so the bias is 0.
    let q = mlx::quantize(&[0.0f32; 64], 1, 64, 4, 64).expect("mlx");
    assert_eq!((q.scales[0], q.biases[0]), (-1e-7, 0.0));
    assert!(q.weight.iter().all(|&w| w == 0));
    assert!(mlx::dequantize(&q).iter().all(|&v| v == 0.0));
    // The scale is adjusted so that zero is on the grid: exact zeros survive.
    let mut rng = Rng::new(9);
    let mut x = rng.gauss_vec(128, 1.0);
    x[5] = 0.0;
    x[77] = 0.0;
    for bits in [2, 3, 4, 5, 6, 8] {
        let q = mlx::quantize(&x, 1, 128, bits, 32).expect("mlx");
        let d = mlx::dequantize(&q);
        assert!(d[5].abs() < 1e-6 && d[77].abs() < 1e-6, "{bits} bits: {} {}", d[5], d[77]);
    }
}

#[test]
fn mlx_odd_bit_widths_use_a_bit_stream() {
    // 3 bits: value j at bit 3j of the row's little-endian bit stream, crossing word
    // boundaries (value 10 covers bits 30..33).
    let levels: Vec<u32> = (0..32).map(|j| (j * 5 + 1) % 8).collect();
    // Build a group whose levels are exactly `levels`: w = level - 7 (min -7 is the larger-
    // magnitude end: scale 1, bias -7).
    let x: Vec<f32> = levels.iter().map(|&l| l as f32 - 7.0).collect();
    assert!(x.contains(&-7.0) && x.contains(&0.0));
    let q = mlx::quantize(&x, 1, 32, 3, 32).expect("mlx");
    assert_eq!((q.scales[0], q.biases[0]), (1.0, -7.0));
    let mut stream: u128 = 0;
    for (j, &l) in levels.iter().enumerate() {
        stream |= u128::from(l) << (3 * j);
    }
    let want: Vec<u32> = (0..3).map(|w| (stream >> (32 * w)) as u32).collect();
    assert_eq!(q.weight, want);
    assert_eq!(mlx::dequantize(&q), x);
}

#[test]
fn mlx_random_round_trip() {
    let mut rng = Rng::new(10);
    let (rows, cols) = (5, 256);
    let x = rng.gauss_vec(rows * cols, 0.05);
    for bits in [2u32, 3, 4, 5, 6, 8] {
        for group in [32usize, 64, 128] {
            let q = mlx::quantize(&x, rows, cols, bits, group).expect("mlx");
            assert_eq!(q.weight.len(), rows * cols * bits as usize / 32);
            assert_eq!(q.scales.len(), rows * cols / group);
            let d = mlx::dequantize(&q);
            let n_bins = ((1u32 << bits) - 1) as f32;
            for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
                // Each value is on the nearest level of its group's grid bias + scale*k,
                // k = 0..n_bins; outside the grid's range, at the nearer end.
                let g = i / group;
                let (s, bias) = (q.scales[g], q.biases[g]);
                let (lo, hi) = (bias.min(bias + s * n_bins), bias.max(bias + s * n_bins));
                let outside = (lo - a).max(a - hi).max(0.0);
                let bound = 0.5 * s.abs() * (1.0 + 1e-5) + outside + 1e-6 * a.abs();
                assert!((a - b).abs() <= bound, "{bits} bits, group {group}, value {i}: {a} -> {b}");
            }
            // The grid's far end falls at most one step short of the group's range (the edge
            // end is exact): with a = n_bins * |edge| / range >= n_bins / 2, the shortfall is
            // n_bins * |rint(a) - a| / a <= 1 step.
            for (g, vals) in x.chunks(group).enumerate() {
                let (s, bias) = (q.scales[g], q.biases[g]);
                let (lo, hi) = (bias.min(bias + s * n_bins), bias.max(bias + s * n_bins));
                let (mn, mx) = vals.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                assert!(
                    mn >= lo - 1.0001 * s.abs() && mx <= hi + 1.0001 * s.abs(),
                    "{bits}/{group}: grid {lo}..{hi} vs {mn}..{mx}"
                );
            }
            if bits == 8 && group == 32 {
                assert!(rel_rmse(&x, &d) < 0.01);
            }
            if bits == 4 && group == 64 {
                assert!(rel_rmse(&x, &d) < 0.15, "{}", rel_rmse(&x, &d));
            }
        }
    }
}

#[test]
fn mlx_refusals() {
    let x = vec![0.5f32; 256];
    for bits in [0u32, 1, 7, 9, 16] {
        let err = mlx::quantize(&x, 1, 256, bits, 64).expect_err("bits");
        assert!(matches!(err, QuantError::UnsupportedBits { .. }), "{err:?}");
    }
    assert_eq!(
        mlx::quantize(&x, 1, 256, 7, 64).expect_err("7").to_string(),
        "MLX quantisation supports 2, 3, 4, 5, 6 or 8 bits, not 7"
    );
    for group in [0usize, 16, 48, 256] {
        let err = mlx::quantize(&x, 1, 256, 4, group).expect_err("group");
        assert!(matches!(err, QuantError::UnsupportedGroupSize { .. }), "{err:?}");
    }
    let err = mlx::quantize(&x[..200], 2, 100, 4, 32).expect_err("cols");
    assert_eq!(err.to_string(), "row of 100 values is not a multiple of the MLX group size 32");
    let err = mlx::quantize(&x, 3, 64, 4, 32).expect_err("shape");
    assert!(matches!(err, QuantError::BadShape { len: 256, rows: 3, cols: 64 }), "{err:?}");
    let mut y = x.clone();
    y[130] = f32::INFINITY;
    let err = mlx::quantize(&y, 2, 128, 4, 64).expect_err("inf");
    assert!(matches!(err, QuantError::NonFinite { row: 1, col: 2, .. }), "{err:?}");

    let mut q = mlx::quantize(&x, 2, 128, 4, 64).expect("ok");
    q.scales.pop();
    let err = mlx::try_dequantize(&q).expect_err("short scales");
    assert!(matches!(err, QuantError::BadMlxPart { what: "scales", got: 3, expected: 4, .. }), "{err:?}");
    assert!(mlx::quantize(&[], 0, 128, 4, 64).expect("empty").weight.is_empty());
}
