//! `kith vault`: create the vault key and manage its passphrase.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_memory::Vault;
use kith_memory::secrecy::{ExposeSecret, SecretString};
use kith_models::Store;

use crate::cli::{VaultArgs, VaultCommand};

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
            } else {
                println!("no vault in {} (create one with `kith vault init`)", store.home().display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
