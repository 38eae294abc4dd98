//! `kiln report`: a run's figures from its events, as a table (Markdown, JSON, CSV, Parquet)
//! and as charts (PNG or SVG).
//!
//! Each event kind becomes a polars frame (one column per numeric field, NaN where a value is
//! missing or null); the summary is computed on those frames. Several runs give one summary
//! row each, shown side by side.

mod plot;

use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{json, Value};

use crate::run::follow::{self, num, text, Malformed};
use crate::tui::state::RunState;

pub use plot::plot;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: no events (is this a run directory?)")]
    Empty { path: PathBuf },
    #[error("{0}")]
    Polars(#[from] PolarsError),
    #[error("plotting {path}: {message}")]
    Plot { path: PathBuf, message: String },
}

/// One run read from disk.
pub struct Run {
    pub dir: PathBuf,
    pub events: Vec<Value>,
    pub skipped: Vec<Malformed>,
    pub state: RunState,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Self, ReportError> {
        let path = dir.join("events.jsonl");
        let (events, skipped) = follow::read_all(&path).map_err(|source| ReportError::Io { path: path.clone(), source })?;
        if events.is_empty() {
            return Err(ReportError::Empty { path });
        }
        let state = RunState::from_events(&events);
        Ok(Self { dir: dir.to_path_buf(), events, skipped, state })
    }

    /// The run's name: from its start event, else its directory.
    pub fn name(&self) -> String {
        if self.state.run.is_empty() { self.dir.file_name().map_or_else(|| self.dir.display().to_string(), |n| n.to_string_lossy().into_owned()) } else { self.state.run.clone() }
    }

    /// The events of one kind as a frame, one f64 column per field (NaN where absent or null).
    pub fn frame(&self, kind: &str, fields: &[&str]) -> PolarsResult<DataFrame> {
        let rows: Vec<&Value> = self.events.iter().filter(|v| text(v, "kind") == kind).collect();
        let columns = fields.iter().map(|f| Column::new((*f).into(), rows.iter().map(|v| num(v, f)).collect::<Vec<f64>>())).collect();
        DataFrame::new(rows.len(), columns)
    }
}

/// What `kiln report` says about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub run: String,
    pub method: String,
    pub steps: usize,
    pub end: String,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub final_eval_loss: Option<f64>,
    pub final_ppl: Option<f64>,
    pub tokens: usize,
    pub wall_s: Option<f64>,
    /// Mean of the logged tokens/s figures.
    pub tokens_per_s: Option<f64>,
    /// GRPO: mean reward at the first and last step, the best, and up to ten (step, reward)
    /// points across the run.
    pub reward_first: Option<f64>,
    pub reward_last: Option<f64>,
    pub reward_best: Option<f64>,
    pub reward_trajectory: Vec<(usize, f64)>,
    pub skipped_lines: usize,
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|x| x.is_finite())
}

fn col<'a>(df: &'a DataFrame, name: &str) -> PolarsResult<&'a Float64Chunked> {
    df.column(name)?.f64()
}

/// The first / last finite value (polars' own `first` / `last` panic on an empty column).
fn first(c: &Float64Chunked) -> Option<f64> {
    c.iter().flatten().find(|x| x.is_finite())
}

fn last(c: &Float64Chunked) -> Option<f64> {
    c.iter().rev().flatten().find(|x| x.is_finite())
}

pub fn summarize(run: &Run) -> Result<Summary, ReportError> {
    let train = run.frame("train", &["step", "loss", "tokens", "tokens_per_s", "elapsed_s"])?;
    let eval = run.frame("eval", &["step", "loss", "ppl"])?;
    let grpo = run.frame("grpo", &["step", "reward_mean"])?;
    let end = run.frame("end", &["step", "elapsed_s"])?;

    // The best eval: the rows whose loss equals the minimum; the first of them.
    let eval_loss = col(&eval, "loss")?;
    let best_eval_loss = finite(eval_loss.min());
    let best_step = match best_eval_loss {
        Some(best) => {
            let rows = eval.filter(&eval_loss.equal(best))?;
            first(col(&rows, "step")?).map(|s| s as usize)
        }
        None => None,
    };
    let wall_s = last(col(&end, "elapsed_s")?).or(last(col(&train, "elapsed_s")?));
    let rewards = col(&grpo, "reward_mean")?;
    let steps = col(&grpo, "step")?;
    let n = grpo.height();
    let stride = n.div_ceil(10).max(1);
    let reward_trajectory = (0..n)
        .filter(|i| i % stride == 0 || *i + 1 == n)
        .filter_map(|i| Some((steps.get(i)? as usize, finite(rewards.get(i))?)))
        .collect();
    Ok(Summary {
        run: run.name(),
        method: run.state.method.clone(),
        steps: run.state.step,
        end: run.state.ended.clone().unwrap_or_else(|| "running (or killed)".into()),
        best_eval_loss,
        best_step,
        final_eval_loss: last(eval_loss),
        final_ppl: last(col(&eval, "ppl")?),
        tokens: col(&train, "tokens")?.sum().unwrap_or(0.0) as usize,
        wall_s,
        tokens_per_s: finite(col(&train, "tokens_per_s")?.mean()),
        reward_first: first(rewards),
        reward_last: last(rewards),
        reward_best: finite(rewards.max()),
        reward_trajectory,
        skipped_lines: run.skipped.len(),
    })
}

