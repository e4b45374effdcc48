//! Where pulled models live: `$KITH_HOME/models/<name>/<file>`.

use std::path::{Path, PathBuf};

use crate::catalog::ModelEntry;
use crate::error::{CatalogError, PullError};

/// The model directory.
#[derive(Debug, Clone)]
pub struct Store {
    home: PathBuf,
}

impl Store {
    /// The store under `KITH_HOME`, or the platform data directory (`~/.local/share/kith`).
    pub fn from_env() -> Result<Self, CatalogError> {
        if let Some(home) = std::env::var_os("KITH_HOME").filter(|h| !h.is_empty()) {
            return Ok(Self::new(PathBuf::from(home)));
        }
        let dirs = directories::ProjectDirs::from("", "", "kith").ok_or(CatalogError::NoHome)?;
        Ok(Self::new(dirs.data_dir().to_owned()))
    }

    /// A store rooted at `home`.
    pub fn new(home: PathBuf) -> Self {
        Self { home }
    }

    /// The Kith home this store lives in.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Directory of one model.
    pub fn model_dir(&self, entry: &ModelEntry) -> PathBuf {
        self.home.join("models").join(&entry.name)
    }

    /// Where downloads are kept between attempts (wheels, partial files).
    pub(crate) fn download_dir(&self) -> PathBuf {
        self.home.join("cache").join("downloads")
    }

    /// The model's first file, if every file of it is in place with the catalog's size.
    ///
    /// Files only reach their final names after their sha256 was checked, so this needs
    /// no hashing and no network.
    pub fn installed_path(&self, entry: &ModelEntry) -> Option<PathBuf> {
        let dir = self.model_dir(entry);
        let complete = entry.files.iter().all(|file| {
            std::fs::metadata(dir.join(&file.name)).map(|m| m.is_file() && m.len() == file.size).unwrap_or(false)
        });
        complete.then(|| dir.join(&entry.files[0].name))
    }

    /// Deletes a model's files. Returns whether anything was there.
    pub fn remove(&self, entry: &ModelEntry) -> Result<bool, PullError> {
        let dir = self.model_dir(entry);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(PullError::Io { action: "removing", path: dir, source }),
        }
    }
}
