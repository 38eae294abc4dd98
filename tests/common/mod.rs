//! Helpers shared by the integration tests: fixture paths, reference tensors, and the list of
//! backends to run on.

#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn model_dir(name: &str) -> PathBuf {
    fixture(&format!("models/{name}"))
}

/// A tensor from a reference file as (shape, values as f64).
pub fn reference(model: &str, name: &str) -> (Vec<usize>, Vec<f64>) {
    let path = model_dir(model).join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing from {}", path.display()));
    let data = t.data();
    let values: Vec<f64> = match t.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.shape().to_vec(), values)
}

pub fn reference_ids(model: &str, name: &str) -> (Vec<usize>, Vec<u32>) {
    let (shape, v) = reference(model, name);
    (shape, v.into_iter().map(|x| x as u32).collect())
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

/// Whether the wgpu tests should run: a Vulkan driver is installed (Mesa's lavapipe in CI),
/// or `KILN_TEST_WGPU=1` forces them. `KILN_TEST_WGPU=0` turns them off.
pub fn wgpu_available() -> bool {
    match std::env::var("KILN_TEST_WGPU").as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"].iter().any(|d| {
        std::fs::read_dir(d).map(|mut r| r.next().is_some()).unwrap_or(false)
    })
}

/// Runs the kiln binary with `args`, returning (exit code, stdout, stderr).
pub fn kiln(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The model's f32 logits for fixture `name`'s reference `input_ids`, on the CPU.
pub fn logits_of(model: &kiln::model::Model<kiln::backend::Cpu>, name: &str) -> Vec<f32> {
    use burn::prelude::*;
    let (shape, ids) = reference_ids(name, "input_ids");
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<kiln::backend::Cpu, 2, Int>::from_data(burn::tensor::TensorData::new(data, [shape[0], shape[1]]), &Default::default());
    model.forward(ids, None).into_data().convert::<f32>().into_vec().unwrap()
}

/// A small deterministic generator (xorshift) for the random inputs of kernel checks: the same
/// numbers on every machine, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [0, 1).
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let (a, b) = (self.next().max(1e-12), self.next());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
}
