//! The `kith` binary as a user runs it: help, model management, errors, a real answer.

use std::path::Path;
use std::process::{Command, Output};

fn kith(args: &[&str], home: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kith"));
    command.args(args).env_remove("KITH_LOG").env_remove("KITH_MODEL");
    if let Some(home) = home {
        command.env("KITH_HOME", home);
    }
    command.output().expect("kith runs")
}

/// A child process killed if the test ends (or panics) while it runs.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running `kith serve` on a free loopback port: the process, its stderr (after the
/// line announcing the address) and the address.
struct Served {
    child: KillOnDrop,
    log: std::io::BufReader<std::process::ChildStderr>,
    address: String,
}

fn serve(home: &Path, env: &[(&str, &str)]) -> Served {
    use std::io::BufRead;
    let mut command = Command::new(env!("CARGO_BIN_EXE_kith"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KITH_HOME", home)
        .env_remove("KITH_LOG")
        // Tests run side by side: no fixed mesh port, no mDNS on the test machine's network.
        .env("KITH_MESH_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("KITH_NO_MDNS", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .expect("kith serve starts");
    let mut log = std::io::BufReader::new(child.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(log.read_line(&mut line).expect("read") > 0, "kith serve exited early");
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
    };
    Served { child, log, address }
}

impl Served {
    /// SIGTERM; the exit status and the rest of its stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let killed = Command::new("kill").args(["-TERM", &self.child.0.id().to_string()]).status().expect("kill runs");
        assert!(killed.success());
        let status = self.child.0.wait().expect("kith serve exits");
        let mut rest = String::new();
        self.log.read_to_string(&mut rest).expect("read");
        (status, rest)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn help_lists_the_commands() {
    let output = kith(&["--help"], None);
    assert!(output.status.success());
    let text = stdout(&output);
    for command in ["ask", "chat", "models", "bench", "vault", "memory", "serve", "token"] {
        assert!(text.contains(command), "--help lacks {command}:\n{text}");
    }
    let ask = stdout(&kith(&["ask", "--help"], None));
    for flag in ["--model", "--device", "--temperature", "--top-p", "--top-k", "--seed", "--max-tokens", "--system"] {
        assert!(ask.contains(flag), "ask --help lacks {flag}");
    }
}

/// Each bad model file gives one clear line and a failure exit, never a panic.
#[test]
fn bad_model_files_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], &str); 3] = [
        ("empty.gguf", b"", "not a GGUF file"),
        ("html.gguf", b"<html>404 not found</html>", "not a GGUF file"),
        ("cut.gguf", b"GGUF\x03\x00\x00\x00\x01\x00", "malformed GGUF"),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let output = kith(&["ask", "--model", path.to_str().expect("utf-8 path"), "hi"], Some(dir.path()));
        assert!(!output.status.success(), "{name}: should fail");
        let err = stderr(&output);
        assert!(err.contains(expected), "{name}: stderr lacks {expected:?}:\n{err}");
        assert!(!err.contains("panicked"), "{name}: panicked:\n{err}");
    }
    let output = kith(&["ask", "--model", "/no/such/model.gguf", "hi"], Some(dir.path()));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("does not exist"));
}

#[test]
fn unknown_model_and_device_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = kith(&["ask", "--model", "gpt-17", "hi"], Some(dir.path()));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("known models: smollm2-135m"), "{}", stderr(&output));
    let output = kith(&["models", "path", "gemma3-270m"], Some(dir.path()));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("kith models pull gemma3-270m"), "{}", stderr(&output));
    let output = kith(&["ask", "--device", "tpu", "hi"], Some(dir.path()));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("unknown device"), "{}", stderr(&output));
}

#[test]
fn models_list_shows_the_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = kith(&["models", "list"], Some(dir.path()));
    assert!(output.status.success());
    let text = stdout(&output);
    for name in ["smollm2-135m", "gemma3-270m", "minilm-l6"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(text.contains("base"), "gemma is labelled a base model:\n{text}");
}

