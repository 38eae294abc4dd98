//! Training end to end on the CPU: LoRA against PEFT's fixtures, fuse, packing, resume, and the
//! shipped recipes.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::*;
use kiln::backend::Cpu;
use kiln::lora;
use kiln::model::weights::WeightFiles;
use kiln::model::Model;
use kiln::recipe::Recipe;
use kiln::run::{Event, Recorder};
use kiln::train::{train, TrainOptions};

#[test]
fn peft_adapter_logits_match_the_reference() {
    let device = Default::default();
    let base = Model::<Cpu>::load(&model_dir("llama"), &device).unwrap();
    let (model, spec) = lora::peft::load(base, &model_dir("llama-lora")).unwrap();
    assert_eq!(spec.rank, 8);
    assert_eq!(lora::count(&model), 14);
    let got = logits_of(&model, "llama");
    let (_, want) = reference("llama-lora", "logits");
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "adapter logits differ by {diff:e}");

    let fused = lora::fuse(model);
    let got = logits_of(&fused, "llama");
    let (_, want) = reference("llama-lora", "merged_logits");
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "fused logits differ by {diff:e}");
}

#[test]
fn fuse_command_matches_the_merged_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused");
    let (code, _, stderr) = kiln(&[
        "fuse", "--model", model_dir("llama").to_str().unwrap(), "--adapter", model_dir("llama-lora").to_str().unwrap(),
        "--out", out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let ours = WeightFiles::open(&out).unwrap();
    let theirs = WeightFiles::open(&model_dir("llama-lora-merged")).unwrap();
    let mut names: Vec<&str> = theirs.names().collect();
    names.sort();
    assert_eq!(ours.names().count(), names.len());
    for name in names {
        let shape = theirs.shape(name).unwrap();
        let a = ours.f32(name, &shape).unwrap();
        let b = theirs.f32(name, &shape).unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-6, "{name} differs by {diff:e}");
    }
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(file).exists(), "{file} missing from the fused directory");
    }
    // The fused directory loads and runs like the merged fixture.
    let model = Model::<Cpu>::load(&out, &Default::default()).unwrap();
    let (_, want) = reference("llama-lora", "merged_logits");
    assert!(max_abs_diff(&logits_of(&model, "llama"), &want) < 1e-4);
}

#[test]
fn fresh_adapter_leaves_the_model_unchanged() {
    let device = Default::default();
    let base = Model::<Cpu>::load(&model_dir("qwen2"), &device).unwrap();
    let before = logits_of(&base, "qwen2");
    let spec = lora::LoraSpec { rank: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: vec!["all-linear".into()], layers: None, experts: false };
    let adapted = lora::attach(base, &spec, 0);
    assert_eq!(lora::count(&adapted), 14);
    let after = logits_of(&adapted, "qwen2");
    let after: Vec<f64> = after.iter().map(|&x| x as f64).collect();
    assert_eq!(max_abs_diff(&before, &after), 0.0);
}

#[test]
fn packed_rows_compute_what_separate_examples_do() {
    let device = Default::default();
    for name in ["llama", "gemma3"] {
        let model = Model::<Cpu>::load(&model_dir(name), &device).unwrap();
        let (_, ids) = reference_ids(name, "input_ids");
        let (a, b) = (&ids[..11], &ids[24..24 + 13]);
        let row: Vec<i64> = a.iter().chain(b).map(|&i| i as i64).collect();
        let positions: Vec<u32> = (0..11).chain(0..13).collect();
        let segments: Vec<u32> = [0u32; 11].into_iter().chain([1u32; 13]).collect();
        let packed = model.lm_head(model.forward_packed_hidden(
            Tensor::from_data(TensorData::new(row, [1, 24]), &device),
            &positions,
            &segments,
        ));
        let packed: Vec<f32> = packed.into_data().convert::<f32>().into_vec().unwrap();
        let vocab = model.config.vocab_size;
        let mut separate = Vec::new();
        for part in [a, b] {
            let data: Vec<i64> = part.iter().map(|&i| i as i64).collect();
            let n = data.len();
            let logits = model.forward(Tensor::from_data(TensorData::new(data, [1, n]), &device), None);
            separate.extend(logits.into_data().convert::<f32>().into_vec::<f32>().unwrap().into_iter().map(|x| x as f64));
        }
        assert_eq!(packed.len(), 24 * vocab);
        let diff = max_abs_diff(&packed, &separate);
        assert!(diff < 1e-5, "{name}: packed logits differ from separate ones by {diff:e}");
    }
}

