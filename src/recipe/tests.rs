use std::path::{Path, PathBuf};

use super::*;

/// A temp dir holding `train.jsonl` and `model/`, and the recipe path `dir/x.toml`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"hi\"}\n").unwrap();
        std::fs::create_dir(dir.path().join("model")).unwrap();
        Self { dir }
    }

    fn recipe_path(&self) -> PathBuf {
        self.dir.path().join("x.toml")
    }

    fn parse(&self, text: &str) -> Result<Recipe, RecipeError> {
        Recipe::from_str(text, &self.recipe_path())
    }

    fn err(&self, text: &str) -> RecipeError {
        match self.parse(text) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }
}

const MINIMAL: &str = "[model]\npath = \"model\"\n\n[data]\ntrain = \"train.jsonl\"\n";

fn line_col(e: &RecipeError) -> (usize, usize) {
    let at = e.location().unwrap();
    (at.line, at.column)
}

#[test]
fn minimal_recipe_gets_defaults() {
    let f = Fixture::new();
    let r = f.parse(MINIMAL).unwrap();
    let dir = std::path::absolute(f.dir.path()).unwrap();
    assert_eq!(r.path, f.recipe_path());
    assert_eq!(r.method, Method::Lora);
    assert_eq!(r.run.name, "x");
    assert_eq!(r.run.output_dir, PathBuf::from("runs"));
    assert_eq!(r.run_dir(), Path::new("runs").join("x"));
    assert_eq!(r.model.path.as_deref(), Some(dir.join("model").as_path()));
    assert_eq!(r.data.train, dir.join("train.jsonl"));
    assert_eq!(r.data, DataSection { train: dir.join("train.jsonl"), ..DataSection::default() });
    assert_eq!(r.lora, LoraSection::default());
    assert_eq!(r.lora.targets, ["q_proj", "k_proj", "v_proj", "o_proj"]);
    assert_eq!(r.train, TrainSection::default());
    assert_eq!(r.train.lr_schedule, Schedule::Cosine);
    assert_eq!(r.eval, EvalSection::default());
    assert_eq!(r.checkpoint, CheckpointSection::default());
    assert_eq!(r.export, ExportSection::default());
}

#[test]
fn relative_data_path_resolves_against_recipe_dir() {
    let f = Fixture::new();
    std::fs::create_dir(f.dir.path().join("data")).unwrap();
    std::fs::write(f.dir.path().join("data/valid.jsonl"), "").unwrap();
    let sub = f.dir.path().join("recipes");
    std::fs::create_dir(&sub).unwrap();
    let text = "[model]\npath = \"../model\"\n[data]\ntrain = \"../train.jsonl\"\nvalid = \"../data/valid.jsonl\"\n";
    let r = Recipe::from_str(text, &sub.join("r.toml")).unwrap();
    let sub = std::path::absolute(&sub).unwrap();
    assert_eq!(r.data.train, sub.join("../train.jsonl"));
    assert_eq!(r.data.valid, Some(sub.join("../data/valid.jsonl")));
    assert!(r.data.train.is_file());
    // output_dir stays relative to the working directory.
    assert_eq!(r.run_dir(), Path::new("runs/r"));
    // An absolute path is kept as it is.
    let abs = f.dir.path().join("train.jsonl");
    let text = format!("[model]\npath = \"../model\"\n[data]\ntrain = {:?}\n", abs.to_str().unwrap());
    let r = Recipe::from_str(&text, &sub.join("r.toml")).unwrap();
    assert_eq!(r.data.train, abs);
}

#[test]
fn load_reads_the_file_and_names_an_unreadable_one() {
    let f = Fixture::new();
    std::fs::write(f.recipe_path(), MINIMAL).unwrap();
    assert_eq!(Recipe::load(&f.recipe_path()).unwrap(), f.parse(MINIMAL).unwrap());
    let missing = f.dir.path().join("nope.toml");
    let e = Recipe::load(&missing).unwrap_err();
    assert!(matches!(e, RecipeError::Read { .. }));
    assert!(e.to_string().starts_with(&format!("{}: cannot read recipe", missing.display())), "{e}");
}

#[test]
fn to_toml_round_trips() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("test.jsonl"), "").unwrap();
    let text = r#"