/// The README's first command on the real default model (pulled by CI beforehand).
#[test]
fn ask_streams_a_greedy_answer_from_the_default_model() {
    let home = std::env::var_os("KITH_HOME").map(std::path::PathBuf::from);
    let output =
        kith(&["ask", "--temperature", "0", "--max-tokens", "12", "What is the capital of France?"], home.as_deref());
    assert!(output.status.success(), "{}", stderr(&output));
    // llama.cpp's greedy answer under SmolLM2's default system prompt starts so.
    assert!(stdout(&output).starts_with("L'Étoile, la Marseillaise"), "{}", stdout(&output));
}

/// `kith bench --json` reports every figure, each a positive number.
#[test]
fn bench_reports_speed_and_memory() {
    let home = std::env::var_os("KITH_HOME").map(std::path::PathBuf::from);
    let output = kith(&["--threads", "2", "bench", "--repetitions", "1", "--json"], home.as_deref());
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bench prints JSON");
    for key in ["pp128_tok_s", "pp512_tok_s", "tg128_tok_s", "ttft_turn1_ms", "ttft_turn10_ms", "peak_rss_mib"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {report}"));
        assert!(value > 0.0, "{key} = {value}");
    }
    assert_eq!(report["threads"], 2);
    // The prefix cache: turn 10 reuses what turns 1-9 computed.
    assert!(report["turn10_cached_tokens"].as_u64().unwrap_or(0) > 500, "{report}");
}

