//! The trust list, per-friend policy and the usage ledger: the state a node keeps
//! sealed in its vault (`mesh.state`), prompts never among it.

use std::collections::BTreeMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::DeviceId;
use crate::invite::PendingInvite;

/// Concurrent requests a new friend may run here.
pub const DEFAULT_CONCURRENT: u32 = 2;
/// Tokens (prompt + generated) a new friend may use here per day.
pub const DEFAULT_TOKENS_PER_DAY: u64 = 200_000;
/// Days of usage the ledger keeps per friend.
const LEDGER_DAYS: u64 = 31;

/// One trusted friend and what they may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Friend {
    /// The name used in commands (unique on this node).
    pub name: String,
    /// Their node's peer id.
    #[serde(with = "peer_id_text")]
    pub peer_id: PeerId,
    /// Models they may use here; `None` means every model this node serves.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Tokens (prompt + generated) per day they may use here; `None` means no limit.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Requests they may run here at once.
    pub max_concurrent: u32,
    /// Whether this node may send its own requests to them.
    pub offload_to: bool,
    /// Unix seconds when they were added.
    pub added: u64,
    /// Addresses they were last reached at (multiaddrs).
    #[serde(default)]
    pub addrs: Vec<String>,
}

impl Friend {
    /// A friend with the default policy.
    pub fn new(name: impl Into<String>, peer_id: PeerId, added: u64) -> Self {
        Self {
            name: name.into(),
            peer_id,
            models: None,
            tokens_per_day: Some(DEFAULT_TOKENS_PER_DAY),
            max_concurrent: DEFAULT_CONCURRENT,
            offload_to: true,
            added,
            addrs: Vec::new(),
        }
    }

    /// Their device id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::of(&self.peer_id)
    }

    /// Whether they may use `model` here.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// A change to a friend's policy (`kith peers set`); `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FriendUpdate {
    /// A new name.
    #[serde(default)]
    pub name: Option<String>,
    /// Models they may use (empty list: none; `["*"]`: all).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Tokens per day (`0`: no limit).
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Concurrent requests.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Whether this node may offload to them.
    #[serde(default)]
    pub offload_to: Option<bool>,
}

impl FriendUpdate {
    pub(crate) fn apply(self, friend: &mut Friend) {
        if let Some(name) = self.name {
            friend.name = name;
        }
        if let Some(models) = self.models {
            friend.models = if models.iter().any(|m| m == "*") { None } else { Some(models) };
        }
        if let Some(tokens) = self.tokens_per_day {
            friend.tokens_per_day = (tokens > 0).then_some(tokens);
        }
        if let Some(n) = self.max_concurrent {
            friend.max_concurrent = n;
        }
        if let Some(offload) = self.offload_to {
            friend.offload_to = offload;
        }
    }
}

/// One friend's use of this node on one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayUsage {
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    /// Requests served.
    pub requests: u64,
    /// Prompt tokens processed.
    pub tokens_in: u64,
    /// Tokens generated.
    pub tokens_out: u64,
}

/// Everything the mesh persists (sealed in the vault).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// This node's name, shown to friends.
    #[serde(default)]
    pub name: String,
    /// The trust list.
    #[serde(default)]
    pub friends: Vec<Friend>,
    /// Invites made here and not yet expired.
    #[serde(default)]
    pub invites: Vec<PendingInvite>,
    /// Usage per friend (peer id text) per day, newest last; counts only.
    #[serde(default)]
    pub usage: BTreeMap<String, Vec<DayUsage>>,
}

impl MeshState {
    /// The friend with this peer id.
    pub fn friend(&self, peer: &PeerId) -> Option<&Friend> {
        self.friends.iter().find(|f| f.peer_id == *peer)
    }

