//! `kith`: a private AI assistant that runs on your own machine.

mod bench;
mod chat;
mod cli;
mod config;
mod memory;
mod models;
mod peers;
mod progress;
mod remote;
mod serve;
mod vault;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // The config file fills in what flags and KITH_* variables left at their defaults.
    let file = match config::load() {
        Ok(file) => file,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let threads_given = cli.threads;
    if cli.threads.is_none() {
        cli.threads = file.threads;
    }
    if let Some((_, sub)) = matches.subcommand() {
        let applied = match &mut cli.command {
            Command::Ask(args) => config::apply_model(&file, &mut args.model, sub),
            Command::Chat(args) => config::apply_model(&file, &mut args.model, sub),
            Command::Bench(args) => config::apply_model(&file, &mut args.model, sub),
            Command::Serve(args) => config::apply_serve(&file, args, sub),
            _ => Ok(()),
        };
        if let Err(err) = applied {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(threads) = cli.threads {
        set_thread_count(threads);
    }
    init_logging(cli.verbose);
    if cli.no_node {
        remote::force_in_process();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Ask(args) => chat::ask(args).await,
            Command::Chat(args) => chat::chat(args).await,
            Command::Models(args) => models::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Vault(args) => vault::run(args),
            Command::Memory(args) => memory::run(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Peers(args) => peers::run(args).await,
            Command::Token => serve::token(),
            Command::Config => {
                config::show(threads_given, if threads_given.is_some() { "flag or KITH_THREADS" } else { "default" })
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            // The whole chain, one cause per line, as ripgrep does.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// candle sizes its two thread pools from these variables on first use, so they are set
/// before anything else runs.
#[allow(unsafe_code)]
fn set_thread_count(threads: usize) {
    let value = threads.max(1).to_string();
    // SAFETY: called first thing in `main`, before any other thread exists, so nothing
    // can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &value);
        std::env::set_var("CANDLE_NUM_THREADS", &value);
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "kith=warn",
        1 => "kith=info",
        2 => "kith=debug",
        _ => "kith=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KITH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