/// `kith chat` reads turns from stdin, answers each, and keeps the conversation.
#[test]
fn chat_answers_turns_from_stdin() {
    use std::io::Write as _;
    let mut command = Command::new(env!("CARGO_BIN_EXE_kith"));
    command.args(["chat", "--temperature", "0", "--max-tokens", "8", "--stats"]).env_remove("KITH_LOG");
    if let Some(home) = std::env::var_os("KITH_HOME") {
        command.env("KITH_HOME", home);
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kith chat starts");
    child.stdin.take().expect("stdin").write_all(b"Hi!\nAnd then?\n/exit\n").expect("write turns");
    let output = child.wait_with_output().expect("kith chat ends");
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    // Two answers, the second reusing the first turn's cache.
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with("[prompt")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(stats[0].contains("(0 cached)"), "{}", stats[0]);
    assert!(!stats[1].contains("(0 cached)"), "{}", stats[1]);
    assert_eq!(stdout(&output).matches(">>> ").count(), 3, "{}", stdout(&output));
}

fn kith_with(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kith"));
    command
        .args(args)
        .env("KITH_HOME", home)
        .env_remove("KITH_LOG")
        .env_remove("KITH_PASSPHRASE")
        .env_remove("KITH_NEW_PASSPHRASE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("kith runs")
}

/// `kith vault`: init, unlock, a wrong passphrase, passwd from files, and no passphrase at all.
#[test]
fn vault_init_unlock_and_passwd() {
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    assert!(stdout(&kith_with(&["vault", "status"], home, &[])).contains("no vault"));
    let no_passphrase = kith_with(&["vault", "init"], home, &[]);
    assert!(!no_passphrase.status.success());
    assert!(stderr(&no_passphrase).contains("KITH_PASSPHRASE"), "{}", stderr(&no_passphrase));

    let init = kith_with(&["vault", "init"], home, &[("KITH_PASSPHRASE", "first secret")]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(stdout(&kith_with(&["vault", "status"], home, &[])).contains("vault:"));
    let again = kith_with(&["vault", "init"], home, &[("KITH_PASSPHRASE", "other")]);
    assert!(!again.status.success() && stderr(&again).contains("already exists"));

    let key_file = home.join("vault").join("passphrase.age");
    let before = std::fs::read(&key_file).expect("key file");
    let wrong = kith_with(&["vault", "unlock"], home, &[("KITH_PASSPHRASE", "not it")]);
    assert!(!wrong.status.success() && stderr(&wrong).contains("wrong passphrase"), "{}", stderr(&wrong));
    assert_eq!(std::fs::read(&key_file).expect("key file"), before, "a wrong passphrase changes nothing");

    let old = home.join("old.txt");
    let new = home.join("new.txt");
    std::fs::write(&old, "first secret\n").expect("write");
    std::fs::write(&new, "second secret\n").expect("write");
    let old_arg = old.to_str().expect("utf-8 path");
    let new_arg = new.to_str().expect("utf-8 path");
    let passwd =
        kith_with(&["vault", "passwd", "--passphrase-file", old_arg, "--new-passphrase-file", new_arg], home, &[]);
    assert!(passwd.status.success(), "{}", stderr(&passwd));
    assert!(!kith_with(&["vault", "unlock"], home, &[("KITH_PASSPHRASE", "first secret")]).status.success());
    let unlock = kith_with(&["vault", "unlock", "--passphrase-file", new_arg], home, &[]);
    assert!(unlock.status.success(), "{}", stderr(&unlock));
}

/// `kith memory`: add, list, forget, and an export restored into another vault.
#[test]
fn memory_commands_and_export_import() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let vault_env = [("KITH_PASSPHRASE", "vault secret"), ("KITH_EXPORT_PASSPHRASE", "export secret")];
    let run = |home: &Path, args: &[&str]| {
        let output = kith_with(args, home, &vault_env);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        output
    };
    let no_vault = kith_with(&["memory", "list"], a.path(), &vault_env);
    assert!(!no_vault.status.success() && stderr(&no_vault).contains("kith vault init"));
    run(a.path(), &["vault", "init"]);
    run(a.path(), &["memory", "add", "my daughter is called Ada", "--pin"]);
    run(a.path(), &["memory", "add", "prefers metric units"]);
    run(a.path(), &["memory", "forget", "2"]);
    let list = stdout(&run(a.path(), &["memory", "list"]));
    assert!(list.contains("[pinned] my daughter is called Ada") && !list.contains("metric"), "{list}");
    // A wrong passphrase: a clear error, and the database keeps every byte.
    let db = a.path().join("memory.db");
    let before = std::fs::read(&db).expect("database");
    let wrong = kith_with(&["memory", "list"], a.path(), &[("KITH_PASSPHRASE", "not the vault secret")]);
    assert!(!wrong.status.success() && stderr(&wrong).contains("wrong passphrase"), "{}", stderr(&wrong));
    assert_eq!(std::fs::read(&db).expect("database"), before);

    let export = a.path().join("memory.age");
    let export_arg = export.to_str().expect("utf-8 path");
    run(a.path(), &["memory", "export", export_arg]);
    run(b.path(), &["vault", "init"]);
    let wrong = kith_with(
        &["memory", "import", export_arg],
        b.path(),
        &[("KITH_PASSPHRASE", "vault secret"), ("KITH_EXPORT_PASSPHRASE", "nope")],
    );
    assert!(!wrong.status.success() && stderr(&wrong).contains("does not decrypt"), "{}", stderr(&wrong));
    assert!(stdout(&run(b.path(), &["memory", "list"])).trim().is_empty(), "nothing half-imported");
    run(b.path(), &["memory", "import", export_arg]);
    assert_eq!(stdout(&run(b.path(), &["memory", "list"])), list);
}

/// With a vault, `kith chat` saves each answered turn, encrypted; `--resume` continues it.
#[test]
fn chat_saves_and_resumes_conversations() {
    use std::io::Write as _;
    let shared = std::env::var_os("KITH_HOME").map(std::path::PathBuf::from);
    let model = stdout(&kith(&["models", "path", "smollm2-135m"], shared.as_deref())).trim().to_owned();
    assert!(Path::new(&model).is_file(), "the default model is pulled: {model}");
    let home = home_with_models();
    let home = home.path();
    let env = [("KITH_PASSPHRASE", "chat secret")];
    assert!(kith_with(&["vault", "init"], home, &env).status.success());
    let chat = |extra: &[&str], input: &[u8]| {
        let mut args = vec!["chat", "--model", &model, "--temperature", "0", "--max-tokens", "6", "--stats"];
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(&args)
            .env("KITH_HOME", home)
            .env("KITH_PASSPHRASE", "chat secret")
            .env_remove("KITH_LOG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kith chat starts");
        child.stdin.take().expect("stdin").write_all(input).expect("write turns");
        let output = child.wait_with_output().expect("kith chat ends");
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    let first = chat(&[], b"Hi!\n/exit\n");
    assert!(first.contains("saved as conversation 1"), "{first}");
    let listed = stdout(&kith_with(&["memory", "chats"], home, &env));
    assert!(listed.contains("2 messages") && listed.contains("Hi!"), "{listed}");
    // Saved messages are found by meaning.
    let found = kith_with(&["memory", "search", "hello there", "--json"], home, &env);
    assert!(found.status.success(), "{}", stderr(&found));
    let hits: Vec<serde_json::Value> = serde_json::from_slice(&found.stdout).expect("JSON hits");
    let user = hits.iter().find(|h| h["text"] == "Hi!").expect("the user's message is found");
    assert_eq!((user["kind"].as_str(), user["role"].as_str()), (Some("message"), Some("user")));
    assert!(user["semantic"].as_f64().is_some(), "{user}");
    let resumed = chat(&["--resume", "1"], b"And then?\n/exit\n");
    assert!(resumed.contains("resuming conversation 1: 2 earlier messages"), "{resumed}");
    // The resumed turn's prompt holds the first turn too.
    let prompt_tokens = |err: &str| -> usize {
        let line = err.lines().find(|l| l.starts_with("[prompt ")).expect("stats line");
        line["[prompt ".len()..].split(' ').next().expect("count").parse().expect("number")
    };
    assert!(prompt_tokens(&resumed) > prompt_tokens(&first) + 5, "{first}\n{resumed}");
    assert!(stdout(&kith_with(&["memory", "chats"], home, &env)).contains("4 messages"));
    let no_vault = chat(&["--no-save"], b"Hi!\n/exit\n");
    assert!(!no_vault.contains("saved as"), "{no_vault}");

    let forget = kith_with(&["memory", "forget", "--conversation", "1", "--with-memories"], home, &env);
    assert!(forget.status.success(), "{}", stderr(&forget));
    assert!(stderr(&forget).contains("Deleted conversation 1 and 0 memories"), "{}", stderr(&forget));
    assert!(stdout(&kith_with(&["memory", "chats"], home, &env)).trim().is_empty());
    let again = kith_with(&["memory", "forget", "--conversation", "1"], home, &env);
    assert!(!again.status.success() && stderr(&again).contains("no conversation 1"), "{}", stderr(&again));
    let neither = kith_with(&["memory", "forget"], home, &env);
    assert!(!neither.status.success(), "forget needs an id or --conversation");
}

/// A temporary KITH_HOME that sees the pulled models of the shared one.
fn home_with_models() -> tempfile::TempDir {
    let shared = std::env::var_os("KITH_HOME").map(std::path::PathBuf::from);
    let model = stdout(&kith(&["models", "path", "minilm-l6"], shared.as_deref())).trim().to_owned();
    let models = Path::new(&model).ancestors().nth(2).expect("models directory").to_owned();
    assert!(models.join("minilm-l6").is_dir(), "minilm-l6 is pulled: {model}");
    let home = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(&models, home.path().join("models")).expect("link models");
    home
}

fn search(home: &Path, query: &str) -> (Vec<serde_json::Value>, String) {
    let output = kith_with(&["memory", "search", query, "--json"], home, &[("KITH_PASSPHRASE", "s")]);
    assert!(output.status.success(), "{}", stderr(&output));
    (serde_json::from_slice(&output.stdout).expect("JSON hits"), stderr(&output))
}

/// `kith memory search`: by meaning with MiniLM pulled, by words without it, and items
/// saved before the model was there get embedded on the next search.
#[test]
fn memory_search_by_meaning_and_by_words() {
    let bare = tempfile::tempdir().expect("tempdir");
    let env = [("KITH_PASSPHRASE", "s")];
    assert!(kith_with(&["vault", "init"], bare.path(), &env).status.success());
    let add = kith_with(&["memory", "add", "My daughter is called Ada"], bare.path(), &env);
    assert!(add.status.success(), "{}", stderr(&add));
    let (hits, note) = search(bare.path(), "Ada");
    assert!(note.contains("matches words only"), "{note}");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["semantic"], serde_json::Value::Null);
    assert_eq!(hits[0]["keyword"], 1.0);
    let (hits, _) = search(bare.path(), "child's name?");
    assert!(hits.is_empty(), "no shared word, no meaning without the model: {hits:?}");

    let home = home_with_models();
    let home = home.path();
    assert!(kith_with(&["vault", "init"], home, &env).status.success());
    for text in
        ["My daughter is called Ada", "I prefer metric units", "The wifi password at the cabin is on the fridge"]
    {
        let add = kith_with(&["memory", "add", text], home, &env);
        assert!(add.status.success(), "{}", stderr(&add));
    }
    let (hits, _) = search(home, "child's name?");
    assert_eq!(hits[0]["text"], "My daughter is called Ada", "{hits:?}");
    assert!(hits[0]["semantic"].as_f64().expect("semantic score") > 0.3, "{hits:?}");
    assert!(hits[0]["score"].as_f64() > hits[1]["score"].as_f64(), "{hits:?}");
    let (hits, _) = search(home, "fridge");
    assert_eq!(hits[0]["text"], "The wifi password at the cabin is on the fridge");
    assert_eq!(hits[0]["keyword"], 1.0);

    // The bare vault's memory was saved without a vector: with the model, it gets one.
    std::os::unix::fs::symlink(home.join("models"), bare.path().join("models")).expect("link models");
    let (hits, _) = search(bare.path(), "child's name?");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0]["semantic"].as_f64().expect("embedded now") > 0.3, "{hits:?}");
}