method = "lora"
[run]
name = "demo"
seed = 7
[model]
path = "model"
[data]
train = "train.jsonl"
test = "test.jsonl"
format = "chat"
train_on = "all"
[lora]
rank = 4
alpha = 8
targets = ["all-linear"]
layers = [1, 3]
[train]
learning_rate = 3e-4
lr_schedule = "linear"
eps = 1e-8
"#;
    let r = f.parse(text).unwrap();
    let shown = r.to_toml();
    let back = Recipe::from_str(&shown, &r.path).unwrap();
    assert_eq!(back, r, "{shown}");
    // Every default is written out.
    for key in ["valid_fraction", "max_bad_steps", "early_stop_patience", "fused", "dtype", "output_dir"] {
        assert!(shown.contains(key), "{key} missing from\n{shown}");
    }
    // Absolute paths: the copy in runs/NAME/recipe.toml reads back the same from elsewhere.
    let elsewhere = f.dir.path().join("runs/demo");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let copy = Recipe::from_str(&shown, &elsewhere.join("recipe.toml")).unwrap();
    assert_eq!(copy.data, r.data);
    assert_eq!(copy.run, r.run);

    // And a fresh model (method = full) round-trips too.
    let text = "method = \"full\"\n[model.init]\narch = \"qwen3\"\n[data]\ntrain = \"train.jsonl\"\n";
    let r = f.parse(text).unwrap();
    assert_eq!(r.model.init, Some(InitSection { arch: "qwen3".into(), ..InitSection::default() }));
    assert_eq!(Recipe::from_str(&r.to_toml(), &r.path).unwrap(), r);
}

#[test]
fn unknown_key_suggests_and_points_at_it() {
    let f = Fixture::new();
    let text = format!("{MINIMAL}\n[lora]\nrnak = 4\n");
    let e = f.err(&text);
    assert_eq!(line_col(&e), (8, 1));
    assert_eq!(e.key(), Some("lora.rnak"));
    let msg = e.to_string();
    let want = format!("{}:8:1: lora.rnak: unknown key; did you mean `rank`? (valid keys: rank, alpha,", f.recipe_path().display());
    assert!(msg.starts_with(&want), "{msg}");

    // Top-level: sections are the valid keys.
    let e = f.err(&format!("{MINIMAL}[trian]\nsteps = 1\n"));
    assert!(e.to_string().contains("trian: unknown key; did you mean `train`?"), "{e}");
    assert_eq!(line_col(&e), (6, 2));

    // Nothing close: no suggestion, still the list.
    let e = f.err(&format!("{MINIMAL}[train]\n  zzz = 1\n"));
    assert_eq!(line_col(&e), (7, 3));
    let msg = e.to_string();
    assert!(msg.contains("train.zzz: unknown key (valid keys: steps,"), "{msg}");

    // A transformers name gets the kiln name.
    let e = f.err(&format!("{MINIMAL}[lora]\nlora_alpha = 4\n"));
    assert!(e.to_string().contains("did you mean `alpha`?"), "{e}");

    // Inline and dotted tables are located too.
    let e = f.err(&format!("{MINIMAL}[train]\nlearning_rat = 1e-3\n"));
    assert!(e.to_string().contains("train.learning_rat: unknown key; did you mean `learning_rate`?"), "{e}");
    let e = f.err(&format!("lora = {{ rank = 2, dropuot = 0.1 }}\n{MINIMAL}"));
    assert_eq!(e.key(), Some("lora.dropuot"));
    assert_eq!(line_col(&e), (1, 20));
}

