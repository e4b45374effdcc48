//! The model directory as the node manages it: the catalog with what is installed and
//! loaded, pulls that report progress as events, and removal of what is not in use.

use kith_models::{Catalog, ModelEntry, PullEvent};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::node::{Node, NodeError};

/// A catalog model as the node sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelListing {
    /// Catalog name.
    pub name: String,
    /// `instruct`, `base` or `embedding`.
    pub kind: String,
    /// One line about it.
    pub description: String,
    /// Bytes on disk once installed.
    pub size: u64,
    /// Whether its files are in place (sha256 checked when pulled).
    pub installed: bool,
    /// Whether this node has it loaded.
    pub loaded: bool,
    /// Whether it is being pulled now.
    pub pulling: bool,
    /// The catalog's default chat model.
    pub default: bool,
}

/// One step of a pull, as the API streams it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullUpdate {
    /// Trying a source.
    Source {
        /// Which.
        source: String,
    },
    /// A source failed; the next is tried.
    SourceFailed {
        /// Which.
        source: String,
        /// Why.
        reason: String,
    },
    /// Downloading (no byte counts from pip).
    Downloading {
        /// What.
        what: String,
    },
    /// Writing and hashing a file.
    File {
        /// Its name.
        file: String,
        /// Its size in bytes.
        size: u64,
    },
    /// Bytes of the current file written and hashed so far.
    Progress {
        /// The file.
        file: String,
        /// Bytes done.
        done: u64,
        /// Its size.
        total: u64,
    },
    /// A file is verified and in place.
    FileDone {
        /// Its name.
        file: String,
    },
    /// The model is installed.
    Done {
        /// Its first file.
        path: String,
    },
    /// The pull failed; nothing half-written is left under the model's name.
    Failed {
        /// Why.
        error: String,
    },
}

/// Progress events a pull sends at most per file (plus the first and last).
const PROGRESS_STEPS: u64 = 100;

impl Node {
    fn catalog_and_store(&self) -> Result<(Catalog, &kith_models::Store, &kith_models::PullOptions), NodeError> {
        let (store, options) = self.model_store().ok_or(NodeError::NoModelStore)?;
        Ok((Catalog::builtin()?, store, options))
    }

    fn catalog_entry(catalog: &Catalog, name: &str) -> Result<ModelEntry, NodeError> {
        catalog
            .get(name)
            .cloned()
            .ok_or_else(|| NodeError::NotInCatalog { name: name.to_owned(), known: catalog.names() })
    }

    /// The catalog, with what is installed, loaded and being pulled.
    pub fn models(&self) -> Result<Vec<ModelListing>, NodeError> {
        let (catalog, store, _) = self.catalog_and_store()?;
        let pulling = self.pulling().lock().map(|p| p.clone()).unwrap_or_default();
        Ok(catalog
            .models()
            .iter()
            .map(|entry| ModelListing {
                name: entry.name.clone(),
                kind: entry.kind.as_str().to_owned(),
                description: entry.description.clone(),
                size: entry.total_size(),
                installed: store.installed_path(entry).is_some(),
                loaded: self.is_loaded(&entry.name),
                pulling: pulling.contains(&entry.name),
                default: entry.default,
            })
            .collect())
    }

    /// Starts pulling a catalog model (off the async threads); its progress arrives on the
    /// receiver, ending with `Done` or `Failed`. One pull per model at a time.
    pub fn pull_model(&self, name: &str) -> Result<mpsc::Receiver<PullUpdate>, NodeError> {
        if self.is_stopping() {
            return Err(NodeError::ShuttingDown);
        }
        let (catalog, store, options) = self.catalog_and_store()?;
        let entry = Self::catalog_entry(&catalog, name)?;
        let (store, options) = (store.clone(), options.clone());
        if !self.pulling().lock().map(|mut p| p.insert(entry.name.clone())).unwrap_or(false) {
            return Err(NodeError::PullInProgress(entry.name));
        }
        let (tx, rx) = mpsc::channel(256);
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut file = (String::new(), 0u64, 0u64); // name, size, bytes at the last event
            let result = store.pull(&entry, &options, &mut |event| {
                let update = match event {
                    PullEvent::SourceStarted { source } => PullUpdate::Source { source },
                    PullEvent::SourceFailed { source, reason } => PullUpdate::SourceFailed { source, reason },
                    PullEvent::Downloading { what } => PullUpdate::Downloading { what },
                    PullEvent::FileStarted { file: name, size } => {
                        file = (name.clone(), size, 0);
                        PullUpdate::File { file: name, size }
                    }
                    PullEvent::FileProgress { done } => {
                        let step = (file.1 / PROGRESS_STEPS).max(1);
                        if done < file.1 && done < file.2 + step {
                            return;
                        }
                        file.2 = done;
                        PullUpdate::Progress { file: file.0.clone(), done, total: file.1 }
                    }
                    PullEvent::FileDone { file } => PullUpdate::FileDone { file },
                    _ => return,
                };
                // A client that went away does not stop the pull: the model still lands.
                let _ = tx.blocking_send(update);
            });
            let last = match result {
                Ok(path) => PullUpdate::Done { path: path.display().to_string() },
                Err(err) => {
                    tracing::warn!(model = %entry.name, error = %err, "pull failed");
                    PullUpdate::Failed { error: err.to_string() }
                }
            };
            if let Ok(mut pulling) = node.pulling().lock() {
                pulling.remove(&entry.name);
            }
            let _ = tx.blocking_send(last);
        });
        Ok(rx)
    }

    /// Deletes an installed model that this node has not loaded; whether it was installed.
    pub fn remove_model(&self, name: &str) -> Result<bool, NodeError> {
        let (catalog, store, _) = self.catalog_and_store()?;
        let entry = Self::catalog_entry(&catalog, name)?;
        let pulling = self.pulling().lock().map(|p| p.contains(&entry.name)).unwrap_or(true);
        if self.is_loaded(&entry.name) || pulling {
            return Err(NodeError::ModelInUse(entry.name));
        }
        Ok(store.remove(&entry)?)
    }
}