/// The OS keyring: with a real Secret Service (gnome-keyring in a private D-Bus session)
/// the vault opens without the passphrase once opted in; `off` removes the key.
#[test]
fn vault_keyring_on_a_real_secret_service() {
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    let env = [("KITH_PASSPHRASE", "s")];
    assert!(kith_with(&["vault", "init"], home, &env).status.success());
    assert!(kith_with(&["memory", "add", "kept behind the keyring"], home, &env).status.success());
    let kith = env!("CARGO_BIN_EXE_kith");
    // gnome-keyring keeps its keyrings under the home directory: a private one, so the
    // login keyring is created fresh with the password given here.
    let session_home = tempfile::tempdir().expect("tempdir");
    let runtime_dir = session_home.path().join("run");
    std::fs::create_dir(&runtime_dir).expect("runtime dir");
    std::fs::set_permissions(&runtime_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let script = format!(
        "printf keyring-login | gnome-keyring-daemon --unlock --components=secrets >/dev/null || exit 90
         KITH_PASSPHRASE=s {kith} vault keyring on || exit 91
         {kith} vault status | grep -q 'OS keyring: on' || exit 92
         {kith} memory list | grep -q 'kept behind the keyring' || exit 93
         {kith} vault keyring off || exit 94
         {kith} memory list && exit 95
         exit 0"
    );
    let output = Command::new("dbus-run-session")
        .args(["--", "sh", "-c", &script])
        .env("KITH_HOME", home)
        .env("HOME", session_home.path())
        .env("XDG_DATA_HOME", session_home.path().join("share"))
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env_remove("KITH_PASSPHRASE")
        .env_remove("KITH_LOG")
        .output()
        .expect("dbus-run-session and gnome-keyring-daemon are installed (tests/run.sh installs them)");
    assert!(output.status.success(), "step {:?} failed:\n{}", output.status.code(), stderr(&output));
    assert!(stderr(&output).contains("no passphrase"), "after `off` the passphrase is needed again");
    assert!(!home.join("vault").join("keyring").exists());
}

/// Without any keyring service, opting in fails clearly and changes nothing.
#[test]
fn vault_keyring_without_a_service_is_a_clear_error() {
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    let env = [("KITH_PASSPHRASE", "s"), ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")];
    assert!(kith_with(&["vault", "init"], home, &env).status.success());
    let on = kith_with(&["vault", "keyring", "on"], home, &env);
    assert!(!on.status.success());
    assert!(
        stderr(&on).contains("no OS keyring is available") && stderr(&on).contains("passphrase"),
        "{}",
        stderr(&on)
    );
    assert!(!home.join("vault").join("keyring").exists());
    assert!(stdout(&kith_with(&["vault", "status"], home, &env)).contains("OS keyring: off"));
    assert!(kith_with(&["memory", "list"], home, &env).status.success(), "the passphrase still opens it");
}

/// `kith serve`: listens, answers with the token from `kith token`, refuses without it,
/// and exits cleanly on SIGTERM.
#[test]
fn serve_answers_with_the_token_and_stops_on_sigterm() {
    use std::io::{Read, Write};
    let home = home_with_models();
    let home = home.path();
    let served = serve(home, &[]);
    let address = served.address.clone();
    let token = stdout(&kith(&["token"], Some(home))).trim().to_owned();
    assert!(token.starts_with("kith_"), "{token}");
    let get = |auth: &str| {
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        write!(stream, "GET /v1/models HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n").expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
    };
    let ok = get(&format!("Authorization: Bearer {token}\r\n"));
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("smollm2-135m"), "{ok}");
    assert!(get("").starts_with("HTTP/1.1 401"));

    let (status, rest) = served.terminate();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("Stopped."), "{rest}");
}

