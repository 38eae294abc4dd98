//! `kiln report` on the recorded runs (tests/fixtures/runs): the summary figures against the
//! events themselves, every output format, the charts, and the errors.

mod common;

use common::{fixture, kiln};
use serde_json::Value;

fn run_dir(name: &str) -> String {
    fixture(&format!("runs/{name}")).display().to_string()
}

/// The run's events of `kind`, parsed straight from the file (complete, valid lines only).
fn events(name: &str, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(fixture(&format!("runs/{name}/events.jsonl")))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn json_summary_matches_the_events() {
    let (code, stdout, stderr) = kiln(&["report", &run_dir("sft"), "--format", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let s: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let evals = events("sft", "eval");
    let best = evals.iter().min_by(|a, b| a["loss"].as_f64().unwrap().total_cmp(&b["loss"].as_f64().unwrap())).unwrap();
    assert!(close(&s["best_eval_loss"], best["loss"].as_f64().unwrap()), "{s}");
    assert_eq!(s["best_step"], best["step"]);
    assert!(close(&s["final_ppl"], evals.last().unwrap()["ppl"].as_f64().unwrap()));
    let train = events("sft", "train");
    let tokens: u64 = train.iter().map(|t| t["tokens"].as_u64().unwrap()).sum();
    assert_eq!(s["tokens"].as_u64().unwrap(), tokens);
    let mean_rate = train.iter().map(|t| t["tokens_per_s"].as_f64().unwrap()).sum::<f64>() / train.len() as f64;
    assert!(close(&s["tokens_per_s"], mean_rate));
    assert!(close(&s["wall_s"], events("sft", "end")[0]["elapsed_s"].as_f64().unwrap()));
    assert!(s["reward_first"].is_null());

    let (code, stdout, _) = kiln(&["report", &run_dir("grpo"), "--format", "json"]);
    assert_eq!(code, 0);
    let g: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let rewards: Vec<f64> = events("grpo", "grpo").iter().map(|e| e["reward_mean"].as_f64().unwrap()).collect();
    assert!(close(&g["reward_first"], rewards[0]) && close(&g["reward_last"], *rewards.last().unwrap()));
    assert!(close(&g["reward_best"], rewards.iter().copied().fold(f64::MIN, f64::max)));
    let trajectory = g["reward_trajectory"].as_array().unwrap();
    assert!(trajectory.len() <= 11 && trajectory.len() >= 2, "{trajectory:?}");
}

#[test]
fn several_runs_side_by_side_in_every_format() {
    let runs = [run_dir("sft"), run_dir("grpo"), run_dir("error")];
    let args = |extra: &[&str]| -> Vec<String> { ["report"].iter().map(|s| s.to_string()).chain(runs.iter().cloned()).chain(extra.iter().map(|s| s.to_string())).collect() };
    let call = |extra: &[&str]| {
        let a = args(extra);
        kiln(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, stdout, stderr) = call(&["--format", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let all: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.iter().map(|r| r["run"].as_str().unwrap()).collect::<Vec<_>>(), ["sft", "grpo", "error"]);
    for key in ["best_eval_loss", "best_step", "final_ppl", "tokens", "wall_s", "tokens_per_s"] {
        assert!(all.iter().all(|r| r.get(key).is_some()), "{key} missing");
    }
    // The error run: no evaluation, two bad lines skipped and reported.
    assert!(all[2]["best_eval_loss"].is_null());
    assert_eq!(all[2]["end"], "error");
    assert_eq!(all[2]["skipped_lines"], 2);
    assert!(stderr.contains("line 6") && stderr.contains("unfinished line"), "{stderr}");

    let (code, md, _) = call(&[]);
    assert_eq!(code, 0);
    assert!(md.starts_with("| | sft | grpo | error |"), "{md}");
    assert!(md.contains("| best eval loss | 0.8952 |"), "{md}");

    let (code, csv, _) = call(&["--format", "csv"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[0].starts_with("run,method,steps,end,best_eval_loss,best_step"), "{csv}");

    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("runs.parquet");
    let (code, _, stderr) = call(&["--format", "parquet", "--out", parquet.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    use polars::prelude::*;
    let df = ParquetReader::new(std::fs::File::open(&parquet).unwrap()).finish().unwrap();
    assert_eq!(df.height(), 3);
    let best = df.column("best_eval_loss").unwrap().f64().unwrap().get(0).unwrap();
    assert!(close(&all[0]["best_eval_loss"], best));
}

#[test]
fn charts_as_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("runs.png");
    let svg = tmp.path().join("runs.svg");
    let (code, _, stderr) = kiln(&["report", &run_dir("sft"), &run_dir("grpo"), "--plot", png.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()));
    assert_eq!((w, h), (1100, 1050), "three panels with a GRPO run");
    let (code, _, stderr) = kiln(&["report", &run_dir("sft"), "--plot", svg.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("eval perplexity") && text.contains("sft eval"), "{}", &text[..200.min(text.len())]);
    assert!(!text.contains("GRPO reward"), "no reward panel without a GRPO run");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let (code, _, stderr) = kiln(&["report", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("nope") && stderr.contains("events.jsonl"), "{stderr}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("events.jsonl"), "garbage\n").unwrap();
    let (code, _, stderr) = kiln(&["report", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no events"), "{stderr}");
    let jpg = tmp.path().join("x.jpg");
    let (code, _, stderr) = kiln(&["report", &run_dir("sft"), "--plot", jpg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains(".png or .svg"), "{stderr}");
    assert!(!jpg.exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec!["empty"], "no temporary file left behind");
    let (code, _, stderr) = kiln(&["watch", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not a run directory"), "{stderr}");
}
