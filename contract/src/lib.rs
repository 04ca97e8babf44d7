//! The contract of `../shared/SPEC.md` in code: everything the backend, the
//! gateway nodes and the load generator must compute identically.
//!
//! - [`slot`]: which of the 1024 slots a user belongs to (xxh3_64 % 1024).
//! - [`ring`]: which gateway node owns a slot (consistent hashing, xxh3).
//! - [`event`]: the RabbitMQ message body and headers, and the event clients see.
//! - [`token`]: JWT claims, HS256 verification, and where a request carries its token.
//! - [`feedcache`]: the Redis feed cache layout (backend writes, gateways replay).
//! - [`membership`]: the Redis hash of live gateway nodes.
//! - [`topology`]: RabbitMQ exchange and queue names and their declaration.

pub mod event;
pub mod feedcache;
pub mod membership;
pub mod ring;
pub mod slot;
pub mod token;
pub mod topology;