/// The config file fills in defaults; flags and KITH_* variables win; `kith config` shows
/// each setting's source; a bad file is an error naming it.
#[test]
fn config_file_flags_and_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "threads = 1\nmodel = \"gemma3-270m\"\n[serve]\nqueue = 3\nlisten = \"127.0.0.1:9000\"\n\
         offload = \"when-faster\"\nmesh_listen = [\"/ip4/0.0.0.0/tcp/4800\"]\nno_mdns = true\nname = \"box\"\n",
    )
    .expect("write");
    let file_arg = file.to_str().expect("utf-8 path");
    let shown = stdout(&kith_with(&["config"], dir.path(), &[("KITH_CONFIG", file_arg), ("KITH_QUEUE", "5")]));
    for line in [
        "threads = 1  # config file",
        "model = \"gemma3-270m\"  # config file",
        "listen = \"127.0.0.1:9000\"  # config file",
        "queue = 5  # environment",
        "max_tokens = 4096  # default",
        "offload = \"when-faster\"  # config file",
        "mesh_listen = [\"/ip4/0.0.0.0/tcp/4800\"]  # config file",
        "no_mdns = true  # config file",
        "name = \"box\"  # config file",
        "no_mesh = false  # default",
    ] {
        assert!(shown.contains(line), "missing {line:?} in:\n{shown}");
    }
    std::fs::write(&file, "[serve]\nqueue = \"many\"\n").expect("write");
    let bad = kith_with(&["config"], dir.path(), &[("KITH_CONFIG", file_arg)]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains(file_arg) && stderr(&bad).contains("queue"), "{}", stderr(&bad));
    std::fs::write(&file, "[serve]\noffload = \"always\"\n").expect("write");
    let bad = kith_with(&["config"], dir.path(), &[("KITH_CONFIG", file_arg)]);
    assert!(!bad.status.success() && stderr(&bad).contains("offload"), "{}", stderr(&bad));
}

