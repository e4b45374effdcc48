//! Deny by default: a connection whose peer is not on the trust list is closed as soon
//! as the handshake has told us who it is, before any protocol stream is negotiated.
//! The one exception is pairing: while an invite is open, unknown peers may connect,
//! and the stream handlers serve them `/kith/pair/1` only.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Who may hold a connection, shared between the swarm and the mesh handle.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    /// The trust list's peers.
    pub(crate) trusted: HashSet<PeerId>,
    /// An invite is open: unknown peers may connect to pair.
    pub(crate) pairing_open: bool,
    /// Inviters this node is pairing with now (outbound).
    pub(crate) joining: HashSet<PeerId>,
}

#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not on the trust list")]
pub(crate) struct NotTrusted(PeerId);

pub(crate) struct Gate {
    pub(crate) admission: Arc<RwLock<Admission>>,
    pub(crate) denied: Arc<AtomicU64>,
}

impl Gate {
    fn check(&self, peer: PeerId, inbound: bool) -> Result<(), ConnectionDenied> {
        let allowed = self
            .admission
            .read()
            .is_ok_and(|a| a.trusted.contains(&peer) || a.joining.contains(&peer) || (inbound && a.pairing_open));
        if allowed {
            Ok(())
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "connection from a peer not on the trust list closed");
            Err(ConnectionDenied::new(NotTrusted(peer)))
        }
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, true)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, false)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
