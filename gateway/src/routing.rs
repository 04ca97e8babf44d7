//! Where one recipient of a broker message goes: a pure function of the
//! ring, the message's routing and this node, used by the consumer of the
//! node's own queue and by the take-over of a departed node's queue alike.

use contract::ring::Ring;
use contract::slot::parse_routing_key;

/// Where a message was consumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This node's own queue: the routing slot is one this node bound.
    Bound,
    /// A departed node's queue: nothing about its routing is ours.
    Departed,
}

/// What to do with one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Deliver to the devices this node holds.
    Here,
    /// Not ours, and the publisher's (or the departed node's) ring view was
    /// stale: re-publish once, by this node's ring.
    Republish,
    /// Not ours, and it already hopped as often as allowed: delivered here
    /// anyway (to whatever devices this node holds) and counted.
    Misrouted,
}

/// Most hops a message drained from a departed node's queue may have
/// behind it and still be re-published: it may already be a re-publish
/// (hop 1) that reached the dead node's queue before the new owner bound.
pub const MAX_HOPS_DRAINED: u64 = 1;

/// What routing one message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    /// The slot it was routed by, if that slot counts as ours: one we bound
    /// counts even if the ring moved it since; a departed queue's does not.
    pub routing_slot: Option<u16>,
    pub may_republish: bool,
}

impl Routing {
    pub fn of(source: Source, routing_key: &str, hops: u64) -> Routing {
        match source {
            Source::Bound => Routing { routing_slot: parse_routing_key(routing_key), may_republish: hops == 0 },
            Source::Departed => Routing { routing_slot: None, may_republish: hops <= MAX_HOPS_DRAINED },
        }
    }
}

/// Where the recipient whose slot is `slot` goes, on this node (`me`, its
/// index in `ring`, `None` when it is not a member).
pub fn route(ring: &Ring, me: Option<usize>, routing: Routing, slot: u16) -> Route {
    if Some(slot) == routing.routing_slot || (me.is_some() && ring.owner_index(slot) == me) {
        Route::Here
    } else if routing.may_republish {
        Route::Republish
    } else {
        Route::Misrouted
    }
}

#[cfg(test)]
mod tests {
    use contract::ring::Member;
    use contract::slot::SLOTS;

    use super::*;

    fn ring() -> Ring {
        Ring::new(["a", "b", "c"].map(|n| Member { node_id: n.into(), url: format!("ws://{n}") }))
    }

    #[test]
    fn own_slots_and_the_routing_slot_are_delivered_here_the_rest_hops_once() {
        let ring = ring();
        let me = ring.index_of("a");
        let mine = (0..SLOTS).find(|&s| ring.owner_index(s) == me).unwrap();
        let theirs = (0..SLOTS).find(|&s| ring.owner_index(s) != me).unwrap();
        let other = (0..SLOTS).filter(|&s| ring.owner_index(s) != me).nth(1).unwrap();
        let fresh = Routing::of(Source::Bound, &theirs.to_string(), 0);
        assert_eq!(route(&ring, me, fresh, mine), Route::Here);
        // Bound by us (the ring moved it since): still ours to deliver.
        assert_eq!(route(&ring, me, fresh, theirs), Route::Here);
        assert_eq!(route(&ring, me, fresh, other), Route::Republish);
        let hopped = Routing::of(Source::Bound, &theirs.to_string(), 1);
        assert_eq!(route(&ring, me, hopped, other), Route::Misrouted);
    }

    #[test]
    fn a_departed_queue_routes_by_the_ring_alone_and_allows_one_more_hop() {
        let ring = ring();
        let me = ring.index_of("a");
        let mine = (0..SLOTS).find(|&s| ring.owner_index(s) == me).unwrap();
        let theirs = (0..SLOTS).find(|&s| ring.owner_index(s) != me).unwrap();
        let drained = Routing::of(Source::Departed, &theirs.to_string(), 1);
        assert_eq!(route(&ring, me, drained, mine), Route::Here);
        assert_eq!(route(&ring, me, drained, theirs), Route::Republish);
        let twice = Routing::of(Source::Departed, &theirs.to_string(), 2);
        assert_eq!(route(&ring, me, twice, theirs), Route::Misrouted);
        // Not a member (fenced): nothing is ours.
        assert_eq!(route(&ring, None, drained, mine), Route::Republish);
    }
}