/// A LoRA recipe on the llama fixture and the arithmetic data, writing into `out`.
fn tiny_recipe(out: &Path, extra: &str) -> Recipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"method = "lora"
[run]
name = "tiny"
output_dir = "{out}"
seed = 7
[model]
path = "{model}"
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
max_seq_len = 64
[lora]
rank = 4
alpha = 8
dropout = 0.1
targets = ["all-linear"]
[train]
steps = 10
batch_size = 2
grad_accum = 2
learning_rate = 1e-3
warmup_steps = 2
weight_decay = 0.01
log_every = 1
[eval]
every = 4
max_batches = 2
[checkpoint]
every = 3
keep_last = 2
{extra}"#,
        out = out.display(),
        model = model_dir("llama").display(),
        data = root.join("datasets/arith").display(),
    );
    Recipe::from_str(&text, &out.join("tiny.toml")).unwrap()
}

/// Burn's CPU backend draws random numbers (LoRA dropout) from one process-wide generator, so
/// training tests that must be reproducible take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn train_losses(events: &[Event]) -> Vec<(usize, f64)> {
    events.iter().filter_map(|e| match e { Event::Train { step, loss, .. } => Some((*step, *loss)), _ => None }).collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let device = Default::default();
    let tmp_a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp_a.path(), "");
    let mut whole = Recorder::default();
    let outcome = train::<Autodiff<Cpu>>(&recipe, &TrainOptions::default(), &device, &mut whole, &stop).unwrap();
    assert_eq!(outcome.steps, 10);
    let whole_losses = train_losses(&whole.events);
    assert_eq!(whole_losses.len(), 10);
    assert!(whole_losses.iter().all(|(_, l)| l.is_finite()));

    let tmp_b = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp_b.path(), "");
    let mut first = Recorder::default();
    let part = train::<Autodiff<Cpu>>(&recipe, &TrainOptions { max_steps: Some(5), ..Default::default() }, &device, &mut first, &stop).unwrap();
    assert_eq!((part.steps, part.reason.as_str()), (5, "max_steps"));
    let mut second = Recorder::default();
    let rest = train::<Autodiff<Cpu>>(&recipe, &TrainOptions { resume: true, ..Default::default() }, &device, &mut second, &stop).unwrap();
    assert_eq!(rest.steps, 10);
    let mut resumed = train_losses(&first.events);
    resumed.extend(train_losses(&second.events));
    // Step for step the same losses, bit for bit: anything the resume got wrong (data order,
    // optimizer moments, schedule, dropout, a parameter saved with less precision) shows.
    assert_eq!(resumed.len(), whole_losses.len());
    for ((sa, a), (sb, b)) in resumed.iter().zip(&whole_losses) {
        assert_eq!(sa, sb);
        assert_eq!(a.to_bits(), b.to_bits(), "step {sa}: resumed loss {a} vs uninterrupted {b}\n{resumed:?}\n{whole_losses:?}");
    }

    // Both runs export the same adapter.
    let a = WeightFiles::open_files(&[tmp_a.path().join("tiny/adapter/adapter_model.safetensors")]).unwrap();
    let b = WeightFiles::open_files(&[tmp_b.path().join("tiny/adapter/adapter_model.safetensors")]).unwrap();
    for name in a.names() {
        let shape = a.shape(name).unwrap();
        let (x, y) = (a.f32(name, &shape).unwrap(), b.f32(name, &shape).unwrap());
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{name} differs by {diff:e}");
    }
    // The run directory holds the resolved recipe and a complete event stream.
    let events = std::fs::read_to_string(tmp_b.path().join("tiny/events.jsonl")).unwrap();
    let kinds: Vec<String> = events.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    for k in ["start", "train", "eval", "checkpoint", "end"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event");
    }
    assert!(tmp_b.path().join("tiny/recipe.toml").exists());
    assert!(kiln::train::checkpoint::list(&tmp_b.path().join("tiny")).len() <= 3);
}

#[test]
fn non_finite_steps_are_rejected_until_the_run_gives_up() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    // The first update (finite loss and gradient) is accepted and throws the adapters to ~1e30;
    // every later loss is non-finite. Each such update is reverted, the step queued behind it
    // is dropped, and after `max_bad_steps` in a row the run stops with an error.
    let mut recipe = tiny_recipe(tmp.path(), "");
    recipe.train.learning_rate = 1e30;
    recipe.train.warmup_steps = 0;
    recipe.train.max_bad_steps = 3;
    let mut rec = Recorder::default();
    let err = train::<Autodiff<Cpu>>(&recipe, &TrainOptions::default(), &Default::default(), &mut rec, &stop).unwrap_err();
    assert!(matches!(err, kiln::train::TrainError::Diverged { count: 3 }), "{err}");
    let losses = train_losses(&rec.events);
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert!(losses[0].1.is_finite());
    let skipped: Vec<usize> = rec.events.iter().filter_map(|e| match e { Event::Warning { step, message } if message.contains("step skipped") => Some(*step), _ => None }).collect();
    assert_eq!(skipped, vec![1, 2, 3]);
}

