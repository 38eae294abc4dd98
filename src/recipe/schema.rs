//! The recipe's sections as serde structs, with their defaults.
//!
//! Every struct is `deny_unknown_fields` (a misspelt key is an error, not a silently ignored
//! setting) and `default` (every key may be left out). The defaults live in one `Default` impl
//! per section so that `recipes/README.md`, [`super::Recipe::to_toml`] and the code agree.
//! Range checks and path resolution happen afterwards, in `validate`.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// How the model is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on a frozen base model.
    #[default]
    Lora,
    /// Every weight is trained.
    Full,
    /// Group relative policy optimisation: sampled completions scored by `[[grpo.rewards]]`.
    Grpo,
    /// Knowledge distillation from the `[distill]` teacher.
    Distill,
}

/// What `method = "grpo"` and `method = "distill"` train (`weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// Adapters from `[lora]` on a frozen base.
    #[default]
    Lora,
    /// Every weight.
    Full,
}

/// How the training file is read; `auto` looks at the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Auto,
    Text,
    Completion,
    Chat,
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Only completions / assistant turns; prompts are context.
    #[default]
    Completion,
    /// Every token.
    All,
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

macro_rules! names {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The name used in recipes.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(Method { Lora => "lora", Full => "full", Grpo => "grpo", Distill => "distill" });
names!(Weights { Lora => "lora", Full => "full" });
names!(DataFormat { Auto => "auto", Text => "text", Completion => "completion", Chat => "chat" });
names!(TrainOn { Completion => "completion", All => "all" });
names!(Schedule { Constant => "constant", Linear => "linear", Cosine => "cosine" });

/// `[run]`: naming, placement and numerics of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Run name; empty in the file means the recipe file's stem (filled in by validation).
    pub name: String,
    /// Parent of the run directory. Relative to the working directory, not the recipe file:
    /// runs land where kiln is started, whichever recipe they came from.
    pub output_dir: PathBuf,
    pub seed: u64,
    /// A `--device` string, checked with [`crate::backend::DeviceSpec`].
    pub device: String,
    /// `f32`, or `bf16`: frozen base weights stored in bf16 and multiplied in bf16 (f32
    /// accumulation); activations, adapters, optimizer state and losses stay f32.
    pub dtype: String,
}

impl RunSection {
    pub fn bf16(&self) -> bool {
        self.dtype == "bf16"
    }
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            output_dir: PathBuf::from("runs"),
            seed: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

/// `[model]`: start from a Hugging Face directory (`path`) or a fresh model (`[model.init]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSection>,
    /// Quantise the base's projections at load time and train LoRA over them (QLoRA):
    /// "q4_g32" | "q4_g64" | "q4_g128" | "q8_g32" | "q8_g64" | "q8_g128" | "gguf:q8_0" |
    /// "gguf:q4_0" | "gguf:q4_k".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
}

impl ModelSection {
    /// The parsed `quantize` (validated when the recipe loads).
    pub fn quantize_spec(&self) -> Option<crate::quant::affine::QuantSpec> {
        self.quantize.as_deref().and_then(crate::quant::affine::QuantSpec::parse)
    }
}

/// `[model.init]`: shape of a randomly initialised model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitSection {
    pub arch: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// Size of the BPE tokenizer kiln trains on the training data.
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

impl Default for InitSection {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            hidden_size: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 384,
            max_position_embeddings: 256,
            vocab_size: 96,
            tie_word_embeddings: true,
        }
    }
}

/// Architectures `[model.init]` can build.
pub const INIT_ARCHS: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// `[data]`: where examples come from and how they become token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Required; empty means "not given".
    pub train: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<PathBuf>,
    /// Held-out prompts with answers, for exact-match accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// Share of `train` held out for validation when `valid` is not given.
    pub valid_fraction: f64,
    pub format: DataFormat,
    pub train_on: TrainOn,
    pub max_seq_len: usize,
    pub packing: bool,
    pub add_eos: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            valid: None,
            test: None,
            valid_fraction: 0.05,
            format: DataFormat::Auto,
            train_on: TrainOn::Completion,
            max_seq_len: 512,
            packing: true,
            add_eos: true,
        }
    }
}

/// `[lora]`: adapter shape; ignored when `method = "full"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Scale by alpha/sqrt(rank) instead of alpha/rank.
    pub rslora: bool,
    /// Module names from [`LORA_TARGETS`], or the single entry `all-linear`.
    pub targets: Vec<String>,
    /// Half-open range of decoder layers that get adapters; all layers when absent.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "layer_range")]
    pub layers: Option<[usize; 2]>,
    /// MoE models: also give every expert's gate/up/down projections an adapter (otherwise
    /// only attention and dense MLPs are adapted).
    pub experts: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            layers: None,
            experts: false,
        }
    }
}

/// Linear layers a LoRA adapter can wrap.
pub const LORA_TARGETS: &[&str] =
    &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// The `targets` entry meaning every entry of [`LORA_TARGETS`].
pub const ALL_LINEAR: &str = "all-linear";

/// toml's deserializer fills a `[usize; 2]` from the first two elements of a longer array and
/// drops the rest, so `layers = [0, 4, 8]` would pass silently; read a Vec and check its length.
fn layer_range<'de, D: Deserializer<'de>>(de: D) -> Result<Option<[usize; 2]>, D::Error> {
    let v = Vec::<usize>::deserialize(de)?;
    match v[..] {
        [start, end] => Ok(Some([start, end])),
        _ => Err(serde::de::Error::invalid_length(v.len(), &"an array of two layer indices [start, end]")),
    }
}

