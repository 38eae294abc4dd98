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

/// Writes the model directory `dir` as a GGUF file of `file_type` at `out`, with an Ollama
/// Modelfile beside it (`out` with the extension `.Modelfile`).
pub fn export_dir(dir: &std::path::Path, file_type: FileType, out: &std::path::Path, name: Option<String>) -> Result<Export, ExportError> {
    let files = crate::model::weights::WeightFiles::open(dir)?;
    let export = Export::plan(dir, crate::model::weights::TensorSource::Files(files), file_type, name)?;
    export.write(out, |_, _| {})?;
    let file_name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let modelfile_path = out.with_extension("Modelfile");
    crate::fsutil::write_atomic(&modelfile_path, modelfile(&file_name, &export.stop_strings()).as_bytes())
        .map_err(|source| ExportError::Model(crate::model::ModelError::Io { path: modelfile_path.clone(), source }))?;
    Ok(export)
}

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
