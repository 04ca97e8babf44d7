//! The consistent-hash ring that maps slots to gateway nodes.
//!
//! Every process (gateways, backend, load generator) builds the same ring
//! from the same member list, so they agree on owners without talking.
//! The hasher is pinned and documented so that agreement survives Rust and
//! platform upgrades:
//!
//! - each member gets [`VIRTUAL_POINTS`] points on the ring, point `i` of
//!   node `n` at `xxh3_64("{n}#{i}")`;
//! - slot `s` is looked up at `xxh3_64("slot:{s}")` and owned by the first
//!   point clockwise (the `hashring` crate's lookup).
//!
//! Only raw bytes are fed to the hasher (never `Hash` impls of integers,
//! which are endian- and version-dependent).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::slot::SLOTS;

/// Points per member. 160 keeps the largest share of 1024 slots within
/// about 20% of the mean for a handful of nodes, and ring lookups cheap.
pub const VIRTUAL_POINTS: u32 = 160;

/// A gateway node as the ring knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub node_id: String,
    /// The `ws://host:port` base URL clients should use for this node.
    pub url: String,
}

impl std::str::FromStr for Member {
    type Err = String;

    /// Parses `node_id=ws://host:port`, the form of `--static-members` and
    /// the load generator's `--node`.
    fn from_str(s: &str) -> Result<Member, String> {
        let (id, url) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected node_id=ws://host:port"))?;
        if id.is_empty() {
            return Err(format!("{s:?}: the node id is empty"));
        }
        if !url.starts_with("ws://") && !url.starts_with("wss://") {
            return Err(format!("{s:?}: the URL must start with ws:// or wss://"));
        }
        Ok(Member { node_id: id.into(), url: url.trim_end_matches('/').into() })
    }
}

/// A ring point: hashed as the bytes `"{node}#{index}"`.
#[derive(Debug, Clone)]
struct Point {
    member: usize,
    key: String,
}

impl Hash for Point {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.key.as_bytes());
    }
}

/// A slot as a lookup key: hashed as the bytes `"slot:{s}"`.
struct SlotKey(String);

impl Hash for SlotKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// An immutable ring over a set of members, with the owner of every slot
/// precomputed (1024 entries), so `owner` is an array index.
#[derive(Debug, Clone)]
pub struct Ring {
    members: Vec<Member>,
    owners: Vec<u16>,
}

impl Ring {
    /// Builds the ring. Members are deduplicated by node id and sorted, so
    /// the order in which they were listed does not matter.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Ring {
        let by_id: BTreeMap<String, Member> = members.into_iter().map(|m| (m.node_id.clone(), m)).collect();
        let members: Vec<Member> = by_id.into_values().collect();
        let mut ring = HashRing::with_hasher(Xxh3DefaultBuilder);
        for (i, m) in members.iter().enumerate() {
            for p in 0..VIRTUAL_POINTS {
                ring.add(Point { member: i, key: format!("{}#{}", m.node_id, p) });
            }
        }
        let owners = if members.is_empty() {
            Vec::new()
        } else {
            (0..SLOTS)
                .map(|s| {
                    let point = ring.get(&SlotKey(format!("slot:{s}"))).expect("ring is not empty");
                    point.member as u16
                })
                .collect()
        };
        Ring { members, owners }
    }

    /// The members, sorted by node id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The owner of a slot; `None` only when the ring has no members.
    pub fn owner(&self, slot: u16) -> Option<&Member> {
        self.owners.get(usize::from(slot)).map(|&i| &self.members[usize::from(i)])
    }

    /// The index (in [`Ring::members`]) of the owner of a slot.
    pub fn owner_index(&self, slot: u16) -> Option<usize> {
        self.owners.get(usize::from(slot)).map(|&i| usize::from(i))
    }

    /// The index of `node_id` in [`Ring::members`].
    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.node_id == node_id)
    }

    /// The slots owned by `node_id`, ascending.
    pub fn slots_of(&self, node_id: &str) -> Vec<u16> {
        match self.members.iter().position(|m| m.node_id == node_id) {
            None => Vec::new(),
            Some(idx) => (0..SLOTS).filter(|&s| usize::from(self.owners[usize::from(s)]) == idx).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_parses_and_rejects() {
        let m: Member = "gw-1=ws://127.0.0.1:8084/".parse().unwrap();
        assert_eq!(m, Member { node_id: "gw-1".into(), url: "ws://127.0.0.1:8084".into() });
        assert!("gw-1".parse::<Member>().unwrap_err().contains("expected node_id="));
        assert!("gw-1=http://x".parse::<Member>().unwrap_err().contains("ws://"));
        assert!("=ws://x".parse::<Member>().unwrap_err().contains("empty"));
    }

    fn member(id: &str) -> Member {
        Member { node_id: id.into(), url: format!("ws://{id}") }
    }

    #[test]
    fn single_member_owns_everything() {
        let ring = Ring::new([member("a")]);
        assert_eq!(ring.slots_of("a").len(), usize::from(SLOTS));
        assert!(ring.slots_of("b").is_empty());
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert!(Ring::new([]).owner(0).is_none());
    }

    #[test]
    fn order_of_members_does_not_matter() {
        let a = Ring::new([member("a"), member("b"), member("c")]);
        let b = Ring::new([member("c"), member("a"), member("b")]);
        for s in 0..SLOTS {
            assert_eq!(a.owner(s), b.owner(s));
        }
    }

    #[test]
    fn every_slot_has_exactly_one_owner_and_shares_are_balanced() {
        let ring = Ring::new(["n1", "n2", "n3"].map(member));
        let counts: Vec<usize> = ["n1", "n2", "n3"].iter().map(|n| ring.slots_of(n).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), usize::from(SLOTS));
        for c in counts {
            // Mean is 341; consistent hashing with 160 points stays well inside this.
            assert!((240..450).contains(&c), "unbalanced share {c}");
        }
    }

    #[test]
    fn adding_a_node_moves_only_slots_to_it() {
        let three = Ring::new(["n1", "n2", "n3"].map(member));
        let four = Ring::new(["n1", "n2", "n3", "n4"].map(member));
        let mut moved = 0;
        for s in 0..SLOTS {
            let (before, after) = (three.owner(s).unwrap(), four.owner(s).unwrap());
            if before != after {
                assert_eq!(after.node_id, "n4", "slot {s} moved between old nodes");
                moved += 1;
            }
        }
        // About a quarter of 1024.
        assert!((150..400).contains(&moved), "moved {moved}");
    }
}
