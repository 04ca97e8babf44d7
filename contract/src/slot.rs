//! Slots: the fixed unit of sharding. A user's slot never depends on how
//! many gateways run; only the owner of a slot does.

use xxhash_rust::xxh3::xxh3_64;

/// Number of slots. Fixed by the contract: changing it re-shards every user.
pub const SLOTS: u16 = 1024;

/// Longest user id the contract allows, in bytes.
pub const MAX_USER_ID_LEN: usize = 64;

/// The slot of a user: `xxh3_64(user_id as UTF-8) % 1024`.
pub fn slot_of(user_id: &str) -> u16 {
    (xxh3_64(user_id.as_bytes()) % u64::from(SLOTS)) as u16
}

/// The AMQP routing key of a slot: the slot in decimal.
pub fn routing_key(slot: u16) -> String {
    slot.to_string()
}

/// Parses a routing key back into a slot; `None` if it is not one.
pub fn parse_routing_key(key: &str) -> Option<u16> {
    key.parse::<u16>().ok().filter(|s| *s < SLOTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_xxh3_mod_1024() {
        // Reference value computed independently: xxh3_64("") = 0x2d06800538d394c2.
        assert_eq!(slot_of(""), (0x2d06800538d394c2u64 % 1024) as u16);
        assert!(slot_of("any user") < SLOTS);
    }

    #[test]
    fn routing_keys_round_trip() {
        for s in [0, 1, 512, 1023] {
            assert_eq!(parse_routing_key(&routing_key(s)), Some(s));
        }
        assert_eq!(parse_routing_key("1024"), None);
        assert_eq!(parse_routing_key("x"), None);
    }
}
