//! Chat templates rendered as transformers renders them.
//!
//! transformers uses a sandboxed Jinja2 environment with `trim_blocks` and `lstrip_blocks`, the
//! `loopcontrols` extension, a `tojson` filter that is Python's `json.dumps` (`", "` and `": "`
//! separators, no HTML escaping, keys in insertion order), and the globals `raise_exception`
//! and `strftime_now`. Templates call Python string methods (`.strip()`, `.split()`,
//! `.startswith()`), which minijinja-contrib's pycompat layer provides.

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value;

use super::TokenizerError;

/// What a chat is rendered with besides its messages.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    pub add_generation_prompt: bool,
    /// Tool definitions (`tools` in the template), when given.
    pub tools: Option<Value>,
    /// Extra template variables, such as `enable_thinking`.
    pub extra: serde_json::Map<String, Value>,
}

pub fn render(
    template: &str,
    messages: &Value,
    options: &ChatOptions,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, TokenizerError> {
    let env = environment();
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| TokenizerError::Template(describe(&e)))?;
    let mut ctx = serde_json::Map::new();
    for (k, v) in &options.extra {
        ctx.insert(k.clone(), v.clone());
    }
    ctx.insert("messages".into(), messages.clone());
    ctx.insert("add_generation_prompt".into(), Value::Bool(options.add_generation_prompt));
    if let Some(tools) = &options.tools {
        ctx.insert("tools".into(), tools.clone());
    }
    ctx.insert("bos_token".into(), bos_token.map_or(Value::String(String::new()), |t| Value::String(t.into())));
    ctx.insert("eos_token".into(), eos_token.map_or(Value::String(String::new()), |t| Value::String(t.into())));
    tmpl.render(JValue::from_serialize(&ctx))
        .map_err(|e| TokenizerError::Template(describe(&e)))
}

fn describe(e: &Error) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with("raise_exception: ")) => {
            e.detail().unwrap_or_default().trim_start_matches("raise_exception: ").to_string()
        }
        _ => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            msg
        }
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
    });
    env.add_function("strftime_now", |format: String| -> String {
        chrono::Local::now().format(&format).to_string()
    });
    env
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &JValue, indent: Option<JValue>, kwargs: Kwargs) -> Result<JValue, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JValue>>("indent")?,
    };
    let indent = match indent {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    // transformers passes sort_keys through; Python's default is insertion order.
    let _ = kwargs.get::<Option<bool>>("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

fn write_json(value: &JValue, indent: Option<usize>, level: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float(f));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(item, indent, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JValue> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => write_json_string(&value.to_string(), out),
    }
    Ok(())
}

/// `repr(float)` as Python prints it for the common cases.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env = environment();
        let t = env.template_from_str("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let out = t.render(minijinja::context! { x => JValue::from_serialize(json!({"b": [1, 2.5, "é<"], "a": null})) }).unwrap();
        assert_eq!(out, "{\"b\": [1, 2.5, \"é<\"], \"a\": null}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é<\"\n  ],\n  \"a\": null\n}");
    }

    #[test]
    fn raise_exception_message_reaches_the_user() {
        let err = render("{{ raise_exception('only user and assistant roles') }}", &json!([]), &ChatOptions::default(), None, None).unwrap_err();
        assert_eq!(err.to_string(), "chat template: only user and assistant roles");
    }
}