/// `kith` with `input` on stdin.
fn kith_input(args: &[&str], home: &Path, input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(args)
        .env("KITH_HOME", home)
        .env_remove("KITH_LOG")
        .env_remove("KITH_PASSPHRASE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kith starts");
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    child.wait_with_output().expect("kith ends")
}

/// While `kith serve` runs with the vault unlocked, the other commands work through its
/// API: no passphrase is asked for (none is given to them), memories told in a chat wait
/// for `kith memory review`, and answers say they ran through the node.
#[test]
fn commands_go_through_a_running_node() {
    let home = home_with_models();
    let home = home.path();
    let env = [("KITH_PASSPHRASE", "node secret")];
    assert!(kith_with(&["vault", "init"], home, &env).status.success());
    let served = serve(home, &env);
    let announced = std::fs::read_to_string(home.join("node.json")).expect("node.json while serving");
    assert!(announced.contains("http://127.0.0.1:"), "{announced}");
    let run = |args: &[&str]| kith_with(args, home, &[]);
    let second = run(&["serve", "--listen", "127.0.0.1:0"]);
    assert!(!second.status.success() && stderr(&second).contains("already running"), "{}", stderr(&second));
    let ok = |output: Output| {
        assert!(output.status.success(), "{}", stderr(&output));
        output
    };

    ok(run(&["memory", "add", "I prefer metric units"]));
    assert!(stdout(&ok(run(&["memory", "list"]))).contains("I prefer metric units"));
    let asked = ok(run(&["ask", "--temperature", "0", "--max-tokens", "6", "--stats", "Hi"]));
    assert!(stderr(&asked).contains("ran on local (through the node at http://127.0.0.1:"), "{}", stderr(&asked));

    let chat = ok(kith_input(
        &["chat", "--temperature", "0", "--max-tokens", "4", "--stats"],
        home,
        b"My name is Ada.\n/exit\n",
    ));
    let said = stderr(&chat);
    assert!(said.contains("through the node at") && said.contains("saved as conversation 1"), "{said}");
    assert!(stdout(&ok(run(&["memory", "chats"]))).contains("friends-allowed"));
    assert_eq!(
        stdout(&ok(run(&["memory", "review", "--list"]))).split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        "My name is Ada"
    );
    let reviewed = ok(kith_input(&["memory", "review"], home, b"maybe\nk\n"));
    assert!(stderr(&reviewed).contains("Kept 1, discarded 0."), "{}", stderr(&reviewed));
    assert!(stdout(&ok(run(&["memory", "list"]))).contains("My name is Ada"));
    assert!(stderr(&ok(run(&["memory", "review"]))).contains("No suggested memories"));

    let models = stdout(&ok(run(&["models", "list"])));
    let smollm = models.lines().find(|l| l.starts_with("smollm2-135m")).expect("listed");
    assert!(models.contains("LOADED") && smollm.contains(" yes "), "{models}");
    let rm = run(&["models", "rm", "smollm2-135m"]);
    assert!(!rm.status.success() && stderr(&rm).contains("in use"), "{}", stderr(&rm));
    let import = run(&["memory", "import", "nothing.age"]);
    assert!(!import.status.success() && stderr(&import).contains("stop it before importing"), "{}", stderr(&import));
    // --no-node opens the vault here instead (and so needs the passphrase).
    let direct = kith_with(&["--no-node", "memory", "list"], home, &env);
    assert!(stdout(&ok(direct)).contains("My name is Ada"));
    assert!(!run(&["--no-node", "memory", "list"]).status.success(), "no passphrase, no vault");

    let (status, rest) = served.terminate();
    assert!(status.success(), "{rest}");
    assert!(!home.join("node.json").exists(), "node.json goes with the node");
    // With no node, commands work in-process again.
    assert!(stdout(&ok(kith_with(&["memory", "list"], home, &env))).contains("I prefer metric units"));
}