    /// The friend named `who`: a name, a peer id or a device id (prefix).
    pub fn find(&self, who: &str) -> Option<&Friend> {
        self.friends
            .iter()
            .find(|f| f.name == who)
            .or_else(|| self.friends.iter().find(|f| f.peer_id.to_string() == who))
            .or_else(|| {
                let mut matching = self.friends.iter().filter(|f| f.device_id().matches(who));
                let first = matching.next();
                if matching.next().is_some() { None } else { first }
            })
    }

    /// A name for a new friend: `wanted` or, if taken or empty, `wanted-2`, `wanted-3`…
    pub fn free_name(&self, wanted: &str) -> String {
        let base = if wanted.trim().is_empty() { "friend" } else { wanted.trim() };
        let taken = |name: &str| self.friends.iter().any(|f| f.name == name);
        if !taken(base) {
            return base.to_owned();
        }
        (2..).map(|n| format!("{base}-{n}")).find(|name| !taken(name)).unwrap_or_else(|| base.to_owned())
    }

    /// Tokens `peer` used on `day`.
    pub fn used_on(&self, peer: &PeerId, day: u64) -> DayUsage {
        self.usage
            .get(&peer.to_string())
            .and_then(|days| days.iter().find(|d| d.day == day))
            .copied()
            .unwrap_or(DayUsage { day, ..DayUsage::default() })
    }

    /// Adds one served request to the ledger.
    pub fn record(&mut self, peer: &PeerId, day: u64, tokens_in: u64, tokens_out: u64) {
        let days = self.usage.entry(peer.to_string()).or_default();
        match days.iter_mut().find(|d| d.day == day) {
            Some(d) => {
                d.requests += 1;
                d.tokens_in += tokens_in;
                d.tokens_out += tokens_out;
            }
            None => days.push(DayUsage { day, requests: 1, tokens_in, tokens_out }),
        }
        days.retain(|d| d.day + LEDGER_DAYS > day);
    }

    /// Drops invites that expired more than a week ago (until then a late try is told
    /// "expired" rather than "unknown").
    pub fn prune_invites(&mut self, now: u64) {
        self.invites.retain(|i| i.expires + 7 * 86_400 > now);
    }
}

mod peer_id_text {
    use libp2p::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&peer.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn find_names_ledger_and_updates() {
        let (a, b) = (Identity::generate().peer_id(), Identity::generate().peer_id());
        let mut state = MeshState { name: "me".into(), ..MeshState::default() };
        state.friends.push(Friend::new("ana", a, 1));
        assert_eq!(state.free_name("ana"), "ana-2");
        assert_eq!(state.free_name(" "), "friend");
        state.friends.push(Friend::new("ben", b, 1));
        assert_eq!(state.find("ben").map(|f| f.peer_id), Some(b));
        assert_eq!(state.find(&a.to_string()).map(|f| f.name.as_str()), Some("ana"));
        let device = DeviceId::of(&b).to_string();
        assert_eq!(state.find(&device[..9]).map(|f| f.name.as_str()), Some("ben"));
        assert!(state.find("nobody").is_none());

        state.record(&a, 100, 10, 5);
        state.record(&a, 100, 1, 1);
        state.record(&a, 140, 2, 2);
        assert_eq!(state.used_on(&a, 100).tokens_in, 0, "days older than the ledger keeps are dropped");
        assert_eq!(state.used_on(&a, 140), DayUsage { day: 140, requests: 1, tokens_in: 2, tokens_out: 2 });

        let mut ana = Friend::new("ana", a, 1);
        assert!(ana.may_use("x"));
        FriendUpdate { models: Some(vec!["gemma3-270m".into()]), tokens_per_day: Some(0), ..Default::default() }
            .apply(&mut ana);
        assert!(ana.may_use("gemma3-270m") && !ana.may_use("smollm2-135m"));
        assert_eq!(ana.tokens_per_day, None);
        let json = serde_json::to_string(&state).expect("must succeed");
        assert_eq!(serde_json::from_str::<MeshState>(&json).expect("must succeed"), state);
    }
}
