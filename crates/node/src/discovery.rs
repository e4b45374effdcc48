//! How other programs on this machine find a running node: `<data dir>/node.json` holds
//! its API address and process id while it serves, so that `kith ask`, `kith memory …`
//! and `kith models …` talk to it instead of opening the vault and models a second time
//! (as the `ollama` CLI talks to its server). The token stays in its own file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "node.json";

/// A node's advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    /// Base URL of its API (`http://127.0.0.1:7878`).
    pub url: String,
    /// Its process id.
    pub pid: u32,
}

impl NodeFile {
    /// `<data_dir>/node.json`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// Announces a node listening on `address` (a wildcard address is reached on
    /// loopback); the file goes away when the guard is dropped.
    pub fn publish(data_dir: &Path, address: SocketAddr) -> std::io::Result<Published> {
        let ip = match address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let file = NodeFile { url: format!("http://{}", SocketAddr::new(ip, address.port())), pid: std::process::id() };
        let path = Self::path(data_dir);
        let temporary = data_dir.join(format!(".{FILE}.{}", file.pid));
        std::fs::create_dir_all(data_dir)?;
        std::fs::write(&temporary, serde_json::to_vec(&file).map_err(std::io::Error::other)?)?;
        std::fs::rename(&temporary, &path)?;
        Ok(Published { path, pid: file.pid })
    }

    /// The node announced in `data_dir`, if a file is there and readable (it may be stale:
    /// callers check that the node answers).
    pub fn read(data_dir: &Path) -> Option<NodeFile> {
        let bytes = std::fs::read(Self::path(data_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Removes `node.json` on drop, if it is still this process's.
#[derive(Debug)]
pub struct Published {
    path: PathBuf,
    pid: u32,
}

impl Drop for Published {
    fn drop(&mut self) {
        let ours = std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<NodeFile>(&bytes).ok())
            .is_some_and(|file| file.pid == self.pid);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_while_held_and_wildcards_become_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let guard = NodeFile::publish(dir.path(), "0.0.0.0:7878".parse().expect("addr")).expect("publish");
        let file = NodeFile::read(dir.path()).expect("file");
        assert_eq!(file, NodeFile { url: "http://127.0.0.1:7878".into(), pid: std::process::id() });
        drop(guard);
        assert!(NodeFile::read(dir.path()).is_none());
        // Another process's file is left alone.
        let guard = NodeFile::publish(dir.path(), "[::]:1".parse().expect("addr")).expect("publish");
        std::fs::write(NodeFile::path(dir.path()), br#"{"url":"http://[::1]:9","pid":1}"#).expect("write");
        drop(guard);
        assert_eq!(NodeFile::read(dir.path()).map(|f| f.pid), Some(1));
    }
}
