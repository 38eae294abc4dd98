//! GRPO and distillation end to end on the CPU, on the trained arithmetic fixture: the event
//! contracts, what the reference and the teacher must give at the start, exact resume (rollouts
//! included), failing reward commands, and the refusals.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::backend::Autodiff;
use common::*;
use kiln::backend::Cpu;
use kiln::model::weights::WeightFiles;
use kiln::recipe::Recipe;
use kiln::run::{Event, Recorder};
use kiln::train::{train, TrainOptions};
use serde_json::Value;

/// A recipe of `method` on the arith-256 fixture and the addition data, writing into `out`.
fn recipe(out: &Path, method: &str, extra: &str) -> Recipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"method = "{method}"
[run]
name = "m"
output_dir = "{out}"
seed = 3
[model]
path = "{model}"
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
test = "{data}/test.jsonl"
max_seq_len = 32
[lora]
rank = 4
alpha = 8
targets = ["all-linear"]
[train]
steps = 4
batch_size = 2
grad_accum = 2
learning_rate = 1e-3
log_every = 1
[eval]
every = 2
max_batches = 1
exact_match_samples = 4
max_new_tokens = 4
[checkpoint]
every = 2
{extra}"#,
        out = out.display(),
        model = model_dir("arith-256").display(),
        data = root.join("datasets/arith").display(),
    );
    Recipe::from_str(&text, &out.join("m.toml")).unwrap()
}

const GRPO: &str = r#"[grpo]
group_size = 4
max_completion_length = 4
temperature = 1.5
num_iterations = 2
beta = 0.1
[[grpo.rewards]]
type = "exact_match"
[[grpo.rewards]]
type = "length"
weight = 0.1
max = 3
"#;

/// Training is serial: Burn's CPU backend has one process-wide random generator.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(recipe: &Recipe, options: TrainOptions) -> Vec<Event> {
    let mut rec = Recorder::default();
    train::<Autodiff<Cpu>>(recipe, &options, &Default::default(), &mut rec, &AtomicBool::new(false)).unwrap();
    rec.events
}

fn lines(dir: &Path, kind: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("m/events.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).filter(|v| v["kind"] == kind).collect()
}

fn losses(events: &[Event]) -> Vec<f64> {
    events.iter().filter_map(|e| match e { Event::Train { loss, .. } => Some(*loss), _ => None }).collect()
}

#[test]
fn grpo_writes_its_events_reuses_rollouts_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp_a = tempfile::tempdir().unwrap();
    let whole = run(&recipe(tmp_a.path(), "grpo", GRPO), TrainOptions::default());

    let grpo = lines(tmp_a.path(), "grpo");
    assert_eq!(grpo.len(), 4, "one grpo event a step");
    for g in &grpo {
        for key in ["reward_mean", "reward_std", "kl", "clip_ratio", "completion_len_mean", "zero_std_frac", "entropy", "truncated_frac"] {
            assert!(g.get(key).is_some(), "grpo event without {key}: {g}");
        }
        assert_eq!(g["rewards"].as_array().unwrap().len(), 2, "per-reward statistics: {g}");
        let len = g["completion_len_mean"].as_f64().unwrap();
        assert!((1.0..=4.0).contains(&len), "{g}");
    }
    // The adapter starts at zero: the policy is its reference, and the k3 estimate is 0.
    assert!(grpo[0]["kl"].as_f64().unwrap().abs() < 1e-6, "{}", grpo[0]);
    // num_iterations = 2: step 2 trains again on step 1's rollouts, so their rewards agree,
    // and the policy has moved away from the rollouts' old policy.
    assert_eq!(grpo[0]["reward_mean"], grpo[1]["reward_mean"]);
    assert_eq!(grpo[2]["reward_mean"], grpo[3]["reward_mean"]);
    assert!(grpo[1]["kl"].as_f64().unwrap() > 0.0);
    // A few rollouts were shown with their rewards.
    assert!(lines(tmp_a.path(), "sample").iter().any(|s| s.get("reward").is_some()));

    // Stopped after step 3 (in the middle of a rollout cycle) and resumed: the same losses and
    // the same adapter, because the rollouts and their old log-probabilities travel in the
    // checkpoint.
    let tmp_b = tempfile::tempdir().unwrap();
    let r = recipe(tmp_b.path(), "grpo", GRPO);
    let mut resumed = losses(&run(&r, TrainOptions { max_steps: Some(3), ..Default::default() }));
    resumed.extend(losses(&run(&r, TrainOptions { resume: true, ..Default::default() })));
    let whole = losses(&whole);
    assert_eq!(resumed.len(), whole.len());
    // Absolute: a GRPO loss is a sum of terms that cancel (advantages have mean 0), so float
    // noise of 1e-7 in each term shows as a large relative difference in a loss near 0.
    for (i, (a, b)) in resumed.iter().zip(&whole).enumerate() {
        assert!((a - b).abs() <= 1e-5, "step {}: resumed {a} vs uninterrupted {b}", i + 1);
    }
    let a = WeightFiles::open_files(&[tmp_a.path().join("m/adapter/adapter_model.safetensors")]).unwrap();
    let b = WeightFiles::open_files(&[tmp_b.path().join("m/adapter/adapter_model.safetensors")]).unwrap();
    // Over the whole adapter: Adam turns a gradient component that cancels to ~0 into a full
    // lr-sized step of either sign, so single entries carry float noise that norms do not.
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for name in a.names() {
        let shape = a.shape(name).unwrap();
        let (x, y) = (a.f32(name, &shape).unwrap(), b.f32(name, &shape).unwrap());
        diff += x.iter().zip(&y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>();
        norm += x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>();
    }
    let rel = (diff / norm).sqrt();
    // A resume that lost its rollouts would re-sample step 4 and move every entry by ~lr.
    assert!(rel < 1e-3, "the resumed adapter differs from the uninterrupted one by {rel:e} (relative Frobenius norm)");
}

#[test]
fn a_failing_reward_command_gives_null_rewards_and_warnings_not_a_crash() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // Answers every line with garbage.
    let extra = r#"[grpo]
group_size = 2
max_completion_length = 3
[[grpo.rewards]]
type = "command"
argv = ["sh", "-c", "while read line; do echo 'not json'; done"]
timeout_s = 5
"#;
    let mut r = recipe(tmp.path(), "grpo", extra);
    r.train.steps = 2;
    let events = run(&r, TrainOptions::default());
    assert!(events.iter().any(|e| matches!(e, Event::End { reason, .. } if reason == "completed")));
    let warnings = lines(tmp.path(), "warning");
    assert!(!warnings.is_empty() && warnings.iter().any(|w| w["message"].as_str().unwrap().contains("JSON")), "{warnings:?}");
    for g in lines(tmp.path(), "grpo") {
        assert_eq!(g["null_rewards"].as_u64().unwrap(), 8, "every completion's reward is null: {g}");
        assert!(g["reward_mean"].is_null(), "{g}");
    }
}