/// Two real nodes pair with `kith peers`, and one answers for the other: `kith ask` for a
/// model only the friend has, `--peer`, quotas, usage, removal; the trust list survives
/// a restart, sealed in the vault.
#[test]
fn peers_pair_through_invites_and_offload() {
    let (home_a, home_b) = (home_with_models(), home_with_models());
    let (a, b) = (home_a.path(), home_b.path());
    let env_a = [("KITH_PASSPHRASE", "alice secret"), ("KITH_NODE_NAME", "alice")];
    let env_b = [("KITH_PASSPHRASE", "bob secret"), ("KITH_NODE_NAME", "bobs-gpu-box"), ("KITH_MODEL", "gemma3-270m")];
    assert!(kith_with(&["vault", "init"], a, &env_a).status.success());
    assert!(kith_with(&["vault", "init"], b, &env_b).status.success());
    let ok = |output: Output| {
        assert!(output.status.success(), "{}", stderr(&output));
        output
    };
    let no_node = kith_with(&["peers", "list"], a, &[]);
    assert!(!no_node.status.success() && stderr(&no_node).contains("kith serve"), "{}", stderr(&no_node));

    let served_b = serve(b, &env_b);
    let served_a = serve(a, &env_a);
    let code = stdout(&ok(kith_with(&["peers", "invite", "--hours", "1"], b, &[]))).trim().to_owned();
    assert!(code.starts_with("kith1"), "{code}");
    let paired = stdout(&ok(kith_with(&["peers", "accept", &code], a, &[])));
    assert!(paired.contains("Paired with bobs-gpu-box"), "{paired}");
    let again = kith_with(&["peers", "accept", &code], a, &[]);
    assert!(!again.status.success(), "an invite works once");

    let listed = stdout(&ok(kith_with(&["peers", "list"], a, &[])));
    assert!(listed.contains("bobs-gpu-box") && listed.contains("connected"), "{listed}");
    assert!(stdout(&ok(kith_with(&["peers", "list"], b, &[]))).contains("alice"));

    // A serves SmolLM2 only; Gemma runs on B.
    let asked = ok(kith_with(
        &["ask", "--model", "gemma3-270m", "--temperature", "0", "--max-tokens", "8", "--stats", "Hello"],
        a,
        &[],
    ));
    assert!(stderr(&asked).contains("ran on bobs-gpu-box (through the node at"), "{}", stderr(&asked));
    let forced = ok(kith_with(
        &["ask", "--peer", "bobs-gpu-box", "--model", "gemma3-270m", "--max-tokens", "4", "--stats", "Hi"],
        a,
        &[],
    ));
    assert!(stderr(&forced).contains("ran on bobs-gpu-box"), "{}", stderr(&forced));
    // A chat turn with memory on A, its answer made on B.
    let chat = ok(kith_input(
        &["chat", "--peer", "bobs-gpu-box", "--model", "gemma3-270m", "--max-tokens", "4", "--stats"],
        a,
        b"Hello there\n/exit\n",
    ));
    assert!(stderr(&chat).contains("ran on bobs-gpu-box"), "{}", stderr(&chat));
    let usage = stdout(&ok(kith_with(&["peers", "usage"], b, &[])));
    assert!(usage.contains("alice") && usage.contains("3 requests"), "{usage}");

    // B caps alice's daily tokens: the next request is refused, naming the quota.
    let set = stdout(&ok(kith_with(&["peers", "set", "alice", "--tokens-per-day", "10"], b, &[])));
    assert!(set.contains("10 tokens/day"), "{set}");
    let refused = kith_with(&["ask", "--model", "gemma3-270m", "--max-tokens", "4", "Hi"], a, &[]);
    assert!(!refused.status.success(), "over quota");
    assert!(stderr(&refused).contains("daily token quota of 10 tokens"), "{}", stderr(&refused));

    // The trust list is sealed in the vault and survives a restart.
    let (status, rest) = served_a.terminate();
    assert!(status.success(), "{rest}");
    for entry in std::fs::read_dir(a).expect("home") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read");
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("bobs-gpu-box"), "the trust list is readable in {}", path.display());
        }
    }
    let served_a = serve(a, &env_a);
    assert!(stdout(&ok(kith_with(&["peers", "list"], a, &[]))).contains("bobs-gpu-box"));

    // Removal, on B's side: alice is gone and can no longer offload.
    let removed = stdout(&ok(kith_with(&["peers", "remove", "alice"], b, &[])));
    assert!(removed.contains("Removed alice"), "{removed}");
    let after =
        kith_with(&["ask", "--peer", "bobs-gpu-box", "--model", "gemma3-270m", "--max-tokens", "4", "Hi"], a, &[]);
    assert!(!after.status.success(), "B no longer serves A");
    let missing = kith_with(&["peers", "remove", "nobody"], b, &[]);
    assert!(!missing.status.success() && stderr(&missing).contains("no friend"), "{}", stderr(&missing));
    for served in [served_a, served_b] {
        let (status, rest) = served.terminate();
        assert!(status.success(), "{rest}");
    }
}
