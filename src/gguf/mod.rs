//! GGUF, the file format of llama.cpp and Ollama: the container ([`file`]), the per-tensor
//! type mix of each file type ([`mix`]), the tokenizer ([`vocab`]) and the mapping from a
//! Hugging Face directory ([`convert`]).

pub mod convert;
pub mod file;
pub mod mix;
pub mod vocab;

pub use convert::{Export, ExportError};
pub use file::{GgufError, GgufFile, Value};
pub use mix::FileType;

/// An Ollama Modelfile for `gguf_name` (a path relative to the Modelfile): the chat template
/// travels inside the GGUF, the stop strings are the model's end-of-turn and end-of-text
/// tokens so generation ends where the fine-tuned model ends its turn.
pub fn modelfile(gguf_name: &str, stops: &[String]) -> String {
    let mut out = format!("FROM ./{gguf_name}\n");
    for stop in stops {
        out.push_str(&format!("PARAMETER stop {}\n", serde_json::Value::String(stop.clone())));
    }
    out
}