/// `[train]`: optimiser and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimiser steps; 0 derives them from `epochs`.
    pub steps: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub lr_schedule: Schedule,
    pub warmup_steps: usize,
    /// The schedule decays to `learning_rate * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Stop after this many NaN/Inf steps in a row.
    pub max_bad_steps: usize,
    pub log_every: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 0,
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            learning_rate: 1e-4,
            lr_schedule: Schedule::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            max_bad_steps: 5,
            log_every: 10,
        }
    }
}

/// `[eval]`: validation loss and exact-match accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every this many steps; 0 = only at the end.
    pub every: usize,
    /// Cap on validation batches per evaluation; 0 = the whole validation set.
    pub max_batches: usize,
    /// When `data.test` is set, greedy-generate each test prompt and report exact-match accuracy.
    pub exact_match: bool,
    pub exact_match_samples: usize,
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { every: 100, max_batches: 0, exact_match: true, exact_match_samples: 200, max_new_tokens: 16 }
    }
}

/// `[checkpoint]`: what is saved and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many steps; 0 = only at the end.
    pub every: usize,
    pub keep_last: usize,
    /// Also keep the checkpoint with the best validation loss.
    pub keep_best: bool,
    /// Stop after this many evaluations without improvement; 0 = off.
    pub early_stop_patience: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { every: 100, keep_last: 2, keep_best: true, early_stop_patience: 0 }
    }
}

/// `[probes]`: signals measured inside the model on a fixed probe batch (docs/probes.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesSection {
    /// Measure every this many steps (and at the last); 0 = off.
    pub every: usize,
    /// How many validation examples (training examples when there is no validation set) make
    /// the probe batch; each runs alone, so no padding enters a statistic.
    pub examples: usize,
}

impl Default for ProbesSection {
    fn default() -> Self {
        Self { every: 50, examples: 4 }
    }
}

/// `[export]`: what the finished run writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// Save a PEFT adapter to RUN/adapter (method = "lora").
    pub adapter: bool,
    /// Also write a fused Hugging Face directory to RUN/final (method = "lora"; with
    /// method = "full" the final model is always written there).
    pub fused: bool,
    /// Also write the final model as RUN/model-TYPE.gguf (with an Ollama Modelfile), TYPE
    /// one of kiln's GGUF types (f16, q8_0, q4_k_m, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<String>,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self { adapter: true, fused: false, gguf: None }
    }
}

/// `[grpo]`: rollouts, rewards and the clipped objective (method = "grpo"). `train.batch_size`
/// counts prompts; each gets `group_size` completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Completions sampled per prompt (G).
    pub group_size: usize,
    /// New tokens per completion at most; longer ones are cut and count as truncated.
    pub max_completion_length: usize,
    pub temperature: f64,
    /// 1 means no nucleus cut.
    pub top_p: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// Clip range below 1 (ε_low).
    pub epsilon: f64,
    /// Clip range above 1 (ε_high); `epsilon` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Weight of the KL penalty to the reference (the base with the adapter off, or the
    /// starting weights with weights = "full"); 0 turns it off.
    pub beta: f64,
    pub loss_type: crate::train::grpo::LossType,
    pub scale_rewards: crate::train::grpo::ScaleRewards,
    /// Optimiser steps on each batch of rollouts (μ); above 1 the clipped ratio matters.
    pub num_iterations: usize,
    /// Completions shown as `sample` events at each evaluation.
    pub log_completions: usize,
    /// `[[grpo.rewards]]`: the reward is the weighted sum of these.
    pub rewards: Vec<crate::reward::RewardConfig>,
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            group_size: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            loss_type: crate::train::grpo::LossType::Dapo,
            scale_rewards: crate::train::grpo::ScaleRewards::Group,
            num_iterations: 1,
            log_completions: 4,
            rewards: Vec::new(),
        }
    }
}

/// `[distill]`: the teacher and the loss (method = "distill").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// The teacher's Hugging Face directory (required; same tokenizer as the student).
    pub teacher: PathBuf,
    /// Quantise the teacher's projections at load, as `model.quantize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_quantize: Option<String>,
    /// 0 = forward KL(teacher ‖ student), 1 = reverse KL(student ‖ teacher), between: the
    /// generalised Jensen–Shannon divergence.
    pub beta: f64,
    /// Both distributions are softened by this temperature (also the sampling temperature
    /// of on-policy completions).
    pub temperature: f64,
    /// loss = ce_weight·CE(labels) + (1 − ce_weight)·divergence.
    pub ce_weight: f64,
    /// Share of steps that train on the student's own completions of the prompts (on-policy,
    /// as GKD's λ) instead of the dataset's.
    pub lmbda: f64,
    /// New tokens per on-policy completion at most.
    pub max_new_tokens: usize,
    /// Positions per chunk when computing both models' logits (bounds the teacher's vocab ×
    /// sequence logits).
    pub chunk_size: usize,
}

impl Default for DistillSection {
    fn default() -> Self {
        Self {
            teacher: PathBuf::new(),
            teacher_quantize: None,
            beta: 0.5,
            temperature: 1.0,
            ce_weight: 0.5,
            lmbda: 0.0,
            max_new_tokens: 128,
            chunk_size: 256,
        }
    }
}
