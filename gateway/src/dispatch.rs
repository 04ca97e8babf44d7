//! Handing one broker message to the sessions, and re-publishing the
//! recipients that are not this node's (see `routing`).

use std::collections::BTreeMap;
use std::time::Duration;

use contract::event::{self, HEADER_HOPS, HEADER_PUBLISHED_AT};
use contract::slot::slot_of;
use contract::topology::{self, header_u64};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::types::AMQPValue;

use crate::frame;
use crate::outbox::Queued;
use crate::routing::{Route, Routing, Source, route};
use crate::state::Gateway;

/// Marks a re-publish of a message drained from a departed node's queue,
/// so its receivers skip devices that registered after it (gateway-only
/// header; publishers never set it).
const HEADER_DRAINED: &str = "x-drained";

/// How far the publisher's clock (`x-published-at`) may lag this node's
/// and a drained event still reach every device that could have missed it
/// (NTP keeps hosts within a few milliseconds; on one host it is zero).
/// Larger means more duplicates after a node death, never fewer events.
const DRAINED_SKEW: Duration = Duration::from_millis(100);

/// Hands one message to the sessions. Returns the recipients to re-publish
/// (the publisher's ring view was stale), or `None` if it is unreadable.
pub fn dispatch(gw: &Gateway, delivery: &Delivery, source: Source) -> Option<Vec<String>> {
    let msg = match event::decode(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            gw.metrics.broker_bad_messages.increment(1);
            tracing::warn!(routing_key = %delivery.routing_key, error = %e, "unreadable broker message");
            return None;
        }
    };
    gw.metrics.broker_messages.increment(1);
    let headers = delivery.properties.headers().as_ref();
    let published_at_us = header_u64(headers, HEADER_PUBLISHED_AT).unwrap_or_else(event::now_micros);
    let hops = header_u64(headers, HEADER_HOPS).unwrap_or(0);
    let routing = Routing::of(source, delivery.routing_key.as_str(), hops);
    // A device registered more than a clock-skew margin after the event
    // was published recovered it from the feed (or connected without
    // `since`, so never expected it): a late copy from a departed queue
    // would only be a duplicate.
    let drained = source == Source::Departed || header_u64(headers, HEADER_DRAINED).is_some();
    // A detour (re-published or drained) may arrive after a newer event of
    // the same user: kept for a device that reconnects meanwhile (`late`).
    let detour = drained || hops > 0;
    let mut detour_id: Option<Option<String>> = None;
    let cutoff_us = if drained { published_at_us.saturating_add(DRAINED_SKEW.as_micros() as u64) } else { u64::MAX };
    let ring = gw.ring();
    let me = ring.index_of(gw.config.node_id());
    // Encoded once; every device gets the same bytes.
    let item = Queued { frame: frame::text(msg.event.get().as_bytes()), published_at_us };
    let (mut offline, mut dropped, mut slow, mut written) = (0u64, 0u64, 0u64, 0usize);
    let mut republish = Vec::new();
    for user in &msg.recipients {
        match route(&ring, me, routing, slot_of(user)) {
            Route::Here => {}
            Route::Republish => {
                republish.push(user.to_string());
                continue;
            }
            Route::Misrouted => gw.metrics.misrouted.increment(1),
        }
        let d = gw.sessions.deliver_registered_before(user, &item, cutoff_us);
        if d.written == 0 && d.queued == 0 && d.dropped == 0 {
            offline += 1;
            if detour && let Some(id) = detour_id.get_or_insert_with(|| event_id(msg.event.get())) {
                gw.late.keep(user, id, &item.frame);
                gw.metrics.late_kept.increment(1);
            }
        }
        written += d.written;
        dropped += d.dropped as u64;
        slow += d.slow_closed as u64;
    }
    if written > 0 {
        // Written straight from here: counted as the writer counts its own.
        gw.metrics.delivered.increment(written as u64);
        let latency = event::now_micros().saturating_sub(published_at_us) as f64 / 1e6;
        gw.metrics.latency.record_many(latency, written);
    }
    gw.metrics.recipients_offline.increment(offline);
    gw.metrics.dropped_slow.increment(dropped);
    gw.metrics.slow_closes.increment(slow);
    Some(republish)
}

/// The `id` of an event's JSON.
fn event_id(json: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<Id>(json).ok().map(|e| e.id.into_owned())
}

/// Re-publishes recipients grouped by this node's ring, with `x-hops` one
/// more than the message had. Returns the confirms: the original may be
/// acked once they all arrive.
pub async fn republish(
    gw: &Gateway,
    ch: &Channel,
    delivery: &Delivery,
    users: &[String],
    source: Source,
) -> anyhow::Result<Vec<lapin::PublisherConfirm>> {
    let msg = event::decode(&delivery.data)?;
    let ring = gw.ring();
    let mut groups: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for u in users {
        let owner = ring.owner_index(slot_of(u)).unwrap_or(0);
        groups.entry(owner).or_default().push(u);
    }
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let hops = header_u64(Some(&headers), HEADER_HOPS).unwrap_or(0);
    headers.insert(HEADER_HOPS.into(), AMQPValue::LongLongInt(hops as i64 + 1));
    if source == Source::Departed {
        headers.insert(HEADER_DRAINED.into(), AMQPValue::LongLongInt(1));
    }
    let mut confirms = Vec::with_capacity(groups.len());
    for recipients in groups.values() {
        let body = event::encode(recipients, &msg.event);
        confirms.push(topology::publish_group(ch, recipients, &body, headers.clone()).await?);
        gw.metrics.republished.increment(1);
    }
    Ok(confirms)
}
