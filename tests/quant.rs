//! kiln's quantisers against the real ggml C code (through llama-cpp-python's libggml, when
//! installed): byte-identical blocks for every type on rows chosen to hit the edge cases, and
//! bit-identical dequantisation. The format-level unit tests live in src/quant/tests.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::quant::{self, GgmlType};

/// Deterministic rows: gaussian at three scales, heavy tails, an outlier, constants, zeros,
/// tiny values, all-positive, and {-1, 0, 1}.
fn rows(cols: usize) -> Vec<f32> {
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut gauss = || {
        let (u1, u2) = (uniform().max(1e-12), uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let mut out = Vec::new();
    for kind in 0..12 {
        for c in 0..cols {
            let g = gauss();
            out.push(match kind {
                0 => g,
                1 => g * 0.02,
                2 => g * 300.0,
                3 => g.powi(3),
                4 => if c == cols / 3 { 1e4 } else { g },
                5 => 0.731,
                6 => 0.0,
                7 => g * 1e-30,
                8 => g.abs() + 0.5,
                9 => (c % 3) as f32 - 1.0,
                10 => if c % 64 < 32 { 0.0 } else { g },
                _ => (g * 8.0).round() / 2.0,
            });
        }
    }
    out
}

fn reference(args: &[&str], out: &Path) -> Vec<u8> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/quant_reference.py");
    let r = Command::new("python3").arg(script).args(args).arg("--out").arg(out).output().unwrap();
    assert!(r.status.success(), "quant_reference.py {args:?}: {}", String::from_utf8_lossy(&r.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn quantisers_are_byte_identical_to_ggml() {
    let has = Command::new("python3").args(["-c", "import llama_cpp, numpy"]).output().is_ok_and(|o| o.status.success());
    if !has {
        assert!(std::env::var("KILN_REQUIRE_INTEROP").as_deref() != Ok("1"), "KILN_REQUIRE_INTEROP=1 but python3 cannot import llama_cpp");
        eprintln!("llama-cpp-python not installed: skipping the byte-identity check against ggml");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cols = 512;
    let data = rows(cols);
    let input = dir.path().join("x.f32");
    std::fs::write(&input, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    for ty in GgmlType::ALL {
        let ours = quant::quantize(ty, &data, cols).unwrap();
        let theirs = reference(&["--type", ty.name(), "--input", input.to_str().unwrap(), "--cols", &cols.to_string()], &dir.path().join("q.bin"));
        assert_eq!(ours.len(), theirs.len(), "{ty}");
        let block = ty.type_size();
        let differing: Vec<usize> = ours.chunks(block).zip(theirs.chunks(block)).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
        assert!(differing.is_empty(), "{ty}: {} of {} blocks differ from ggml, first {:?}", differing.len(), ours.len() / block, &differing[..differing.len().min(5)]);

        let q = dir.path().join("q.bin");
        let back = reference(&["--type", ty.name(), "--dequantize", "--input", q.to_str().unwrap()], &dir.path().join("y.f32"));
        let ours_back = quant::dequantize(ty, &ours, data.len()).unwrap();
        let theirs_back: Vec<u32> = back.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(ours_back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), theirs_back, "{ty}: dequantisation differs from ggml");
    }
}
