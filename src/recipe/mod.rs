//! Training recipes: one TOML file describes one training run.
//!
//! Two stages, as ripgrep does with its low- and high-level arguments. First the text is
//! deserialised into the structs of [`schema`], which reject unknown keys and fill defaults.
//! Then [`Recipe::from_str`] validates those same structs in place: ranges, cross-key rules,
//! and paths in `[model]` / `[data]` resolved against the recipe file's directory, so that
//! `kiln train recipes/x.toml` works from anywhere. Every error names the file, `line:column`,
//! the dotted key and what was expected (see [`RecipeError`]); `recipes/README.md` documents
//! every key.

mod error;
mod schema;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::DeviceSpec;
use crate::quant::affine::QuantSpec;
use error::{Source, from_toml, suggest};

pub use error::{Location, RecipeError};
pub use schema::{
    ALL_LINEAR, CheckpointSection, DataFormat, DataSection, DistillSection, EvalSection,
    ExportSection, GrpoSection, INIT_ARCHS, InitSection, LORA_TARGETS, LoraSection, Method,
    ModelSection, ProbesSection, RunSection, Schedule, TrainOn, TrainSection, Weights,
};

/// A parsed and validated recipe. Paths in `model` and `data` are absolute (resolved against
/// the recipe's directory); `run.output_dir` is as written, relative to the working directory.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// The recipe file. Not a key of the file.
    #[serde(skip)]
    pub path: PathBuf,
    pub method: Method,
    /// What `method = "grpo"` / `"distill"` trains; the SFT methods say it in their name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub lora: LoraSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    pub probes: ProbesSection,
    pub export: ExportSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GrpoSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSection>,
}

impl Recipe {
    /// Reads, parses and validates; relative paths in the recipe become paths relative to the
    /// recipe file's directory (so `kiln train recipes/x.toml` works from the repo root).
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates `text` as if read from `path` (which names errors, supplies the
    /// default run name and anchors relative paths; it need not exist).
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
        let src = Source { text, path };
        // Syntax first, so that a broken file reports the syntax error and not a type error.
        if let Err(e) = toml::de::DeTable::parse(text) {
            let span = e.span().unwrap_or(0..0);
            let mut message = e.message().trim().to_string();
            // toml says only "duplicate key"; the span holds the key's name.
            if let Some(name) = text.get(span.clone()).filter(|n| !n.is_empty() && message == "duplicate key") {
                message = format!("duplicate key `{name}` (each key and table may appear once)");
            }
            return Err(RecipeError::Syntax { at: src.location(span.start), message });
        }
        let mut recipe: Recipe = toml::from_str(text).map_err(|e| from_toml(&src, &e))?;
        recipe.path = path.to_path_buf();
        Validator { src }.validate(&mut recipe)?;
        Ok(recipe)
    }

    /// The resolved recipe as TOML with every default filled in (what `kiln recipe show`
    /// prints and what a run copies to runs/NAME/recipe.toml). Paths are absolute, so the copy
    /// reads back the same from wherever it is.
    pub fn to_toml(&self) -> String {
        // Paths came from TOML strings joined to the recipe's directory; only a recipe directory
        // that is not UTF-8 can make this fail, and then the reason is better than nothing.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# kiln: cannot write this recipe as TOML: {e}\n"))
    }

    /// Whether the run trains LoRA adapters (rather than every weight).
    pub fn trains_lora(&self) -> bool {
        match self.method {
            Method::Lora => true,
            Method::Full => false,
            Method::Grpo | Method::Distill => self.weights != Some(Weights::Full),
        }
    }

    /// The run's directory: `run.output_dir / run.name`.
    pub fn run_dir(&self) -> PathBuf {
        self.run.output_dir.join(&self.run.name)
    }
}

struct Validator<'a> {
    src: Source<'a>,
}

type Check = Result<(), RecipeError>;

