//! A node's identity: an Ed25519 key (libp2p's peer id comes from it) and the
//! human-checkable device id people compare when they pair.

use libp2p::PeerId;
use libp2p::identity::Keypair;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The node's key pair. The secret half only leaves as sealed bytes for the vault.
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("peer_id", &self.peer_id()).finish_non_exhaustive()
    }
}

/// The stored identity did not decode.
#[derive(Debug, thiserror::Error)]
#[error("the stored mesh identity is not a valid Ed25519 key")]
pub struct BadIdentity;

impl Identity {
    /// A new random identity.
    pub fn generate() -> Self {
        Self { keypair: Keypair::generate_ed25519() }
    }

    /// The identity from [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BadIdentity> {
        let keypair = Keypair::from_protobuf_encoding(bytes).map_err(|_| BadIdentity)?;
        keypair.clone().try_into_ed25519().map_err(|_| BadIdentity)?;
        Ok(Self { keypair })
    }

    /// The key pair's encoding, secret included: store it sealed only.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.keypair.to_protobuf_encoding().unwrap_or_default())
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The device id people compare.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::of(&self.peer_id())
    }

    pub(crate) fn keypair(&self) -> Keypair {
        self.keypair.clone()
    }
}

/// A short, human-checkable form of a peer id: 160 bits of its SHA-256, base32, in
/// eight groups of four (`MFRG-GZDF-…`), like Syncthing's device ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// The device id of `peer`.
    pub fn of(peer: &PeerId) -> Self {
        let digest = Sha256::digest(peer.to_bytes());
        let text = data_encoding::BASE32_NOPAD.encode(&digest[..20]);
        let groups: Vec<&str> = text.as_bytes().chunks(4).filter_map(|c| std::str::from_utf8(c).ok()).collect();
        Self(groups.join("-"))
    }

    /// Whether `text` (any case, dashes optional) is this id or a prefix of at least 4 characters.
    pub fn matches(&self, text: &str) -> bool {
        let wanted: String = text.chars().filter(|c| *c != '-').collect::<String>().to_ascii_uppercase();
        let own: String = self.0.chars().filter(|c| *c != '-').collect();
        wanted.len() >= 4 && own.starts_with(&wanted)
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_device_id_is_stable() {
        let id = Identity::generate();
        let back = Identity::from_bytes(&id.to_bytes()).expect("must succeed");
        assert_eq!(back.peer_id(), id.peer_id());
        let device = id.device_id().to_string();
        assert_eq!(device.len(), 8 * 4 + 7);
        assert_eq!(device, back.device_id().to_string());
        assert!(id.device_id().matches(&device[..9].to_lowercase()));
        assert!(!id.device_id().matches("AB"));
        assert_ne!(device, Identity::generate().device_id().to_string());
        assert!(Identity::from_bytes(b"not a key").is_err());
    }
}
