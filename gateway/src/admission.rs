//! Who may hold a socket before proving who they are.
//!
//! A connection that has not finished its upgrade (or its plain HTTP
//! request) is *pending*: it counts against `max_unauthenticated`, a cap
//! far below `max_connections`, and must be done within
//! `handshake_timeout`. So sockets that never authenticate cannot fill the
//! node and keep real devices out. A per-source-address cap
//! (`max_connections_per_ip`, off by default: NAT and load generators put
//! many honest clients behind one address) bounds what one address holds
//! over a socket's whole life.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::state::Gateway;

/// Sockets per source address, for `max_connections_per_ip`.
#[derive(Default)]
pub struct PerAddress(DashMap<IpAddr, usize>);

impl PerAddress {
    /// Addresses holding sockets now (0 when the limit is off).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The source address already holds the most sockets allowed.
#[derive(Debug)]
pub struct AddressFull;

/// Counts one socket of an address while alive.
pub struct AddressGuard(Arc<Gateway>, IpAddr);

impl AddressGuard {
    /// Counts a socket from `ip`, or refuses it when that address holds the
    /// most allowed. `None` limit (0) means no limit and no bookkeeping.
    pub fn try_new(gw: &Arc<Gateway>, ip: IpAddr) -> Result<Option<AddressGuard>, AddressFull> {
        let max = gw.config.max_connections_per_ip;
        if max == 0 {
            return Ok(None);
        }
        match gw.per_address.0.entry(ip) {
            Entry::Occupied(mut e) => {
                if *e.get() >= max {
                    return Err(AddressFull);
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                e.insert(1);
            }
        }
        Ok(Some(AddressGuard(gw.clone(), ip)))
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        // Remove the entry with the last socket, so the map holds only
        // addresses with sockets open.
        if let Entry::Occupied(mut e) = self.0.per_address.0.entry(self.1) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Counts one pending (not yet upgraded) connection while alive.
pub struct PendingGuard(Arc<Gateway>);

impl PendingGuard {
    pub fn try_new(gw: &Arc<Gateway>) -> Option<PendingGuard> {
        let max = gw.config.max_unauthenticated.min(gw.config.max_connections);
        gw.pending_sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| PendingGuard(gw.clone()))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending_sockets.fetch_sub(1, Ordering::AcqRel);
    }
}
