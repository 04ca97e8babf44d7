//! One way every binary of the workspace writes its log, so an operator sets
//! it once for the whole stack:
//! - `LOG_FORMAT=json`: one JSON object per line (fields, span fields, the
//!   target), for log shippers; `LOG_FORMAT=text` (the default) for people.
//! - Text gets ANSI colours only when the log goes to a terminal, so log
//!   files and `docker logs` carry no escape codes.
//! - `RUST_LOG` filters as usual, with a per-binary default.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable that picks the format.
pub const FORMAT_VAR: &str = "LOG_FORMAT";

/// What `LOG_FORMAT` can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// Reads `LOG_FORMAT`; unset means text. Anything else is an error that
    /// names the variable, so a typo does not silently give the other format.
    pub fn from_env() -> Result<Format, String> {
        match std::env::var(FORMAT_VAR) {
            Err(_) => Ok(Format::Text),
            Ok(v) => Format::parse(&v),
        }
    }

    pub fn parse(v: &str) -> Result<Format, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!("{FORMAT_VAR}={other:?} is neither `text` nor `json`")),
        }
    }
}

/// Installs the global subscriber, writing to standard error. `default` is
/// the filter when `RUST_LOG` is unset (e.g. `"info"`).
pub fn init(default: &str) -> Result<(), String> {
    init_quieting(default, &[])
}

/// Like [`init`], with `quiet` directives added (`"lapin::channel=off"`)
/// unless `RUST_LOG` names their crate: for a dependency that logs, at
/// ERROR, events the binary expects and reports itself.
pub fn init_quieting(default: &str, quiet: &[&str]) -> Result<(), String> {
    let format = Format::from_env()?;
    let env = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    for q in quiet {
        let krate = q.split([':', '=']).next().unwrap_or(q);
        if env.as_deref().is_none_or(|e| !e.contains(krate)) {
            filter = filter.add_directive(q.parse().map_err(|e| format!("log directive {q:?}: {e}"))?);
        }
    }
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        Format::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        Format::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_typos_are_refused() {
        assert_eq!(Format::parse("json"), Ok(Format::Json));
        assert_eq!(Format::parse("JSON"), Ok(Format::Json));
        assert_eq!(Format::parse("text"), Ok(Format::Text));
        assert_eq!(Format::parse(""), Ok(Format::Text));
        let err = Format::parse("jsno").unwrap_err();
        assert!(err.contains("LOG_FORMAT"), "{err}");
    }
}
