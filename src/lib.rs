//! kiln: a workbench for fine-tuning open-weight language models.
//!
//! The library holds everything; the `kiln` binary only parses arguments (`cli`). Data flows
//! one way: model directory → (model, tokenizer) → forward / generate.

pub mod backend;
pub mod cli;
pub mod data;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod probe;
pub mod quant;
pub mod run;
pub mod recipe;
pub mod report;
pub mod reward;
pub mod tokenizer;
pub mod train;
pub mod tui;
