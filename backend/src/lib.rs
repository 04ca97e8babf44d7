//! The social network backend: the OTUS Highload Architect HTTP API over
//! PostgreSQL, a Redis feed cache, and the fan-out of new posts to
//! followers' feeds and, through RabbitMQ, to the gateways' devices.
//!
//! - [`config`]: settings (flags and environment), validated at start.
//! - [`server`]: the process's life: API, workers, graceful shutdown.
//! - [`http`]: router, request ids, error bodies, metrics, extractors.
//! - [`users`], [`friends`], [`posts`], [`dialogs`]: the API handlers.
//! - [`feed`]: the Redis feed cache (ids per user, bodies per post).
//! - [`outbox`]: fan-out jobs in PostgreSQL, written with the post change.
//! - [`fanout`]: workers: followers in pages, feeds, ring-grouped events.
//! - [`broker`]: the workers' RabbitMQ link (cluster nodes, publish).
//! - [`db`]: PostgreSQL pool, database creation, migrations.
//! - [`password`]: argon2id hashes.
//! - [`throttle`]: failed-login throttling per account and per address.
//! - [`validate`]: input checks and their limits.
//! - [`error`]: the API's errors and their HTTP answers.
//! - [`metrics`]: Prometheus names and handles.
//! - [`state`]: what the parts share.
//! - [`web`]: the demo page at `/` and its `/config.json`.

pub mod broker;
pub mod config;
pub mod db;
pub mod dialogs;
pub mod error;
pub mod fanout;
pub mod feed;
pub mod friends;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod password;
pub mod posts;
pub mod server;
pub mod state;
pub mod throttle;
pub mod users;
pub mod validate;
pub mod web;

pub use config::Config;
pub use server::{run, run_workers, serve};
pub use state::Backend;
