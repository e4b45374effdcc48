//! One-time invites and the proof that an accepter knows an invite's secret.
//!
//! An invite code carries the inviter's peer id, its addresses, a 128-bit secret and an
//! expiry. The secret never crosses the wire: over the (already encrypted and
//! authenticated) pairing stream the inviter sends a fresh nonce and the accepter answers
//! with HMAC-SHA256(secret, context ‖ inviter ‖ accepter ‖ nonce). A recorded exchange is
//! useless for another pairing (new nonce, and the accepter's peer id is bound in).

use hmac::{Hmac, Mac};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const CODE_PREFIX: &str = "kith1";
const CODE_VERSION: u8 = 1;
const SECRET_LEN: usize = 16;
/// Addresses an invite carries at most (the code stays short).
const MAX_ADDRS: usize = 4;

/// An invite code that did not parse.
#[derive(Debug, thiserror::Error)]
#[error("not a Kith invite code: {0}")]
pub struct BadCode(&'static str);

/// What an invite code holds.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteCode {
    /// The inviting node.
    pub inviter: PeerId,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
    /// Unix seconds after which the invite is refused.
    pub expires: u64,
    secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteCode")
            .field("inviter", &self.inviter)
            .field("addrs", &self.addrs)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl InviteCode {
    /// A new invite from `inviter`, reachable at `addrs`, valid until `expires`.
    pub fn new(inviter: PeerId, addrs: Vec<Multiaddr>, expires: u64) -> Self {
        let mut secret = [0u8; SECRET_LEN];
        // An OS without a random source cannot run a node at all.
        getrandom::fill(&mut secret).expect("the OS random source");
        let mut addrs = addrs;
        addrs.truncate(MAX_ADDRS);
        Self { inviter, addrs, expires, secret }
    }

    /// The public id of the invite (the inviter looks the secret up by it).
    pub fn id(&self) -> String {
        invite_id(&self.secret)
    }

    /// The record the inviter keeps (sealed in its vault).
    pub fn pending(&self) -> PendingInvite {
        PendingInvite { id: self.id(), secret: hex(&self.secret), expires: self.expires, used: false }
    }

    /// The accepter's proof for `nonce`.
    pub fn proof(&self, accepter: &PeerId, nonce: &[u8]) -> String {
        hex(&mac(&self.secret, b"kith-pair-v1 accepter", &self.inviter, accepter, nonce))
    }

    /// Checks the inviter's answer to the accepter's proof.
    pub fn verify_welcome(&self, accepter: &PeerId, nonce: &[u8], proof: &str) -> bool {
        verify(&self.secret, b"kith-pair-v1 inviter", &self.inviter, accepter, nonce, proof)
    }

    /// The text form: `kith1` and lowercase base32 (also what a QR code would hold).
    pub fn encode(&self) -> String {
        let mut bytes = vec![CODE_VERSION];
        let peer = self.inviter.to_bytes();
        bytes.push(peer.len() as u8);
        bytes.extend_from_slice(&peer);
        bytes.extend_from_slice(&self.secret);
        bytes.extend_from_slice(&self.expires.to_be_bytes());
        bytes.push(self.addrs.len() as u8);
        for addr in &self.addrs {
            let addr = addr.to_vec();
            bytes.push(addr.len() as u8);
            bytes.extend_from_slice(&addr);
        }
        format!("{CODE_PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
    }

    /// Parses [`encode`](Self::encode)'s output (whitespace and case are ignored).
    pub fn decode(code: &str) -> Result<Self, BadCode> {
        let code: String = code.split_whitespace().collect::<String>().to_ascii_lowercase();
        let body = code.strip_prefix(CODE_PREFIX).ok_or(BadCode("it does not start with kith1"))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| BadCode("it is not base32"))?;
        let mut r = Reader(&bytes);
        if r.take(1)?[0] != CODE_VERSION {
            return Err(BadCode("it was made by a different version of Kith"));
        }
        let peer_len = r.take(1)?[0] as usize;
        let inviter = PeerId::from_bytes(r.take(peer_len)?).map_err(|_| BadCode("bad peer id"))?;
        let secret: [u8; SECRET_LEN] = r.take(SECRET_LEN)?.try_into().map_err(|_| BadCode("truncated"))?;
        let expires = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| BadCode("truncated"))?);
        let count = r.take(1)?[0] as usize;
        if count > MAX_ADDRS {
            return Err(BadCode("too many addresses"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.take(1)?[0] as usize;
            addrs.push(Multiaddr::try_from(r.take(len)?.to_vec()).map_err(|_| BadCode("bad address"))?);
        }
        if !r.0.is_empty() {
            return Err(BadCode("trailing bytes"));
        }
        Ok(Self { inviter, addrs, expires, secret })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadCode> {
        if self.0.len() < n {
            return Err(BadCode("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// An invite as its inviter keeps it, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInvite {
    /// Public id (hex).
    pub id: String,
    /// The secret (hex); this record lives in the sealed settings only.
    pub secret: String,
    /// Unix seconds.
    pub expires: u64,
    /// Whether someone paired with it already.
    pub used: bool,
}

impl PendingInvite {
    /// Checks an accepter's proof.
    pub fn verify(&self, inviter: &PeerId, accepter: &PeerId, nonce: &[u8], proof: &str) -> bool {
        let Some(secret) = unhex(&self.secret) else { return false };
        verify(&secret, b"kith-pair-v1 accepter", inviter, accepter, nonce, proof)
    }

    /// The inviter's own proof, sent with the welcome.
    pub fn welcome(&self, inviter: &PeerId, accepter: &PeerId, nonce: &[u8]) -> String {
        let secret = unhex(&self.secret).unwrap_or_default();
        hex(&mac(&secret, b"kith-pair-v1 inviter", inviter, accepter, nonce))
    }
}

fn invite_id(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"kith-invite-id");
    hasher.update(secret);
    hex(&hasher.finalize()[..8])
}

fn hmac_for(secret: &[u8], context: &[u8], inviter: &PeerId, accepter: &PeerId, nonce: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    for part in [context, &inviter.to_bytes(), &accepter.to_bytes(), nonce] {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn mac(secret: &[u8], context: &[u8], inviter: &PeerId, accepter: &PeerId, nonce: &[u8]) -> Vec<u8> {
    hmac_for(secret, context, inviter, accepter, nonce).finalize().into_bytes().to_vec()
}

/// Constant-time comparison through `hmac`'s `verify_slice`.
fn verify(secret: &[u8], context: &[u8], inviter: &PeerId, accepter: &PeerId, nonce: &[u8], proof: &str) -> bool {
    let Some(proof) = unhex(proof) else { return false };
    hmac_for(secret, context, inviter, accepter, nonce).verify_slice(&proof).is_ok()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn code_round_trips_and_proofs_check() {
        let inviter = Identity::generate().peer_id();
        let accepter = Identity::generate().peer_id();
        let addrs: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/tcp/4001".parse().expect("must succeed"),
            "/ip4/10.0.0.2/udp/4001/quic-v1".parse().expect("must succeed"),
        ];
        let invite = InviteCode::new(inviter, addrs.clone(), 1_900_000_000);
        let code = invite.encode();
        assert!(code.starts_with("kith1") && code.len() < 200, "{code}");
        let back = InviteCode::decode(&format!("  {}\n", code.to_uppercase())).expect("must succeed");
        assert_eq!(back, invite);
        assert_eq!(back.addrs, addrs);

        let pending = invite.pending();
        let nonce = [7u8; 32];
        let proof = back.proof(&accepter, &nonce);
        assert!(pending.verify(&inviter, &accepter, &nonce, &proof));
        // Bound to the nonce, the accepter and the secret.
        assert!(!pending.verify(&inviter, &accepter, &[8u8; 32], &proof));
        assert!(!pending.verify(&inviter, &Identity::generate().peer_id(), &nonce, &proof));
        let other = InviteCode::new(inviter, vec![], 1_900_000_000);
        assert!(!other.pending().verify(&inviter, &accepter, &nonce, &proof));
        assert!(!pending.verify(&inviter, &accepter, &nonce, "zz"));
        // The inviter's answer checks on the accepter's side, and is not the accepter's proof.
        let welcome = pending.welcome(&inviter, &accepter, &nonce);
        assert!(back.verify_welcome(&accepter, &nonce, &welcome));
        assert!(!back.verify_welcome(&accepter, &nonce, &proof));
    }

    #[test]
    fn bad_codes_are_errors() {
        let code = InviteCode::new(Identity::generate().peer_id(), vec![], 1).encode();
        for bad in ["", "kith1", "hello", "kith1!!!!", &code[..code.len() - 6], &format!("{code}aaaa")] {
            assert!(InviteCode::decode(bad).is_err(), "{bad}");
        }
    }
}
