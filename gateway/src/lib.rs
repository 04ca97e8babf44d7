//! A gateway node: holds users' devices (WebSocket or SSE), consumes the slots the
//! ring gives it from RabbitMQ, and pushes every event to every device of
//! each recipient.
//!
//! - [`config`]: settings (flags and environment), validated at start.
//! - [`server`]: accept loop, node lifecycle, graceful shutdown.
//! - [`http`]: the HTTP routes, authentication before upgrade.
//! - [`admission`]: limits on sockets before they authenticate, per address.
//! - [`connection`]: one device: reader in its task, writer in another.
//! - [`frame`]: lean server-side WebSocket framing.
//! - [`close`]: the close codes the gateway sends and those a client may.
//! - [`outbox`]: a device's bounded send queue.
//! - [`sessions`]: user id to live devices (DashMap), delivery.
//! - [`broker`]: the RabbitMQ connection: connect, declare, consume, ack;
//!   fences the node when its queue was lost.
//! - [`acks`]: the consumer's acks, in order, after re-publish confirms.
//! - [`bindings`]: a queue's slot bindings.
//! - [`rebalance`]: adopting a new view of the ring, make before break,
//!   with the take-over of departed incarnations' queues.
//! - [`routing`]: where one recipient goes (here, re-publish, misrouted).
//! - [`dispatch`]: one message to the sessions; one-hop re-publish.
//! - [`departed`]: survivors drain a departed queue, then delete it.
//! - [`handover`]: a (re)joined node serves its users only once every
//!   peer routes them to it.
//! - [`membership`]: Redis heartbeats, evidence-based staleness, eviction,
//!   the delivery lease.
//! - [`proxy`]: a non-owner relays a device to its owner node.
//! - [`sse`]: the same events as Server-Sent Events (stream, format, relay).
//! - [`takeover`]: the accepted socket, which an SSE handler takes from hyper.
//! - [`recovery`]: `?since=` replays, bounded, shared and queued.
//! - [`late`]: detoured events for absent users, added to their replays.
//! - [`keepalive`]: pings, silent-peer and token-expiry sweeps.
//! - [`metrics`]: Prometheus names and handles.
//! - [`state`]: what the parts share.

pub mod acks;
pub mod admission;
pub mod bindings;
pub mod broker;
pub mod close;
pub mod config;
pub mod connection;
pub mod departed;
pub mod dispatch;
pub mod frame;
pub mod handover;
pub mod http;
pub mod keepalive;
pub mod late;
pub mod membership;
pub mod metrics;
pub mod outbox;
pub mod proxy;
pub mod rebalance;
pub mod recovery;
pub mod routing;
pub mod server;
pub mod sessions;
pub mod sse;
pub mod state;
pub mod takeover;

pub use config::Config;
pub use server::{run, serve};
pub use state::Gateway;