#[test]
fn lora_training_lowers_the_loss_and_saves_a_loadable_adapter() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path(), "[export]\ngguf = \"q8_0\"").clone();
    let mut rec = Recorder::default();
    train::<Autodiff<Cpu>>(&recipe, &TrainOptions::default(), &Default::default(), &mut rec, &stop).unwrap();
    let evals: Vec<f64> = rec.events.iter().filter_map(|e| match e { Event::Eval { loss, .. } => Some(*loss), _ => None }).collect();
    assert!(evals.len() >= 2);
    assert!(evals.last().unwrap() < evals.first().unwrap(), "eval loss did not fall: {evals:?}");
    // The saved adapter applies through the command line.
    let adapter = tmp.path().join("tiny/adapter");
    let (code, stdout, stderr) = kiln(&["eval", "--model", model_dir("llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(),
        "--data", Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/arith/valid.jsonl").to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite() && v["tokens"].as_u64().unwrap() > 0);
    let (code, _, stderr) = kiln(&["forward", "--model", model_dir("llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--ids", "1,2,3"]);
    assert_eq!(code, 0, "{stderr}");
    // `[export] gguf` wrote the fused model as GGUF: the same file `kiln export gguf` makes
    // from the base model and the saved adapter.
    let from_run = tmp.path().join("tiny/model-q8_0.gguf");
    assert!(tmp.path().join("tiny/model-q8_0.Modelfile").exists());
    let from_cli = tmp.path().join("cli.gguf");
    let (code, _, stderr) = kiln(&["export", "gguf", "--model", model_dir("llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(),
        "--type", "q8_0", "--name", "tiny", "--out", from_cli.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read(&from_run).unwrap() == std::fs::read(&from_cli).unwrap(), "the run's GGUF differs from kiln export's");
}

#[test]
fn bf16_on_a_device_without_it_trains_in_f32_and_says_so() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let opts = TrainOptions { max_steps: Some(2), ..Default::default() };
    let run = |dtype: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let mut recipe = tiny_recipe(tmp.path(), "");
        recipe.run.dtype = dtype.into();
        let mut rec = Recorder::default();
        train::<Autodiff<Cpu>>(&recipe, &opts, &Default::default(), &mut rec, &stop).unwrap();
        rec.events
    };
    let (f32_run, bf16_run) = (run("f32"), run("bf16"));
    let dtype = |events: &[Event]| events.iter().find_map(|e| if let Event::Start { dtype, .. } = e { Some(dtype.clone()) } else { None });
    assert_eq!(dtype(&bf16_run).as_deref(), Some("f32"));
    let warnings: Vec<&String> = bf16_run.iter().filter_map(|e| if let Event::Warning { message, .. } = e { Some(message) } else { None }).collect();
    assert!(warnings.iter().any(|m| m.contains("run.dtype = \"bf16\"") && m.contains("has no bf16") && m.contains("training in f32")), "{warnings:?}");
    // And it is the f32 run, bit for bit.
    assert_eq!(train_losses(&bf16_run), train_losses(&f32_run));
}

#[test]
fn existing_run_is_not_overwritten_silently() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path(), "");
    let opts = TrainOptions { max_steps: Some(1), ..Default::default() };
    train::<Autodiff<Cpu>>(&recipe, &opts, &Default::default(), &mut Recorder::default(), &stop).unwrap();
    let err = train::<Autodiff<Cpu>>(&recipe, &opts, &Default::default(), &mut Recorder::default(), &stop).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[test]
fn every_shipped_recipe_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stdout, stderr) = kiln(&["recipe", "check", path.to_str().unwrap()]);
            if code != 0 && stderr.contains("runs/") && stderr.contains("/final") {
                // lora-sft, grpo and distill start from earlier recipes' outputs, which exist
                // only after those ran: check the rest against a model directory that exists.
                let text = ["quickstart", "lora-sft"]
                    .iter()
                    .fold(std::fs::read_to_string(&path).unwrap(), |t, run| t.replace(&format!("../runs/{run}/final"), "../tests/fixtures/models/arith-256"));
                let copy = dir.join(format!(".check-{}", path.file_name().unwrap().to_string_lossy()));
                std::fs::write(&copy, text).unwrap();
                let (code, _, stderr) = kiln(&["recipe", "check", copy.to_str().unwrap()]);
                std::fs::remove_file(&copy).unwrap();
                assert_eq!(code, 0, "{}: {stderr}", path.display());
            } else {
                assert_eq!(code, 0, "{}: {stderr}", path.display());
                assert!(stdout.contains("ok"));
            }
            n += 1;
        }
    }
    assert!(n >= 3, "expected quickstart, lora-sft and chat-sft recipes");
}