impl Validator<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> RecipeError {
        RecipeError::Invalid { at: self.src.locate(key), key: key.into(), message: message.into() }
    }

    fn missing(&self, key: &str, message: impl Into<String>) -> RecipeError {
        RecipeError::MissingKey { at: self.src.locate(key), key: key.into(), message: message.into() }
    }

    /// A count or size: at least 1, and at most 2^24, past any real need; products of such
    /// values (tokens a step, bytes a plan) must not overflow.
    fn positive(&self, key: &str, v: usize) -> Check {
        self.count(key, v, 1 << 24)
    }

    fn count(&self, key: &str, v: usize, limit: usize) -> Check {
        match v {
            0 => Err(self.invalid(key, "expected an integer > 0, found 0")),
            v if v > limit => Err(self.invalid(key, format!("expected an integer from 1 to {limit}, found {v}"))),
            _ => Ok(()),
        }
    }

    /// `v` in `[lo, hi]`, or `[lo, hi)` when `hi_open`; NaN and infinities fail.
    fn range(&self, key: &str, v: f64, lo: f64, hi: f64, hi_open: bool) -> Check {
        let ok = v.is_finite() && v >= lo && if hi_open { v < hi } else { v <= hi };
        if ok {
            return Ok(());
        }
        let close = if hi_open { ')' } else { ']' };
        Err(self.invalid(key, format!("expected a number in [{lo}, {hi}{close}, found {v}")))
    }

    fn above(&self, key: &str, v: f64, lo: f64, inclusive: bool) -> Check {
        let ok = v.is_finite() && if inclusive { v >= lo } else { v > lo };
        if ok {
            return Ok(());
        }
        let op = if inclusive { ">=" } else { ">" };
        Err(self.invalid(key, format!("expected a finite number {op} {lo}, found {v}")))
    }

    /// Resolves `p` against the recipe's directory and checks that it exists.
    fn resolve(&self, key: &str, p: &Path, want_dir: bool) -> Result<PathBuf, RecipeError> {
        if p.as_os_str().is_empty() {
            return Err(self.invalid(key, "expected a path, found an empty string"));
        }
        let dir = self.src.path.parent().unwrap_or(Path::new(""));
        let joined = dir.join(p);
        // Absolute, so that to_toml's output reads back to the same paths from any directory.
        let resolved = std::path::absolute(&joined).unwrap_or(joined);
        let meta = match std::fs::metadata(&resolved) {
            Ok(m) => m,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(self.invalid(key, format!("cannot access `{}`: {e}", resolved.display())));
            }
            Err(_) => {
                return Err(RecipeError::MissingFile {
                    at: self.src.locate(key),
                    key: key.into(),
                    written: p.to_path_buf(),
                    resolved,
                });
            }
        };
        if want_dir && !meta.is_dir() {
            return Err(self.invalid(key, format!("expected a model directory, `{}` is a file", resolved.display())));
        }
        if !want_dir && meta.is_dir() {
            return Err(self.invalid(key, format!("expected a file, `{}` is a directory", resolved.display())));
        }
        Ok(resolved)
    }

    fn validate(&self, r: &mut Recipe) -> Check {
        self.run(r)?;
        self.model(r)?;
        self.data(&mut r.data)?;
        self.lora(&r.lora)?;
        self.train(&r.train)?;
        self.eval(&r.eval)?;
        self.checkpoint(r)?;
        if r.probes.every > 0 {
            self.positive("probes.examples", r.probes.examples)?;
        }
        self.export(&r.export)?;
        self.methods(r)
    }

    /// `weights`, `[grpo]` and `[distill]` belong to their methods.
    fn methods(&self, r: &mut Recipe) -> Check {
        let rl = matches!(r.method, Method::Grpo | Method::Distill);
        if r.weights.is_some() && !rl {
            return Err(self.invalid(
                "weights",
                format!("method = \"{}\" already says what trains; `weights` is for method = \"grpo\" or \"distill\"", r.method),
            ));
        }
        if r.grpo.is_some() && r.method != Method::Grpo {
            return Err(self.invalid("grpo", format!("a [grpo] table needs method = \"grpo\", found method = \"{}\"", r.method)));
        }
        if r.distill.is_some() && r.method != Method::Distill {
            return Err(self.invalid("distill", format!("a [distill] table needs method = \"distill\", found method = \"{}\"", r.method)));
        }
        match r.method {
            Method::Grpo => {
                let Some(g) = &r.grpo else {
                    return Err(self.missing("grpo.rewards", "method = \"grpo\" needs a [grpo] table with at least one [[grpo.rewards]] entry"));
                };
                self.grpo(g)?;
                if r.model.init.is_some() {
                    return Err(self.invalid(
                        "model.init",
                        "GRPO improves a model that already answers sometimes; a fresh [model.init] model earns no reward: set model.path",
                    ));
                }
                Ok(())
            }
            Method::Distill => {
                let Some(d) = r.distill.as_mut() else {
                    return Err(self.missing("distill.teacher", "method = \"distill\" needs a [distill] table naming the teacher"));
                };
                if d.teacher.as_os_str().is_empty() {
                    return Err(self.missing("distill.teacher", "expected distill.teacher, the teacher's model directory"));
                }
                d.teacher = self.resolve("distill.teacher", &d.teacher.clone(), true)?;
                let d = d.clone();
                self.distill(&d)
            }
            Method::Lora | Method::Full => Ok(()),
        }
    }

    fn grpo(&self, g: &GrpoSection) -> Check {
        if g.group_size < 2 {
            return Err(self.invalid(
                "grpo.group_size",
                format!("expected an integer >= 2 (advantages compare completions of one prompt), found {}", g.group_size),
            ));
        }
        self.positive("grpo.max_completion_length", g.max_completion_length)?;
        self.above("grpo.temperature", g.temperature, 0.0, false)?;
        self.range("grpo.top_p", g.top_p, 0.0, 1.0, false)?;
        if g.top_p == 0.0 {
            return Err(self.invalid("grpo.top_p", "expected a number in (0, 1], found 0"));
        }
        self.range("grpo.epsilon", g.epsilon, 0.0, 1.0, true)?;
        if let Some(e) = g.epsilon_high {
            self.above("grpo.epsilon_high", e, 0.0, true)?;
        }
        self.above("grpo.beta", g.beta, 0.0, true)?;
        self.positive("grpo.num_iterations", g.num_iterations)?;
        if g.rewards.is_empty() {
            return Err(self.missing("grpo.rewards", "expected at least one [[grpo.rewards]] entry (for example type = \"exact_match\")"));
        }
        for (i, c) in g.rewards.iter().enumerate() {
            if !c.weight().is_finite() {
                return Err(self.invalid("grpo.rewards", format!("reward {i} ({}): weight must be a finite number, found {}", c.kind(), c.weight())));
            }
        }
        crate::reward::Rewards::new(&g.rewards).map(drop).map_err(|e| self.invalid("grpo.rewards", e.to_string()))
    }

    fn distill(&self, d: &DistillSection) -> Check {
        if let Some(q) = &d.teacher_quantize {
            self.quantize("distill.teacher_quantize", q)?;
        }
        self.range("distill.beta", d.beta, 0.0, 1.0, false)?;
        self.above("distill.temperature", d.temperature, 0.0, false)?;
        self.range("distill.ce_weight", d.ce_weight, 0.0, 1.0, false)?;
        self.range("distill.lmbda", d.lmbda, 0.0, 1.0, false)?;
        self.positive("distill.max_new_tokens", d.max_new_tokens)?;
        self.positive("distill.chunk_size", d.chunk_size)
    }

    fn quantize(&self, key: &str, q: &str) -> Check {
        if QuantSpec::parse(q).is_some() {
            return Ok(());
        }
        let names: Vec<&str> = QuantSpec::NAMES.split(", ").collect();
        let mut message = format!("unknown quantisation {q:?}: expected one of {}", QuantSpec::NAMES);
        if let Some(s) = suggest(q, names.iter().copied()) {
            message.push_str(&format!(" (did you mean {s:?}?)"));
        }
        Err(self.invalid(key, message))
    }

    fn export(&self, e: &ExportSection) -> Check {
        match e.gguf.as_deref() {
            Some(t) if crate::gguf::FileType::parse(t).is_none() => Err(self.invalid("export.gguf", crate::gguf::FileType::explain_unknown(t))),
            _ => Ok(()),
        }
    }

    fn run(&self, r: &mut Recipe) -> Check {
        let run = &mut r.run;
        if run.name.is_empty() {
            run.name = match self.src.path.file_stem().and_then(|s| s.to_str()) {
                Some(stem) if !stem.is_empty() => stem.to_string(),
                _ => return Err(self.missing("run.name", "the recipe file has no usable stem; set run.name")),
            };
        }
        // The name becomes one directory under output_dir.
        if run.name == "." || run.name == ".." || run.name.contains(['/', '\\']) {
            return Err(self.invalid(
                "run.name",
                format!("expected a plain directory name (no `/`, `\\`, `.` or `..`), found {:?}", run.name),
            ));
        }
        if run.output_dir.as_os_str().is_empty() {
            return Err(self.invalid("run.output_dir", "expected a directory, found an empty string"));
        }
        if let Err(e) = run.device.parse::<DeviceSpec>() {
            return Err(self.invalid("run.device", e.to_string()));
        }
        match run.dtype.as_str() {
            "f32" | "bf16" => Ok(()),
            "f16" => Err(self.invalid(
                "run.dtype",
                "expected \"f32\" or \"bf16\", found \"f16\": f16 training is not available (its range needs loss scaling); bf16 has f32's range",
            )),
            other => Err(self.invalid("run.dtype", format!("expected \"f32\" or \"bf16\", found {other:?}"))),
        }
    }

    fn model(&self, r: &mut Recipe) -> Check {
        if let Some(q) = &r.model.quantize {
            self.quantize("model.quantize", q)?;
            if !r.trains_lora() {
                return Err(self.invalid(
                    "model.quantize",
                    "a quantised base is frozen, so training every weight has nothing to train; train LoRA adapters over it (QLoRA) or drop model.quantize",
                ));
            }
        }
        match (&r.model.path, &r.model.init) {
            (Some(_), Some(_)) => {
                return Err(self.invalid("model.init", "give either model.path or [model.init], not both"));
            }
            (None, None) => {
                return Err(self.missing(
                    "model.path",
                    "expected model.path (a Hugging Face model directory) or a [model.init] table",
                ));
            }
            (Some(p), None) => {
                let p = p.clone();
                r.model.path = Some(self.resolve("model.path", &p, true)?);
            }
            (None, Some(init)) => {
                if r.trains_lora() {
                    let (key, fix) = if r.method == Method::Lora { ("method", "method = \"full\"") } else { ("weights", "weights = \"full\"") };
                    return Err(self.invalid(
                        key,
                        format!("LoRA needs a pretrained model.path; a fresh [model.init] model has nothing to adapt: use {fix}"),
                    ));
                }
                self.init(init)?;
            }
        }
        Ok(())
    }

    fn init(&self, i: &InitSection) -> Check {
        if !INIT_ARCHS.contains(&i.arch.as_str()) {
            let mut message = format!("unknown architecture {:?}", i.arch);
            if let Some(s) = suggest(&i.arch, INIT_ARCHS.iter().copied()) {
                message.push_str(&format!("; did you mean `{s}`?"));
            }
            message.push_str(&format!(" (expected one of {})", INIT_ARCHS.join(", ")));
            return Err(self.invalid("model.init.arch", message));
        }
        // The limits a model directory's config.json is held to (`ModelConfig::check_sizes`).
        for (key, v, limit) in [
            ("model.init.hidden_size", i.hidden_size, 1 << 20),
            ("model.init.num_layers", i.num_layers, 1 << 16),
            ("model.init.num_heads", i.num_heads, 1 << 16),
            ("model.init.num_kv_heads", i.num_kv_heads, 1 << 16),
            ("model.init.intermediate_size", i.intermediate_size, 1 << 20),
            ("model.init.max_position_embeddings", i.max_position_embeddings, 1 << 24),
            ("model.init.vocab_size", i.vocab_size, 1 << 24),
        ] {
            self.count(key, v, limit)?;
        }
        if !i.hidden_size.is_multiple_of(i.num_heads) {
            return Err(self.invalid(
                "model.init.num_heads",
                format!("expected a divisor of hidden_size = {}, found {}", i.hidden_size, i.num_heads),
            ));
        }
        if !i.num_heads.is_multiple_of(i.num_kv_heads) {
            return Err(self.invalid(
                "model.init.num_kv_heads",
                format!("expected a divisor of num_heads = {}, found {}", i.num_heads, i.num_kv_heads),
            ));
        }
        // Rotary embeddings rotate pairs of dimensions.
        let head_dim = i.hidden_size / i.num_heads;
        if !head_dim.is_multiple_of(2) {
            return Err(self.invalid(
                "model.init.num_heads",
                format!("hidden_size / num_heads = {head_dim} must be even for rotary embeddings"),
            ));
        }
        Ok(())
    }

    fn data(&self, d: &mut DataSection) -> Check {
        if d.train.as_os_str().is_empty() {
            return Err(self.missing("data.train", "expected data.train, the training data file"));
        }
        d.train = self.resolve("data.train", &d.train, false)?;
        if let Some(p) = d.valid.take() {
            d.valid = Some(self.resolve("data.valid", &p, false)?);
        }
        if let Some(p) = d.test.take() {
            d.test = Some(self.resolve("data.test", &p, false)?);
        }
        self.range("data.valid_fraction", d.valid_fraction, 0.0, 0.5, false)?;
        self.positive("data.max_seq_len", d.max_seq_len)
    }

    fn lora(&self, l: &LoraSection) -> Check {
        // Far above any useful rank; the plan multiplies it by every projection's size.
        self.count("lora.rank", l.rank, 1 << 16)?;
        self.above("lora.alpha", l.alpha, 0.0, false)?;
        self.range("lora.dropout", l.dropout, 0.0, 1.0, true)?;
        if l.targets.is_empty() {
            return Err(self.invalid(
                "lora.targets",
                format!("expected at least one of {} or \"{ALL_LINEAR}\"", LORA_TARGETS.join(", ")),
            ));
        }
        for (i, t) in l.targets.iter().enumerate() {
            if t == ALL_LINEAR {
                if l.targets.len() > 1 {
                    return Err(self.invalid(
                        "lora.targets",
                        format!("\"{ALL_LINEAR}\" already names every linear layer; use it alone"),
                    ));
                }
                continue;
            }
            if !LORA_TARGETS.contains(&t.as_str()) {
                let names = LORA_TARGETS.iter().copied().chain([ALL_LINEAR]);
                let mut message = format!("unknown module {t:?}");
                if let Some(s) = suggest(t, names) {
                    message.push_str(&format!("; did you mean `{s}`?"));
                }
                message.push_str(&format!(" (expected {} or \"{ALL_LINEAR}\")", LORA_TARGETS.join(", ")));
                return Err(self.invalid("lora.targets", message));
            }
            if l.targets[..i].contains(t) {
                return Err(self.invalid("lora.targets", format!("{t:?} is listed twice")));
            }
        }
        if let Some([start, end]) = l.layers
            && start >= end
        {
            return Err(self.invalid(
                "lora.layers",
                format!("expected a half-open range [start, end) with start < end, found [{start}, {end}]"),
            ));
        }
        Ok(())
    }

    fn train(&self, t: &TrainSection) -> Check {
        if t.steps == 0 && t.epochs == 0 {
            return Err(self.invalid("train.epochs", "expected an integer > 0 when train.steps = 0, found 0"));
        }
        self.positive("train.batch_size", t.batch_size)?;
        self.positive("train.grad_accum", t.grad_accum)?;
        self.above("train.learning_rate", t.learning_rate, 0.0, false)?;
        if t.steps > 0 && t.warmup_steps > t.steps {
            return Err(self.invalid(
                "train.warmup_steps",
                format!("expected at most train.steps = {}, found {}", t.steps, t.warmup_steps),
            ));
        }
        self.range("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, false)?;
        self.above("train.weight_decay", t.weight_decay, 0.0, true)?;
        self.range("train.beta1", t.beta1, 0.0, 1.0, true)?;
        self.range("train.beta2", t.beta2, 0.0, 1.0, true)?;
        self.above("train.eps", t.eps, 0.0, false)?;
        self.above("train.max_grad_norm", t.max_grad_norm, 0.0, true)?;
        self.positive("train.log_every", t.log_every)
    }

    fn eval(&self, e: &EvalSection) -> Check {
        if e.exact_match {
            self.positive("eval.exact_match_samples", e.exact_match_samples)?;
            self.positive("eval.max_new_tokens", e.max_new_tokens)?;
        }
        Ok(())
    }

    fn checkpoint(&self, r: &Recipe) -> Check {
        let c = &r.checkpoint;
        self.positive("checkpoint.keep_last", c.keep_last)?;
        if c.early_stop_patience > 0 {
            if r.eval.every == 0 {
                return Err(self.invalid(
                    "checkpoint.early_stop_patience",
                    "early stopping needs periodic evaluation: set eval.every > 0",
                ));
            }
            if r.data.valid.is_none() && r.data.valid_fraction == 0.0 {
                return Err(self.invalid(
                    "checkpoint.early_stop_patience",
                    "early stopping needs a validation set: set data.valid or data.valid_fraction > 0",
                ));
            }
        }
        Ok(())
    }
}