#[test]
fn wrong_type() {
    let f = Fixture::new();
    let e = f.err(&format!("{MINIMAL}[lora]\nrank = \"eight\"\n"));
    assert!(matches!(e, RecipeError::WrongType { .. }), "{e:?}");
    assert_eq!(e.key(), Some("lora.rank"));
    assert_eq!(line_col(&e), (7, 8));
    let msg = e.to_string();
    assert!(msg.ends_with("lora.rank: wrong type: expected a non-negative integer, found string \"eight\""), "{msg}");

    let e = f.err(&format!("{MINIMAL}[data]\npacking = 1\n"));
    // data appears twice: a duplicate table is a TOML error in its own right.
    assert!(matches!(e, RecipeError::Syntax { .. }), "{e:?}");

    let e = f.err(&format!("{MINIMAL}[train]\nlearning_rate = \"fast\"\n"));
    assert!(e.to_string().contains("train.learning_rate: wrong type: expected a number"), "{e}");
    let e = f.err(&format!("{MINIMAL}[lora]\ntargets = [\"q_proj\", 3]\n"));
    assert_eq!(e.key(), Some("lora.targets[1]"));
    let e = f.err(&format!("{MINIMAL}[lora]\nlayers = [0, 2, 4]\n"));
    assert!(e.to_string().contains("lora.layers: wrong type: expected an array of two layer indices"), "{e}");
    let e = f.err(&format!("lora = 3\n{MINIMAL}"));
    assert!(e.to_string().contains("lora: wrong type: expected a table"), "{e}");
    let e = f.err(&format!("{MINIMAL}[train]\nlr_schedule = \"cosin\"\n"));
    assert!(e.to_string().contains("train.lr_schedule: unknown value `cosin`; did you mean `cosine`?"), "{e}");
    let e = f.err(&format!("{MINIMAL}[train]\nsteps = -3\n"));
    assert!(e.to_string().contains("train.steps: expected a non-negative integer, found integer `-3`"), "{e}");
}

