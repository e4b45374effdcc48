//! `kith peers …`: pairing and the trust list, through the running node's `/api/peers`.

use std::process::ExitCode;

use anyhow::{Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::{PeersArgs, PeersCommand};
use crate::remote::Remote;

async fn node() -> Result<Remote> {
    let home = kith_models::Store::from_env()?.home().to_owned();
    match crate::remote::connect(&home).await? {
        Some(remote) => Ok(remote),
        None => bail!(
            "no node is running for {}: peers live in the node, start it with `kith serve` (with a vault)",
            home.display()
        ),
    }
}

pub(crate) async fn run(args: PeersArgs) -> Result<ExitCode> {
    let node = node().await?;
    match args.command {
        PeersCommand::Invite { hours } => {
            let invite =
                node.send(Method::POST, "/api/peers/invite", Some(&json!({ "ttl_s": hours.min(168) * 3600 }))).await?;
            println!("{}", invite["code"].as_str().unwrap_or_default());
            eprintln!(
                "Give this code to your friend: `kith peers accept CODE` on their node. It works once and expires in {hours} h.\nThis node's device id: {}",
                invite["device_id"].as_str().unwrap_or_default()
            );
        }
        PeersCommand::Accept { code } => {
            let friend = node.send(Method::POST, "/api/peers/accept", Some(&json!({ "code": code }))).await?;
            println!(
                "Paired with {} (device id {}). Check that id with them.",
                friend["name"].as_str().unwrap_or_default(),
                friend["device_id"].as_str().unwrap_or_default()
            );
        }
        PeersCommand::List => {
            let list = node.get("/api/peers").await?;
            let me = &list["node"];
            println!("This node: {}  device id {}", me["name"].as_str().unwrap_or_default(), text(&me["device_id"]));
            let peers = list["peers"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                println!("No friends yet: `kith peers invite` makes a code for one.");
            }
            for peer in peers {
                print_peer(&peer);
            }
        }
        PeersCommand::Remove { who } => {
            let removed = node.send(Method::DELETE, &format!("/api/peers/{}", path_segment(&who)), None).await?;
            println!("Removed {}: connections closed, running requests stopped.", text(&removed["name"]));
        }
        PeersCommand::Set { who, name, models, tokens_per_day, concurrent, offload } => {
            let mut update = serde_json::Map::new();
            if let Some(name) = name {
                update.insert("name".into(), name.into());
            }
            if let Some(models) = models {
                let models: Vec<String> = models.into_iter().filter(|m| !m.is_empty()).collect();
                update.insert("models".into(), models.into());
            }
            if let Some(tokens) = tokens_per_day {
                update.insert("tokens_per_day".into(), tokens.into());
            }
            if let Some(n) = concurrent {
                update.insert("max_concurrent".into(), n.into());
            }
            if let Some(offload) = offload {
                update.insert("offload_to".into(), offload.into());
            }
            if update.is_empty() {
                bail!("nothing to change: give --name, --models, --tokens-per-day, --concurrent or --offload");
            }
            let path = format!("/api/peers/{}", path_segment(&who));
            let friend = node.send(Method::PATCH, &path, Some(&Value::Object(update))).await?;
            print_peer(&friend);
        }
        PeersCommand::Usage => {
            let usage = node.get("/api/peers/usage").await?;
            for friend in usage.as_array().cloned().unwrap_or_default() {
                let quota = friend["tokens_per_day"]
                    .as_u64()
                    .map_or("no daily limit".to_owned(), |q| format!("{q} tokens/day"));
                println!("{} ({quota})", text(&friend["name"]));
                let days = friend["days"].as_array().cloned().unwrap_or_default();
                if days.is_empty() {
                    println!("  nothing yet");
                }
                for day in days {
                    println!(
                        "  {}  {} requests  {} tokens in  {} tokens out",
                        text(&day["date"]),
                        day["requests"],
                        day["tokens_in"],
                        day["tokens_out"]
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn print_peer(peer: &Value) {
    let state = if peer["connected"].as_bool().unwrap_or(false) {
        let rtt = peer["rtt_ms"].as_f64().map(|ms| format!(", {ms:.1} ms")).unwrap_or_default();
        format!("connected ({}{rtt})", peer["path"].as_str().unwrap_or("direct"))
    } else {
        "not connected".to_owned()
    };
    let models = match peer["models"].as_array() {
        None => "all models".to_owned(),
        Some(m) if m.is_empty() => "no models".to_owned(),
        Some(m) => m.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
    };
    let quota = peer["tokens_per_day"].as_u64().map_or("no daily limit".to_owned(), |q| format!("{q} tokens/day"));
    println!("{}  device id {}  {state}", text(&peer["name"]), text(&peer["device_id"]));
    println!(
        "  may use here: {models}, {quota}, {} at a time; offload to them: {}",
        peer["max_concurrent"],
        if peer["offload_to"].as_bool().unwrap_or(false) { "on" } else { "off" }
    );
    for offer in peer["offers"].as_array().cloned().unwrap_or_default() {
        let speed = match offer["tokens_per_s"].as_f64().unwrap_or(0.0) {
            0.0 => "speed not measured yet".to_owned(),
            speed => format!("{speed:.0} tok/s"),
        };
        println!(
            "  offers {} on {} ({speed}, {} queued)",
            text(&offer["model"]),
            text(&offer["device"]),
            offer["queued"]
        );
    }
}

/// A name as one URL path segment.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