impl Summary {
    pub fn to_json(&self) -> Value {
        json!({
            "run": self.run,
            "method": self.method,
            "steps": self.steps,
            "end": self.end,
            "best_eval_loss": self.best_eval_loss,
            "best_step": self.best_step,
            "final_eval_loss": self.final_eval_loss,
            "final_ppl": self.final_ppl,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "reward_first": self.reward_first,
            "reward_last": self.reward_last,
            "reward_best": self.reward_best,
            "reward_trajectory": self.reward_trajectory,
            "skipped_lines": self.skipped_lines,
        })
    }
}

/// One row per run (CSV, Parquet).
pub fn summary_frame(rows: &[Summary]) -> PolarsResult<DataFrame> {
    let f = |get: fn(&Summary) -> Option<f64>| rows.iter().map(get).collect::<Vec<Option<f64>>>();
    let columns = vec![
        Column::new("run".into(), rows.iter().map(|r| r.run.clone()).collect::<Vec<_>>()),
        Column::new("method".into(), rows.iter().map(|r| r.method.clone()).collect::<Vec<_>>()),
        Column::new("steps".into(), rows.iter().map(|r| r.steps as u64).collect::<Vec<_>>()),
        Column::new("end".into(), rows.iter().map(|r| r.end.clone()).collect::<Vec<_>>()),
        Column::new("best_eval_loss".into(), f(|r| r.best_eval_loss)),
        Column::new("best_step".into(), rows.iter().map(|r| r.best_step.map(|s| s as u64)).collect::<Vec<_>>()),
        Column::new("final_eval_loss".into(), f(|r| r.final_eval_loss)),
        Column::new("final_ppl".into(), f(|r| r.final_ppl)),
        Column::new("tokens".into(), rows.iter().map(|r| r.tokens as u64).collect::<Vec<_>>()),
        Column::new("wall_s".into(), f(|r| r.wall_s)),
        Column::new("tokens_per_s".into(), f(|r| r.tokens_per_s)),
        Column::new("reward_first".into(), f(|r| r.reward_first)),
        Column::new("reward_last".into(), f(|r| r.reward_last)),
        Column::new("reward_best".into(), f(|r| r.reward_best)),
        Column::new("skipped_lines".into(), rows.iter().map(|r| r.skipped_lines as u64).collect::<Vec<_>>()),
    ];
    DataFrame::new(rows.len(), columns)
}

/// Markdown: one column per run, one row per figure, so runs read side by side.
pub fn markdown(rows: &[Summary]) -> String {
    let opt = |x: Option<f64>, digits: usize| x.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    let mut table: Vec<(&str, Vec<String>)> = vec![
        ("method", rows.iter().map(|r| r.method.clone()).collect()),
        ("steps", rows.iter().map(|r| r.steps.to_string()).collect()),
        ("ended", rows.iter().map(|r| r.end.clone()).collect()),
        ("best eval loss", rows.iter().map(|r| opt(r.best_eval_loss, 4)).collect()),
        ("best step", rows.iter().map(|r| r.best_step.map_or("—".into(), |s| s.to_string())).collect()),
        ("final eval loss", rows.iter().map(|r| opt(r.final_eval_loss, 4)).collect()),
        ("final perplexity", rows.iter().map(|r| opt(r.final_ppl, 3)).collect()),
        ("tokens", rows.iter().map(|r| r.tokens.to_string()).collect()),
        ("wall time (s)", rows.iter().map(|r| opt(r.wall_s, 1)).collect()),
        ("mean tokens/s", rows.iter().map(|r| opt(r.tokens_per_s, 1)).collect()),
    ];
    if rows.iter().any(|r| r.reward_first.is_some()) {
        table.push(("reward first → last", rows.iter().map(|r| format!("{} → {}", opt(r.reward_first, 3), opt(r.reward_last, 3))).collect()));
        table.push(("best reward", rows.iter().map(|r| opt(r.reward_best, 3)).collect()));
        table.push((
            "reward trajectory",
            rows.iter().map(|r| r.reward_trajectory.iter().map(|(s, v)| format!("{s}:{v:.2}")).collect::<Vec<_>>().join(" ")).collect(),
        ));
    }
    if rows.iter().any(|r| r.skipped_lines > 0) {
        table.push(("malformed lines skipped", rows.iter().map(|r| r.skipped_lines.to_string()).collect()));
    }
    let mut out = format!("| | {} |\n|---|{}\n", rows.iter().map(|r| r.run.as_str()).collect::<Vec<_>>().join(" | "), "---|".repeat(rows.len()));
    for (name, cells) in table {
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    }
    out
}

/// CSV of the summary rows.
pub fn csv(rows: &[Summary]) -> Result<String, ReportError> {
    let mut df = summary_frame(rows)?;
    let mut buf = Vec::new();
    CsvWriter::new(&mut buf).finish(&mut df)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Writes the summary rows as Parquet, atomically.
pub fn write_parquet(rows: &[Summary], path: &Path) -> Result<(), ReportError> {
    let mut df = summary_frame(rows)?;
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(&mut df)?;
    crate::fsutil::write_atomic(path, &buf).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })
}