#[test]
fn out_of_range() {
    let f = Fixture::new();
    let cases = [
        ("[lora]\nrank = 0\n", "lora.rank", "expected an integer > 0, found 0"),
        ("[lora]\nrank = 65537\n", "lora.rank", "expected an integer from 1 to 65536, found 65537"),
        ("[train]\nbatch_size = 16777217\n", "train.batch_size", "expected an integer from 1 to 16777216, found 16777217"),
        ("[lora]\ndropout = 1.0\n", "lora.dropout", "expected a number in [0, 1), found 1"),
        ("[lora]\ntargets = [\"q_prj\"]\n", "lora.targets", "did you mean `q_proj`?"),
        ("[lora]\nlayers = [3, 3]\n", "lora.layers", "start < end"),
        ("[train]\nlearning_rate = 0\n", "train.learning_rate", "expected a finite number > 0, found 0"),
        ("[train]\nlearning_rate = nan\n", "train.learning_rate", "found NaN"),
        ("[train]\nbeta2 = 1.0\n", "train.beta2", "[0, 1)"),
        ("[train]\nsteps = 10\nwarmup_steps = 20\n", "train.warmup_steps", "at most train.steps = 10"),
        ("[run]\ndtype = \"f16\"\n", "run.dtype", "f16 training is not available"),
        ("[run]\ndtype = \"fp32\"\n", "run.dtype", "expected \"f32\" or \"bf16\", found \"fp32\""),
        ("[run]\ndevice = \"tpu\"\n", "run.device", "unknown device `tpu`"),
        ("[run]\nname = \"a/b\"\n", "run.name", "plain directory name"),
        ("[checkpoint]\nearly_stop_patience = 3\n[eval]\nevery = 0\n", "checkpoint.early_stop_patience", "eval.every"),
    ];
    for (extra, key, needle) in cases {
        let e = f.err(&format!("{MINIMAL}{extra}"));
        assert_eq!(e.key(), Some(key), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
        // Points at the key, which is on line 7 (after a section header on line 6).
        let want_line = if key == "train.warmup_steps" { 8 } else { 7 };
        assert_eq!(line_col(&e), (want_line, 1), "{e}");
    }
    let e = f.err(&format!("{MINIMAL}[data]\n"));
    assert!(matches!(e, RecipeError::Syntax { .. }));
    let e = f.err("[model]\npath = \"model\"\n[data]\ntrain = \"train.jsonl\"\nvalid_fraction = 0.7\n");
    assert_eq!(line_col(&e), (5, 1));
    assert!(e.to_string().ends_with("data.valid_fraction: expected a number in [0, 0.5], found 0.7"), "{e}");

    let init = "method = \"full\"\n[data]\ntrain = \"train.jsonl\"\n[model.init]\n";
    let e = f.err(&format!("{init}hidden_size = 100\nnum_heads = 3\n"));
    assert_eq!(e.key(), Some("model.init.num_heads"));
    assert_eq!(line_col(&e), (6, 1));
    let e = f.err(&format!("{init}num_kv_heads = 3\n"));
    assert!(e.to_string().contains("expected a divisor of num_heads = 4, found 3"), "{e}");
    let e = f.err(&format!("{init}arch = \"lama\"\n"));
    assert!(e.to_string().contains("did you mean `llama`?"), "{e}");
    let e = f.err(&format!("{init}num_layers = 0\n"));
    assert_eq!(e.key(), Some("model.init.num_layers"));
}

#[test]
fn missing_train_key() {
    let f = Fixture::new();
    let e = f.err("[model]\npath = \"model\"\n\n[data]\nformat = \"text\"\n");
    assert!(matches!(e, RecipeError::MissingKey { .. }), "{e:?}");
    assert_eq!(e.key(), Some("data.train"));
    // Points at the [data] header.
    assert_eq!(line_col(&e), (4, 1));
    assert!(e.to_string().contains("data.train: missing key"), "{e}");
    // No [data] at all: start of the file.
    let e = f.err("[model]\npath = \"model\"\n");
    assert_eq!(e.key(), Some("data.train"));
    assert_eq!(line_col(&e), (1, 1));
    let e = f.err("[data]\ntrain = \"train.jsonl\"\n");
    assert_eq!(e.key(), Some("model.path"));
}

#[test]
fn missing_file_names_both_paths() {
    let f = Fixture::new();
    let e = f.err("[model]\npath = \"model\"\n[data]\ntrain = \"nope.jsonl\"\n");
    let RecipeError::MissingFile { written, resolved, .. } = &e else { panic!("{e:?}") };
    assert_eq!(written, Path::new("nope.jsonl"));
    assert_eq!(resolved, &std::path::absolute(f.dir.path()).unwrap().join("nope.jsonl"));
    assert_eq!(line_col(&e), (4, 1));
    let msg = e.to_string();
    assert!(msg.contains("data.train: file not found: `nope.jsonl` (resolved to `"), "{msg}");
    let e = f.err("[model]\npath = \"~/models/x\"\n[data]\ntrain = \"train.jsonl\"\n");
    assert_eq!(e.key(), Some("model.path"));
    assert!(e.to_string().contains("`~` is not expanded"), "{e}");
    // A file where a model directory belongs.
    let e = f.err("[model]\npath = \"train.jsonl\"\n[data]\ntrain = \"train.jsonl\"\n");
    assert!(e.to_string().contains("expected a model directory"), "{e}");
}

#[test]
fn syntax_error_has_line_and_column() {
    let f = Fixture::new();
    let e = f.err("[model]\npath = \"model\"\n[data\ntrain = 1\n");
    assert!(matches!(e, RecipeError::Syntax { .. }), "{e:?}");
    assert_eq!(line_col(&e), (3, 6));
    let e = f.err("[lora]\nrank = \n");
    assert_eq!(line_col(&e).0, 2);
    assert!(e.to_string().starts_with(&format!("{}:2:", f.recipe_path().display())), "{e}");
}

#[test]
fn lora_with_init_is_rejected() {
    let f = Fixture::new();
    let e = f.err("method = \"lora\"\n[model.init]\nhidden_size = 64\n[data]\ntrain = \"train.jsonl\"\n");
    assert_eq!(e.key(), Some("method"));
    assert_eq!(line_col(&e), (1, 1));
    assert!(e.to_string().contains("use method = \"full\""), "{e}");
    let e = f.err("[model]\npath = \"model\"\n[model.init]\n[data]\ntrain = \"train.jsonl\"\n");
    assert!(e.to_string().contains("not both"), "{e}");
}

#[test]
fn hostile_input_never_panics() {
    let f = Fixture::new();
    for text in [
        "", "\u{feff}", "=", "[", "[[lora]]\n", "lora = []\n", "a.b.c.d = 1\n", "[model]\npath = 3\n",
        "[model.init]\narch = 1\n", "method = 5\n", "method = \"fulll\"\n", "[lora]\nlayers = \"1..2\"\n",
        "[lora]\nlayers = [-1, 2]\n", "[run]\nseed = 1e3\n", "\u{e9}\u{e9} = \"\u{e9}\"\n",
        "[train]\nsteps = 99999999999999999999999\n", "[data]\ntrain = \"\"\n", "x = 1979-05-27T07:32:00Z\n",
    ] {
        let _ = f.parse(text).map(|r| r.to_toml());
        let _ = Recipe::from_str(text, Path::new(""));
    }
}

#[test]
fn grpo_and_distill_sections_are_checked_and_read_back() {
    let f = Fixture::new();
    let grpo = "method = \"grpo\"\n[model]\npath = \"model\"\n[data]\ntrain = \"train.jsonl\"\n[grpo]\ngroup_size = 4\nepsilon_high = 0.28\n[[grpo.rewards]]\ntype = \"exact_match\"\nextract = \"= *(\\\\d+)\"\n[[grpo.rewards]]\ntype = \"command\"\nargv = [\"python3\", \"score.py\"]\nweight = 0.5\n";
    let r = f.parse(grpo).unwrap();
    assert!(r.trains_lora());
    let g = r.grpo.as_ref().unwrap();
    assert_eq!((g.group_size, g.epsilon_high, g.rewards.len()), (4, Some(0.28), 2));
    assert_eq!(g.loss_type, crate::train::grpo::LossType::Dapo);
    assert_eq!(Recipe::from_str(&r.to_toml(), &r.path).unwrap(), r);

    // Each mistake names its key and line.
    let e = f.err(&grpo.replace("group_size = 4", "group_size = 1"));
    assert_eq!((e.key(), line_col(&e).0), (Some("grpo.group_size"), 7));
    let e = f.err(&grpo.replace("type = \"exact_match\"", "type = \"exact_macth\""));
    assert!(e.to_string().contains("exact_macth"), "{e}");
    let e = f.err(&grpo.replace("\"= *(\\\\d+)\"", "\"(unclosed\""));
    assert!(e.key() == Some("grpo.rewards") && e.to_string().contains("reward 0 (exact_match)"), "{e}");
    let e = f.err(&grpo.replace("argv = [\"python3\", \"score.py\"]", "argv = []"));
    assert!(e.to_string().contains("`argv` is empty"), "{e}");
    let no_rewards = "method = \"grpo\"\n[model]\npath = \"model\"\n[data]\ntrain = \"train.jsonl\"\n[grpo]\ngroup_size = 4\n";
    assert_eq!(f.err(no_rewards).key(), Some("grpo.rewards"));
    let e = f.err(&format!("{MINIMAL}[grpo]\ngroup_size = 4\n"));
    assert!(e.key() == Some("grpo") && e.to_string().contains("needs method = \"grpo\""), "{e}");
    let e = f.err(&format!("weights = \"full\"\n{MINIMAL}"));
    assert_eq!(e.key(), Some("weights"));

    // Distillation: a teacher is required and must exist; the numbers have ranges.
    let distill = "method = \"distill\"\nweights = \"full\"\n[model]\npath = \"model\"\n[data]\ntrain = \"train.jsonl\"\n[distill]\nteacher = \"model\"\nbeta = 0.5\n";
    let r = f.parse(distill).unwrap();
    assert!(!r.trains_lora());
    assert_eq!(r.distill.as_ref().unwrap().teacher, std::path::absolute(f.dir.path().join("model")).unwrap());
    assert_eq!(Recipe::from_str(&r.to_toml(), &r.path).unwrap(), r);
    let e = f.err(&distill.replace("teacher = \"model\"", "teacher = \"nope\""));
    assert!(matches!(e, RecipeError::MissingFile { .. }) && e.key() == Some("distill.teacher"), "{e}");
    let e = f.err(&distill.replace("beta = 0.5", "beta = 1.5"));
    assert_eq!((e.key(), line_col(&e).0), (Some("distill.beta"), 9));
    let e = f.err(&distill.replace("beta = 0.5", "teacher_quantize = \"q4_g46\""));
    assert!(e.to_string().contains("did you mean \"q4_g64\""), "{e}");
    let e = f.err("method = \"distill\"\n[model]\npath = \"model\"\n[data]\ntrain = \"train.jsonl\"\n");
    assert_eq!(e.key(), Some("distill.teacher"));
    // A quantised base cannot train every weight, whichever method says so.
    let e = f.err(&distill.replace("path = \"model\"", "path = \"model\"\nquantize = \"q4_g64\""));
    assert_eq!(e.key(), Some("model.quantize"));
}
