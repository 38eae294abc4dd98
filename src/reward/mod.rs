//! GRPO rewards: the built-in scorers and the external-command protocol.
//!
//! Each `[[grpo.rewards]]` entry is a [`RewardConfig`] with a `weight`; a completion's reward is
//! the weighted sum of the scorers that gave a value. A scorer may give none (`None`): an
//! external command that crashed, timed out or answered garbage, or an `exact_match` whose
//! example has no answer. As TRL does with NaN rewards, such a scorer is left out of the sum;
//! when every scorer is left out the completion's reward is `None`, and the trainer leaves it out
//! of its group's statistics.

mod command;

use regex::Regex;
use serde::{Deserialize, Serialize};

pub use command::CommandReward;

/// What a scorer sees of one completion.
#[derive(Debug, Clone, Serialize)]
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The dataset's `answer`, when it has one.
    pub answer: Option<&'a str>,
    /// Completion length in tokens.
    pub tokens: usize,
}

/// One `[[grpo.rewards]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardConfig {
    /// 1 when the extracted final answer equals the dataset's `answer` (both trimmed), else 0.
    ExactMatch {
        #[serde(default = "one")]
        weight: f64,
        /// A regex whose first capture group (of the last match) is the final answer; the
        /// whole completion when absent.
        #[serde(default)]
        extract: Option<String>,
    },
    /// 1 when the extracted number is within `tolerance` of the answer's, else 0.
    NumericMatch {
        #[serde(default = "one")]
        weight: f64,
        /// As for `exact_match`; by default the last number in the completion.
        #[serde(default)]
        extract: Option<String>,
        #[serde(default)]
        tolerance: f64,
    },
    /// 1 when `pattern` matches somewhere in the completion (a format reward), else 0.
    Regex {
        #[serde(default = "one")]
        weight: f64,
        pattern: String,
    },
    /// `-|tokens − target| / target` with `target`; `-max(0, tokens − max) / max` with `max`.
    Length {
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        target: Option<usize>,
        #[serde(default)]
        max: Option<usize>,
    },
    /// 1 when the completion contains `text`, else 0.
    Contains {
        #[serde(default = "one")]
        weight: f64,
        text: String,
    },
    /// An external program (argv, never a shell string) started once and spoken to in JSON
    /// lines: `{"prompt","completion","answer","tokens"}` in, `{"reward": number|null}` out.
    Command {
        #[serde(default = "one")]
        weight: f64,
        argv: Vec<String>,
        #[serde(default = "default_timeout")]
        timeout_s: f64,
    },
}

fn one() -> f64 {
    1.0
}

fn default_timeout() -> f64 {
    10.0
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward {index} ({kind}): `{pattern}` is not a valid regex: {message}")]
    BadRegex { index: usize, kind: &'static str, pattern: String, message: String },
    #[error("reward {index} (length): give `target` or `max`, each at least 1")]
    BadLength { index: usize },
    #[error("reward {index} (command): `argv` is empty")]
    EmptyArgv { index: usize },
    #[error("reward {index} (command): timeout_s must be positive, found {value}")]
    BadTimeout { index: usize, value: f64 },
}

impl RewardConfig {
    pub fn weight(&self) -> f64 {
        match self {
            Self::ExactMatch { weight, .. }
            | Self::NumericMatch { weight, .. }
            | Self::Regex { weight, .. }
            | Self::Length { weight, .. }
            | Self::Contains { weight, .. }
            | Self::Command { weight, .. } => *weight,
        }
    }

    /// The name metrics use for this scorer.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ExactMatch { .. } => "exact_match",
            Self::NumericMatch { .. } => "numeric_match",
            Self::Regex { .. } => "regex",
            Self::Length { .. } => "length",
            Self::Contains { .. } => "contains",
            Self::Command { .. } => "command",
        }
    }
}

/// A ready scorer: regexes compiled, commands described (started on first use).
enum Scorer {
    Exact(Option<Regex>),
    Numeric(Regex, f64),
    Pattern(Regex),
    Length { target: Option<usize>, max: Option<usize> },
    Contains(String),
    Command(CommandReward),
}

/// The scorers of a recipe, with their weights.
pub struct Rewards {
    scorers: Vec<(String, f64, Scorer)>,
}

/// Rewards of one completion: the weighted total and each scorer's own value.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub total: Option<f64>,
    pub per_scorer: Vec<Option<f64>>,
}

