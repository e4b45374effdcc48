//! Kith's model catalog and store.
//!
//! [`Catalog`] is `catalog.toml` (built into the binary): every model Kith knows, its
//! files with their sha256 and size, and where to fetch them. [`Store`] is the model
//! directory under `KITH_HOME` (or the platform data dir); [`Store::pull`] fetches a
//! model from the first source that works, verifies every byte, and moves each file into
//! place atomically, so a file at its final path is always complete and verified.
//!
//! ```no_run
//! let catalog = kith_models::Catalog::builtin()?;
//! let store = kith_models::Store::from_env()?;
//! let entry = catalog.default_model().expect("the catalog has a default");
//! if store.installed_path(entry).is_none() {
//!     store.pull(entry, &kith_models::PullOptions::default(), &mut |event| eprintln!("{event:?}"))?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod catalog;
mod error;
mod pull;
mod store;

pub use catalog::{Catalog, FileSpec, ModelEntry, ModelKind, Source};
pub use error::{CatalogError, PullError};
pub use pull::{PullEvent, PullOptions, SourceKind};
pub use store::Store;