#[test]
fn distilling_a_model_into_itself_starts_at_zero_divergence() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("[distill]\nteacher = \"{}\"\nbeta = 0.5\ntemperature = 2.0\nchunk_size = 5\n", model_dir("arith-256").display());
    let events = run(&recipe(tmp.path(), "distill", &extra), TrainOptions::default());
    let distill = lines(tmp.path(), "distill");
    assert_eq!(distill.len(), 4, "one distill event a step");
    // Student (a zero adapter on the teacher's weights) and teacher agree at step 1.
    assert!(distill[0]["kd_loss"].as_f64().unwrap().abs() < 1e-6, "{}", distill[0]);
    assert!(distill[0]["ce_loss"].as_f64().unwrap() > 0.0);
    assert!(distill.iter().all(|d| d["on_policy"] == false));
    // The teacher was evaluated once, on the same data as the student, and at step 0 they
    // are the same model.
    let teacher = lines(tmp.path(), "teacher_eval");
    assert_eq!(teacher.len(), 1);
    assert!(teacher[0]["ppl"].as_f64().unwrap() > 1.0);
    assert!(events.iter().any(|e| matches!(e, Event::End { reason, .. } if reason == "completed")));

    // On-policy: every step trains on the student's own completions, with no cross-entropy.
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("[distill]\nteacher = \"{}\"\nlmbda = 1.0\nmax_new_tokens = 4\n", model_dir("arith-256").display());
    let mut r = recipe(tmp.path(), "distill", &extra);
    r.train.steps = 2;
    run(&r, TrainOptions::default());
    let distill = lines(tmp.path(), "distill");
    assert_eq!(distill.len(), 2);
    for d in &distill {
        assert_eq!(d["on_policy"], true);
        assert!(d["ce_loss"].is_null(), "{d}");
        assert!(d["kd_loss"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn distillation_refuses_a_teacher_with_another_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("[distill]\nteacher = \"{}\"\n", model_dir("llama").display());
    let r = recipe(tmp.path(), "distill", &extra);
    let mut rec = Recorder::default();
    let err = train::<Autodiff<Cpu>>(&r, &TrainOptions::default(), &Default::default(), &mut rec, &AtomicBool::new(false)).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("tokenize differently") && message.contains("llama"), "{message}");
}
