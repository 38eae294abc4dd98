//! Checkpoints: everything a resumed run needs to continue exactly where it stopped.
//!
//! `RUN/checkpoints/step-000123/` holds `trainable.safetensors` (the adapter or all weights, by
//! module path), `optimizer.safetensors` (AdamW moments by path), and `state.json` (step, data
//! cursor, counters). The directory is written under a temporary name and renamed, so a crash
//! leaves either a whole checkpoint or none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::TrainError;
use crate::model::weights::{save_f32, WeightFiles};

/// Loop counters saved with a checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Updates done.
    pub step: usize,
    /// Micro-batches consumed since the start of training (epoch · batches + index).
    pub cursor: usize,
    pub adam_step: usize,
    pub best_eval: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_since_best: usize,
    pub bad_in_row: usize,
    /// Running sums of the current logging window.
    pub window_loss: f64,
    pub window_steps: usize,
    pub window_tokens: usize,
    /// GRPO rollouts still in use (`num_iterations` > 1 reuses them over several steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollouts: Option<super::grpo::Rollouts>,
}

pub fn dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

pub fn save<B: Backend>(
    run_dir: &Path,
    trainable: Vec<(String, Vec<usize>, Vec<f32>)>,
    opt: &AdamW<B>,
    state: &LoopState,
) -> Result<PathBuf, TrainError> {
    let root = run_dir.join("checkpoints");
    let final_dir = root.join(dir_name(state.step));
    let tmp = root.join(format!(".tmp-{}", dir_name(state.step)));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    save_f32(&tmp.join("trainable.safetensors"), &trainable)?;
    let mut moments = Vec::new();
    for (name, m, v) in opt.moments() {
        let n = m.dims()[0];
        moments.push((format!("{name}.m"), vec![n], m.clone().into_data().convert::<f32>().into_vec().unwrap_or_default()));
        moments.push((format!("{name}.v"), vec![n], v.clone().into_data().convert::<f32>().into_vec().unwrap_or_default()));
    }
    save_f32(&tmp.join("optimizer.safetensors"), &moments)?;
    let text = serde_json::to_string_pretty(state).unwrap_or_default();
    std::fs::write(tmp.join("state.json"), text).map_err(io(&tmp))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let root = run_dir.join("checkpoints");
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").exists().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes all but the newest `keep_last` checkpoints and the best one.
pub fn prune(run_dir: &Path, keep_last: usize, best_step: Option<usize>) {
    let all = list(run_dir);
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if Some(*step) != best_step {
            if let Err(e) = std::fs::remove_dir_all(path) {
                tracing::warn!("cannot remove old checkpoint {}: {e}", path.display());
            }
        }
    }
}

/// What a checkpoint holds, on the host.
pub struct Loaded {
    pub trainable: HashMap<String, Vec<f32>>,
    pub moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
    pub state: LoopState,
}

pub fn load(dir: &Path) -> Result<Loaded, TrainError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|source| TrainError::Io { path: state_path.clone(), source })?;
    let state: LoopState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
    let read_all = |file: &str| -> Result<HashMap<String, Vec<f32>>, TrainError> {
        let files = WeightFiles::open_files(&[dir.join(file)])?;
        let names: Vec<String> = files.names().map(String::from).collect();
        names
            .into_iter()
            .map(|n| {
                let shape = files.shape(&n).unwrap_or_default();
                let v = files.f32(&n, &shape)?;
                Ok((n, v))
            })
            .collect()
    };
    let trainable = read_all("trainable.safetensors")?;
    let flat = read_all("optimizer.safetensors")?;
    let mut moments = HashMap::new();
    for (name, m) in &flat {
        if let Some(base) = name.strip_suffix(".m") {
            let v = flat.get(&format!("{base}.v")).cloned().ok_or_else(|| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("optimizer state for `{base}` has m but no v"),
            })?;
            moments.insert(base.to_string(), (m.clone(), v));
        }
    }
    Ok(Loaded { trainable, moments, state })
}

/// Puts saved moments into an optimizer on `device`.
pub fn restore_moments<B: Backend>(opt: &mut AdamW<B>, moments: HashMap<String, (Vec<f32>, Vec<f32>)>, device: &B::Device) {
    for (name, (m, v)) in moments {
        let n = m.len();
        let m = Tensor::from_data(TensorData::new(m, [n]), device);
        let v = Tensor::from_data(TensorData::new(v, [n]), device);
        opt.restore_moments(name, m, v);
    }
}