#[test]
fn bad_recipe_names_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, "method = \"lora\"\n[lora]\nrnak = 8\n").unwrap();
    let (code, _, stderr) = kiln(&["recipe", "check", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains(&format!("{}:3:1", path.display())), "{stderr}");
    assert!(stderr.contains("did you mean `rank`"), "{stderr}");
}

#[test]
fn bad_dataset_line_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\":\"1+1=\",\"completion\":\"2\"}\n{\"prompt\": \"2+2=\"\n").unwrap();
    let (code, _, stderr) = kiln(&["eval", "--model", model_dir("llama").to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("bad.jsonl") && stderr.contains("line 2"), "{stderr}");
}

#[test]
fn peft_loads_a_kiln_adapter_when_installed() {
    let _serial = serial();
    let has_peft = std::process::Command::new("python3").args(["-c", "import peft, transformers, torch"]).output().is_ok_and(|o| o.status.success());
    if !has_peft {
        eprintln!("python3 with peft/transformers/torch not installed: skipping the PEFT interop check");
        return;
    }
    let stop = AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path(), "");
    train::<Autodiff<Cpu>>(&recipe, &TrainOptions::default(), &Default::default(), &mut Recorder::default(), &stop).unwrap();
    let adapter = tmp.path().join("tiny/adapter");
    let out = tmp.path().join("kiln_logits.safetensors");
    let (code, _, stderr) = kiln(&["forward", "--model", model_dir("llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--ids", "5,6,7,8,9", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let script = format!(
        r#"
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.float32)
model = PeftModel.from_pretrained(base, "{adapter}").eval()
with torch.no_grad():
    logits = model(torch.tensor([[5,6,7,8,9]])).logits
ours = load_file("{out}")["logits"]
print(float((logits - ours).abs().max()))
"#,
        base = model_dir("llama").display(),
        adapter = adapter.display(),
        out = out.display()
    );
    let r = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diff: f64 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    eprintln!("PEFT vs kiln logits with a kiln-trained adapter: max |Δ| = {diff:e}");
    assert!(diff < 1e-4, "PEFT logits differ from kiln's by {diff:e}");

    // And the fused model loads in transformers and computes what kiln computes.
    let fused = tmp.path().join("fused");
    let (code, _, stderr) = kiln(&["fuse", "--model", model_dir("llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", fused.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let script = format!(
        r#"
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{fused}", dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([[5,6,7,8,9]])).logits
print(float((logits - load_file("{out}")["logits"]).abs().max()))
"#,
        fused = fused.display(),
        out = out.display()
    );
    let r = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diff: f64 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    eprintln!("transformers on the fused directory vs kiln with the adapter: max |Δ| = {diff:e}");
    assert!(diff < 1e-4, "fused model in transformers differs by {diff:e}");
}

/// Rows longer than the model's context (the fixture's 256 positions) are trained with a
/// warning; a long `max_seq_len` over short examples says nothing.
#[test]
fn examples_beyond_the_context_length_are_a_warning() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    let opts = TrainOptions { max_steps: Some(1), ..Default::default() };
    let run = |long: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let mut recipe = tiny_recipe(tmp.path(), "");
        recipe.data.max_seq_len = 400;
        if long {
            let line = serde_json::json!({ "text": "12+34=46 ".repeat(80) }).to_string();
            let path = tmp.path().join("long.jsonl");
            std::fs::write(&path, format!("{line}\n{line}\n")).unwrap();
            recipe.data.train = path;
        }
        let mut rec = Recorder::default();
        train::<Autodiff<Cpu>>(&recipe, &opts, &Default::default(), &mut rec, &stop).unwrap();
        rec.events.into_iter().filter_map(|e| if let Event::Warning { message, .. } = e { Some(message) } else { None }).collect::<Vec<_>>()
    };
    let beyond = |w: &[String]| w.iter().any(|m| m.contains("beyond the model's context length 256"));
    assert!(beyond(&run(true)), "{:?}", run(true));
    assert!(!beyond(&run(false)));
}
