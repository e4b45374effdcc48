//! Errors of the catalog and of pulling.

use std::path::PathBuf;

/// The catalog could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The TOML does not parse or does not fit the schema.
    #[error("parsing the model catalog: {0}")]
    Parse(#[from] toml::de::Error),
    /// An entry is inconsistent.
    #[error("model catalog entry {model}: {reason}")]
    Invalid {
        /// The model's name.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// No data directory could be determined.
    #[error("cannot determine a data directory; set KITH_HOME")]
    NoHome,
}

/// A model could not be pulled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// No catalog entry has this name.
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Comma-separated catalog names.
        known: String,
    },
    /// A file arrived but its content is not the catalog's.
    #[error("{file}: expected sha256 {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)")]
    Checksum {
        /// File name.
        file: String,
        /// Catalog sha256.
        expected: String,
        /// Catalog size.
        expected_size: u64,
        /// Downloaded sha256.
        actual: String,
        /// Downloaded size.
        actual_size: u64,
    },
    /// A tool the source needs is missing.
    #[error("{tool} is needed to fetch from {source_name} but was not found: {hint}")]
    MissingTool {
        /// The program.
        tool: String,
        /// The source that needs it.
        source_name: String,
        /// How to install it.
        hint: String,
    },
    /// A download command failed.
    #[error("{command} failed ({status}){detail}")]
    Command {
        /// What was run.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its error output, if captured.
        detail: String,
    },
    /// A wheel or archive lacks a member the catalog names.
    #[error("{archive} has no member {member}")]
    MissingMember {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
    },
    /// An archive is unreadable.
    #[error("reading archive {archive}: {reason}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Reading or writing the store failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The model has no source of the requested kind.
    #[error("model {model} has no {kind} source")]
    NoSuchSource {
        /// The model.
        model: String,
        /// The source kind asked for.
        kind: String,
    },
    /// Every source failed; each reason is listed.
    #[error("could not pull {model}:\n{}", .failures.iter().map(|f| format!("  - {f}")).collect::<Vec<_>>().join("\n"))]
    AllSourcesFailed {
        /// The model.
        model: String,
        /// One line per source tried.
        failures: Vec<String>,
    },
}
