//! `kith vault`: create the vault key and manage its passphrase.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_memory::secrecy::{ExposeSecret, SecretString};
use kith_memory::{Keyring, KeyringError, MemoryStore, StoreError, Vault};
use kith_models::Store;

use crate::cli::{KeyringState, VaultArgs, VaultCommand};

pub(crate) fn run(args: VaultArgs) -> Result<ExitCode> {
    let store = Store::from_env()?;
    let vault = Vault::new(store.home());
    match args.command {
        VaultCommand::Init { devices } => {
            if vault.exists() {
                bail!("a vault already exists in {}", store.home().display());
            }
            let recipients = devices
                .iter()
                .map(|d| {
                    d.parse::<kith_memory::age::x25519::Recipient>().map_err(|e| anyhow::anyhow!("--device {d}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let passphrase =
                passphrase("KITH_PASSPHRASE", args.passphrase_file.as_deref(), "New vault passphrase", true)?;
            vault.init(&passphrase, &recipients).context("creating the vault")?;
            eprintln!(
                "Vault created in {} (for the passphrase{}).",
                store.home().join("vault").display(),
                if recipients.is_empty() { String::new() } else { format!(" and {} device(s)", recipients.len()) }
            );
        }
        VaultCommand::Passwd { new_passphrase_file } => {
            let old = passphrase("KITH_PASSPHRASE", args.passphrase_file.as_deref(), "Current passphrase", false)?;
            let new = passphrase("KITH_NEW_PASSPHRASE", new_passphrase_file.as_deref(), "New passphrase", true)?;
            vault.change_passphrase(&old, &new).context("changing the passphrase")?;
            eprintln!("Passphrase changed.");
        }
        VaultCommand::Unlock => {
            let passphrase = passphrase("KITH_PASSPHRASE", args.passphrase_file.as_deref(), "Passphrase", false)?;
            vault.unlock(&passphrase).context("unlocking the vault")?;
            eprintln!("The passphrase opens the vault.");
        }
        VaultCommand::Status => {
            if vault.exists() {
                println!("vault: {}", store.home().join("vault").display());
                println!("OS keyring: {}", if Keyring::enabled(&vault) { "on" } else { "off" });
            } else {
                println!("no vault in {} (create one with `kith vault init`)", store.home().display());
            }
        }
        VaultCommand::Keyring { state: KeyringState::On } => {
            if !vault.exists() {
                bail!("no vault in {}; create one with `kith vault init`", store.home().display());
            }
            // Find out first whether there is a keyring at all, before asking for anything.
            let keyring = Keyring::platform()?;
            let passphrase = passphrase("KITH_PASSPHRASE", args.passphrase_file.as_deref(), "Passphrase", false)?;
            let key = vault.unlock(&passphrase).context("unlocking the vault")?;
            keyring.remember(&vault, &key)?;
            eprintln!(
                "The vault key is now in the OS keyring: Kith opens the vault without the passphrase while your session is unlocked."
            );
        }
        VaultCommand::Keyring { state: KeyringState::Off } => match Keyring::platform() {
            Ok(keyring) => {
                let had = keyring.forget(&vault)?;
                eprintln!(
                    "{}",
                    if had {
                        "Removed the vault key from the OS keyring."
                    } else {
                        "The OS keyring held no vault key."
                    }
                );
            }
            Err(err @ KeyringError::Unavailable(_)) => {
                // Nothing can be removed from a keyring that is not there; stop using it.
                Keyring::disable(&vault)?;
                eprintln!("warning: {err}\nKith will no longer look for the key there.");
            }
            Err(err) => return Err(err.into()),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Unlocks the vault under `home` (from the OS keyring where the user opted in, else
/// with the passphrase) and opens its memory store.
pub(crate) async fn open_store(home: &Path, passphrase_file: Option<&Path>) -> Result<MemoryStore> {
    let vault = Vault::new(home);
    if !vault.exists() {
        bail!("no vault in {}; create one with `kith vault init`", home.display());
    }
    if Keyring::enabled(&vault) {
        match Keyring::platform().and_then(|keyring| keyring.recall(&vault)) {
            Ok(Some(key)) => match MemoryStore::open(home, &key).await {
                Ok(store) => {
                    tracing::info!("vault unlocked from the OS keyring");
                    return Ok(store);
                }
                Err(StoreError::OtherVault(_)) => {
                    eprintln!("warning: the key in the OS keyring does not open this vault; using the passphrase");
                }
                Err(err) => return Err(err).context("opening the memory store"),
            },
            Ok(None) => eprintln!("warning: the OS keyring holds no key for this vault; using the passphrase"),
            Err(err) => eprintln!("warning: {err}"),
        }
    }
    let key = vault
        .unlock(&passphrase("KITH_PASSPHRASE", passphrase_file, "Vault passphrase", false)?)
        .context("unlocking the vault")?;
    MemoryStore::open(home, &key).await.context("opening the memory store")
}

/// A passphrase from the environment variable, the file's first line, or the terminal
/// (asked twice when `confirm`).
pub(crate) fn passphrase(env: &str, file: Option<&Path>, prompt: &str, confirm: bool) -> Result<SecretString> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let line = text.lines().next().unwrap_or_default().to_owned();
        return Ok(SecretString::from(line));
    }
    if let Ok(value) = std::env::var(env) {
        return Ok(SecretString::from(value));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set {env} or pass a passphrase file (not a terminal, so cannot ask)");
    }
    let first =
        SecretString::from(rpassword::prompt_password(format!("{prompt}: ")).context("reading the passphrase")?);
    if confirm {
        let again = rpassword::prompt_password("Again: ").context("reading the passphrase")?;
        if again != first.expose_secret() {
            bail!("the two passphrases differ");
        }
    }
    Ok(first)
}