impl Rewards {
    pub fn new(configs: &[RewardConfig]) -> Result<Self, RewardError> {
        let regex = |index: usize, kind: &'static str, pattern: &str| {
            Regex::new(pattern).map_err(|e| RewardError::BadRegex { index, kind, pattern: pattern.to_string(), message: e.to_string() })
        };
        let mut scorers = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let scorer = match c {
                RewardConfig::ExactMatch { extract, .. } => Scorer::Exact(extract.as_deref().map(|p| regex(i, "exact_match", p)).transpose()?),
                RewardConfig::NumericMatch { extract, tolerance, .. } => {
                    Scorer::Numeric(regex(i, "numeric_match", extract.as_deref().unwrap_or(LAST_NUMBER))?, *tolerance)
                }
                RewardConfig::Regex { pattern, .. } => Scorer::Pattern(regex(i, "regex", pattern)?),
                RewardConfig::Length { target, max, .. } => {
                    let given = target.is_some() || max.is_some();
                    if !given || *target == Some(0) || *max == Some(0) {
                        return Err(RewardError::BadLength { index: i });
                    }
                    Scorer::Length { target: *target, max: *max }
                }
                RewardConfig::Contains { text, .. } => Scorer::Contains(text.clone()),
                RewardConfig::Command { argv, timeout_s, .. } => {
                    if argv.is_empty() {
                        return Err(RewardError::EmptyArgv { index: i });
                    }
                    if !(*timeout_s > 0.0 && timeout_s.is_finite()) {
                        return Err(RewardError::BadTimeout { index: i, value: *timeout_s });
                    }
                    Scorer::Command(CommandReward::new(argv.clone(), std::time::Duration::from_secs_f64(*timeout_s)))
                }
            };
            scorers.push((c.kind().to_string(), c.weight(), scorer));
        }
        Ok(Self { scorers })
    }

    /// The scorers' names, in order (for per-scorer metrics).
    pub fn names(&self) -> Vec<String> {
        self.scorers.iter().map(|(n, _, _)| n.clone()).collect()
    }

    /// Scores one completion; `warn` hears why a command gave no reward.
    pub fn score(&mut self, sample: &Sample, warn: &mut dyn FnMut(String)) -> Scored {
        let mut per_scorer = Vec::with_capacity(self.scorers.len());
        let mut total: Option<f64> = None;
        for (_, weight, scorer) in &mut self.scorers {
            let value = match scorer {
                Scorer::Exact(extract) => sample.answer.map(|a| {
                    let got = match extract {
                        Some(re) => last_capture(re, sample.completion),
                        None => Some(sample.completion),
                    };
                    indicator(got.is_some_and(|g| g.trim() == a.trim()))
                }),
                Scorer::Numeric(re, tol) => sample.answer.map(|a| {
                    let got = last_capture(re, sample.completion).and_then(parse_number);
                    let want = parse_number(a);
                    indicator(matches!((got, want), (Some(g), Some(w)) if (g - w).abs() <= *tol))
                }),
                Scorer::Pattern(re) => Some(indicator(re.is_match(sample.completion))),
                Scorer::Length { target, max } => Some(length_reward(sample.tokens, *target, *max)),
                Scorer::Contains(text) => Some(indicator(sample.completion.contains(text.as_str()))),
                Scorer::Command(cmd) => cmd.score(sample).unwrap_or_else(|why| {
                    warn(why);
                    None
                }),
            };
            if let Some(v) = value {
                total = Some(total.unwrap_or(0.0) + *weight * v);
            }
            per_scorer.push(value);
        }
        Scored { total, per_scorer }
    }
}

/// The last number in a text: an optional sign, digits, an optional decimal part.
const LAST_NUMBER: &str = r"(-?\d+(?:\.\d+)?)";

fn indicator(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The first capture group of the last match (the whole match when the regex has no group).
fn last_capture<'t>(re: &Regex, text: &'t str) -> Option<&'t str> {
    let caps = re.captures_iter(text).last()?;
    caps.get(1).or_else(|| caps.get(0)).map(|m| m.as_str())
}

fn parse_number(s: &str) -> Option<f64> {
    s.trim().replace(',', "").parse::<f64>().ok().filter(|v| v.is_finite())
}

fn length_reward(tokens: usize, target: Option<usize>, max: Option<usize>) -> f64 {
    let t = tokens as f64;
    let mut r = 0.0;
    if let Some(target) = target {
        r -= (t - target as f64).abs() / target as f64;
    }
    if let Some(max) = max {
        r -= (t - max as f64).max(0.0) / max as f64;
    }
    r
}

#[cfg(test)]
mod tests;
