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
    crate::fsutil::write_atomic(&modelfile_path, modelfile(&file_name, &export.stop_strings(), export.chat_template()).as_bytes())
        .map_err(|source| ExportError::Model(crate::model::ModelError::Io { path: modelfile_path.clone(), source }))?;
    Ok(export)
}

/// An Ollama Modelfile for `gguf_name` (a path relative to the Modelfile). The stop strings
/// are the model's end-of-turn and end-of-text tokens. For the chat formats Ollama ships a
/// template for (ChatML, Llama 3, Gemma), that template is written out too: Ollama only
/// recognises a GGUF's Jinja template by near-exact match, and a fine-tuned model's template
/// often differs by a few characters.
pub fn modelfile(gguf_name: &str, stops: &[String], chat_template: Option<&str>) -> String {
    let mut out = format!("FROM ./{gguf_name}\n");
    if let Some(template) = chat_template.and_then(ollama_template) {
        out.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    }
    for stop in stops {
        out.push_str(&format!("PARAMETER stop {}\n", serde_json::Value::String(stop.clone())));
    }
    out
}

/// Ollama's own Go templates for the chat formats a Jinja template is written in.
fn ollama_template(jinja: &str) -> Option<&'static str> {
    const CHATML: &str = "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
    const LLAMA3: &str = "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n";
    const GEMMA: &str = "{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}<start_of_turn>user\n{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n";
    if jinja.contains("<|im_start|>") {
        Some(CHATML)
    } else if jinja.contains("<|start_header_id|>") {
        Some(LLAMA3)
    } else if jinja.contains("<start_of_turn>") {
        Some(GEMMA)
    } else {
        None
    }
}
