//! One task pings every device and drops the silent ones, instead of a
//! timer per connection (a timer is memory every idle device would carry).
//! It also closes devices whose token has expired (1008).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use contract::token::unix_now;

use crate::frame;
use crate::outbox::Close;
use crate::state::Gateway;

/// A device that answered none of this many pings in a row is dropped.
const MAX_MISSED_PINGS: u8 = 2;

/// Each ping interval is cut into this many sweeps, each over the devices
/// whose id falls in its slice: every device is still pinged once per
/// interval, but a node of 19,500 devices sends ~1,000 pings (and gets
/// ~1,000 pongs) at a time instead of all at once, which showed as a
/// latency spike every interval under load.
const SLICES: u64 = 20;

/// Close code for a device whose token expired while connected.
pub const CLOSE_POLICY: crate::close::CloseCode = crate::close::CloseCode::Policy;

pub async fn run(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(gw.config.ping_interval / SLICES as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // The first tick is immediate; devices just connected.
    let ping = frame::encode(frame::OP_PING, b"");
    for sweep in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => return,
        }
        let now = unix_now();
        let (mut dropped, mut expired) = (0usize, 0usize);
        let slice = sweep % SLICES;
        gw.sessions.for_each_device_where(
            |d| d.id % SLICES == slice,
            |d| {
                if d.token_expires_at <= now {
                    if d.outbox.close(Close::Frame { code: CLOSE_POLICY, reason: "token expired".into() }) {
                        gw.metrics.closed(crate::close::CloseReason::TokenExpired);
                    }
                    expired += 1;
                } else if d.missed_pings.fetch_add(1, Ordering::Relaxed) >= MAX_MISSED_PINGS {
                    if d.outbox.close(Close::Abort) {
                        gw.metrics.closed(crate::close::CloseReason::PingTimeout);
                    }
                    dropped += 1;
                } else {
                    d.outbox.push_control(ping.clone());
                }
            },
        );
        if dropped + expired > 0 {
            tracing::info!(dropped, expired, "keepalive closed devices");
        }
    }
}
