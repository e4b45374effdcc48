//! Crash safety: a writer process is killed with SIGKILL at varied points; after each kill
//! the database passes SQLite's integrity check and holds every message whose write the
//! writer had seen acknowledged.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kith_memory::secrecy::SecretString;
use kith_memory::{ConversationMeta, MemoryStore, MessageBody, MessageStats, Vault};

const PASSPHRASE: &str = "crash test passphrase";
/// Kills in the test suite (a longer soak: `KITH_CRASH_KILLS=5000 cargo test -p kith-memory --test it`).
const DEFAULT_KILLS: usize = 200;

fn passphrase() -> SecretString {
    SecretString::from(PASSPHRASE.to_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The writer: appends messages one transaction at a time and prints `ack <id>` after
/// each commit returns. Run only as the child of `sigkill_never_loses_acknowledged_messages`.
#[test]
#[ignore = "run by the crash test as its child process"]
fn crash_writer() {
    let Some(dir) = std::env::var_os("KITH_CRASH_DIR") else { return };
    let dir = Path::new(&dir);
    runtime().block_on(async {
        let key = Vault::new(dir).unlock(&passphrase()).expect("unlock");
        let store = MemoryStore::open(dir, &key).await.expect("open");
        let conversation = match store.conversations().await.expect("list").items.first() {
            Some(c) => c.id,
            None => store.create_conversation(&ConversationMeta::new("crash", "none")).await.expect("conversation"),
        };
        for n in 0.. {
            let body = MessageBody {
                role: "user".into(),
                content: format!("message {n} {}", "x".repeat(200)),
                ran_on: None,
                interrupted: false,
            };
            let batch = vec![(body.clone(), MessageStats::default()), (body, MessageStats::default())];
            let ids = store.add_messages(conversation, &batch).await.expect("write");
            println!("ack {} {}", ids[0], ids[1]);
        }
    });
}

#[test]
fn sigkill_never_loses_acknowledged_messages() {
    let kills: usize = std::env::var("KITH_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_KILLS);
    let dir = tempfile::tempdir().expect("tempdir");
    Vault::new(dir.path()).with_work_factor(4).init(&passphrase(), &[]).expect("vault");
    let key = Vault::new(dir.path()).unlock(&passphrase()).expect("unlock");
    let mut acknowledged = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..kills {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["crash_writer", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("KITH_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child");
        // Kill after a varied number of acknowledgements (0-15), then at once.
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let wanted = (seed >> 60) as usize;
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        let mut seen = 0;
        while seen < wanted && started.elapsed() < Duration::from_secs(20) {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(ids) = line.strip_prefix("ack ") {
                        acknowledged.extend(ids.split(' ').map(|id| id.parse::<i64>().expect("id")));
                        seen += 1;
                    }
                }
                _ => break,
            }
        }
        child.kill().expect("SIGKILL");
        // Acks printed before the kill landed still count.
        for line in lines.map_while(Result::ok) {
            if let Some(ids) = line.strip_prefix("ack ") {
                acknowledged.extend(ids.split(' ').map(|id| id.parse::<i64>().expect("id")));
            }
        }
        child.wait().expect("reaped");

        // Every tenth round (and the last) check the whole database.
        if round % 10 == 9 || round + 1 == kills {
            runtime().block_on(async {
                let store = MemoryStore::open(dir.path(), &key).await.expect("reopen after kill");
                let integrity = store.integrity_check().await.expect("integrity_check");
                assert_eq!(integrity, "ok", "round {round}");
                let conversation = store.conversations().await.expect("list").items[0].id;
                let listing = store.messages(conversation).await.expect("messages");
                assert!(listing.damaged.is_empty(), "round {round}: {:?}", listing.damaged);
                let stored: std::collections::HashSet<i64> = listing.items.iter().map(|m| m.id).collect();
                let lost: Vec<&i64> = acknowledged.iter().filter(|id| !stored.contains(id)).collect();
                assert!(lost.is_empty(), "round {round}: acknowledged but lost: {lost:?}");
                store.close().await;
            });
        }
    }
    eprintln!("{kills} kills, {} acknowledged messages, none lost", acknowledged.len());
    assert!(acknowledged.len() > kills, "the writer acknowledged only {} messages", acknowledged.len());
}

/// An export opens with Debian's `age` command-line tool (installed by `.ci/run`).
#[test]
fn exports_open_with_the_age_command_line_tool() {
    use kith_memory::age::secrecy::ExposeSecret;
    use kith_memory::{ExportTo, write_export};

    let dir = tempfile::tempdir().expect("tempdir");
    let key = Vault::new(dir.path()).with_work_factor(4).init(&passphrase(), &[]).expect("vault");
    let identity = kith_memory::age::x25519::Identity::generate();
    let bytes = runtime().block_on(async {
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        store.add_memory("canary-export-5e1f lives in Lyon", None, false).await.expect("memory");
        store.export(ExportTo::Recipient(&identity.to_public())).await.expect("export").0
    });
    let export = dir.path().join("memory.age");
    write_export(&export, &bytes).expect("write");
    let identity_file = dir.path().join("identity.txt");
    std::fs::write(&identity_file, identity.to_string().expose_secret()).expect("identity");
    let output = Command::new("age")
        .arg("--decrypt")
        .arg("--identity")
        .arg(&identity_file)
        .arg(&export)
        .output()
        .expect("the `age` tool is installed (apt-get install age)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON inside");
    assert_eq!(json["format"], "kith-memory-export");
    assert_eq!(json["memories"][0]["text"], "canary-export-5e1f lives in Lyon");
}
