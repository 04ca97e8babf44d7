//! RabbitMQ names and declarations. Declarations must match exactly across
//! every process that makes them (RabbitMQ refuses a redeclaration with
//! other arguments), so they live here and nowhere else.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind, PublisherConfirm};

use crate::event::{self, HEADER_PUBLISHED_AT};
use crate::slot::{routing_key, slot_of};

/// Direct exchange; routing key = recipient slot in decimal.
pub const EXCHANGE: &str = "feed.events";
/// Where messages that no gateway queue takes end up (no node alive).
pub const UNROUTABLE_EXCHANGE: &str = "feed.unroutable";
/// Holds unroutable messages so they are counted, not silently lost.
pub const UNROUTABLE_QUEUE: &str = "feed.unroutable";
/// Bound on the unroutable queue: it is a counter of last resort, the feed
/// cache is what recovery reads.
pub const UNROUTABLE_MAX_LENGTH: i64 = 100_000;

/// A node's queue is deleted by the broker this long after its last
/// consumer went away, so a dead node's queue does not live forever even
/// when no survivor cleans it up.
pub const NODE_QUEUE_EXPIRES: Duration = Duration::from_secs(60);
/// Events older than this are not worth pushing live any more; devices
/// recover them from the feed cache with `?since=`.
pub const NODE_QUEUE_MESSAGE_TTL: Duration = Duration::from_secs(60);

/// The queue of one incarnation of a gateway node. A node restarted under
/// the same id (or one that rejoins after it was dropped from the ring) is
/// a new incarnation with a queue of its own, so that survivors taking
/// over the old one never touch the new one.
pub fn node_queue(node_id: &str, incarnation: u64) -> String {
    format!("gateway.{node_id}.{incarnation}")
}

/// Declares `feed.events` with its alternate exchange, and the unroutable
/// exchange and queue. Idempotent.
pub async fn declare_exchanges(ch: &Channel) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(UNROUTABLE_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    let mut qargs = FieldTable::default();
    qargs.insert("x-max-length".into(), AMQPValue::LongLongInt(UNROUTABLE_MAX_LENGTH));
    ch.queue_declare(UNROUTABLE_QUEUE.into(), QueueDeclareOptions { durable: true, ..Default::default() }, qargs)
        .await?;
    ch.queue_bind(
        UNROUTABLE_QUEUE.into(),
        UNROUTABLE_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), AMQPValue::LongString(UNROUTABLE_EXCHANGE.into()));
    ch.exchange_declare(EXCHANGE.into(), ExchangeKind::Direct, durable, args).await?;
    Ok(())
}

/// Declares a node's queue: durable and not exclusive, so it survives a
/// connection blip and (with persistent messages, see [`publish_group`]) a
/// broker restart, with an expiry and a message TTL, so a dead node's
/// queue goes away.
pub async fn declare_node_queue(ch: &Channel, node_id: &str, incarnation: u64) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(NODE_QUEUE_EXPIRES.as_millis() as i64));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(NODE_QUEUE_MESSAGE_TTL.as_millis() as i64));
    ch.queue_declare(
        node_queue(node_id, incarnation).as_str().into(),
        QueueDeclareOptions { durable: true, ..Default::default() },
        args,
    )
    .await?;
    Ok(())
}

/// Publishes one message carrying `body` for `recipients` (all owned by the
/// same node) to `feed.events`. This is the one routing rule of SPEC: the
/// routing key is the first recipient's slot, which the owner binds.
/// `x-published-at` is set to now unless `headers` already carry it (a
/// re-publish keeps the original time). Returns the confirm to await on a
/// confirm channel. Messages are persistent (delivery mode 2): what sits in
/// a gateway's durable queue when the broker restarts is still there after
/// it, and a confirm means the broker has it on disk (or delivered it).
pub async fn publish_group(
    ch: &Channel,
    recipients: &[&str],
    body: &[u8],
    mut headers: FieldTable,
) -> lapin::Result<PublisherConfirm> {
    let first = recipients.first().copied().unwrap_or_default();
    if !headers.inner().contains_key(HEADER_PUBLISHED_AT) {
        headers.insert(HEADER_PUBLISHED_AT.into(), AMQPValue::LongLongInt(event::now_micros() as i64));
    }
    ch.basic_publish(
        EXCHANGE.into(),
        routing_key(slot_of(first)).as_str().into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT),
    )
    .await
}

/// AMQP delivery mode of a message the broker writes to disk.
pub const PERSISTENT: u8 = 2;

/// Reads an integer AMQP header of any integer type.
pub fn header_u64(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    let v = headers?.inner().get(name)?;
    match *v {
        AMQPValue::ShortShortInt(i) => u64::try_from(i).ok(),
        AMQPValue::ShortShortUInt(i) => Some(u64::from(i)),
        AMQPValue::ShortInt(i) => u64::try_from(i).ok(),
        AMQPValue::ShortUInt(i) => Some(u64::from(i)),
        AMQPValue::LongInt(i) => u64::try_from(i).ok(),
        AMQPValue::LongUInt(i) => Some(u64::from(i)),
        AMQPValue::LongLongInt(i) => u64::try_from(i).ok(),
        AMQPValue::Timestamp(i) => Some(i),
        _ => None,
    }
}
