//! The devices this node holds, by user: a `DashMap` from user id to that
//! user's live devices. Delivery reads one shard; connects and disconnects
//! write one shard.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::metrics::Metrics;
use crate::outbox::{Close, Outbox, Push, Queued};

/// Close code when a user already holds the maximum number of devices.
pub const CLOSE_TOO_MANY_DEVICES: crate::close::CloseCode = crate::close::CloseCode::TooManyDevices;

/// How a device is connected. Delivery never looks at it: every device's
/// outbox holds the same encoded WebSocket frames, and an SSE device's
/// writer re-frames them as it writes (see `sse`). Only metrics tell the
/// transports apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    /// The `transport` label of the metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// One connection of a user.
#[derive(Debug)]
pub struct Device {
    pub id: u64,
    pub user: Arc<str>,
    pub transport: Transport,
    pub outbox: Outbox,
    /// Pings sent since the device last said anything; the reader resets it.
    pub missed_pings: AtomicU8,
    /// When the device's token expires (unix seconds).
    pub token_expires_at: u64,
    /// When the device was registered (unix micros): events published
    /// well before it were either replayed from the feed or not its own.
    pub registered_at_us: u64,
}

impl Device {
    /// The span of this device's log lines (node, user, device, transport).
    /// Made for the lines a device writes (connected, recovered, closed, a
    /// write that failed), not held for its whole life: a live span costs
    /// the log subscriber an allocation and formatted fields, and an idle
    /// device must stay small.
    pub fn span(&self, node: &str) -> tracing::Span {
        tracing::info_span!("device", node, user = %self.user, device = self.id, transport = self.transport.label())
    }
}

/// What delivering one frame to one user did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Written to the socket at once (see `outbox`).
    pub written: usize,
    pub queued: usize,
    pub dropped: usize,
    pub slow_closed: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("user already holds {0} devices")]
pub struct TooManyDevices(pub usize);

pub struct Sessions {
    users: DashMap<Arc<str>, Vec<Arc<Device>>>,
    next_id: AtomicU64,
    max_devices: usize,
    send_queue: usize,
    metrics: Metrics,
}

impl Sessions {
    pub fn new(max_devices: usize, send_queue: usize, metrics: Metrics) -> Sessions {
        Sessions { users: DashMap::new(), next_id: AtomicU64::new(1), max_devices, send_queue, metrics }
    }

    pub fn register(
        &self,
        user: &str,
        token_expires_at: u64,
        transport: Transport,
    ) -> Result<Arc<Device>, TooManyDevices> {
        let device = |user: Arc<str>| {
            Arc::new(Device {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                user,
                transport,
                outbox: Outbox::new(self.send_queue),
                missed_pings: AtomicU8::new(0),
                token_expires_at,
                registered_at_us: contract::event::now_micros(),
            })
        };
        let d = match self.users.entry(Arc::from(user)) {
            Entry::Occupied(mut e) => {
                if e.get().len() >= self.max_devices {
                    return Err(TooManyDevices(e.get().len()));
                }
                let d = device(e.key().clone());
                e.get_mut().push(d.clone());
                d
            }
            Entry::Vacant(e) => {
                let d = device(e.key().clone());
                e.insert(vec![d.clone()]);
                self.metrics.users.increment(1.0);
                d
            }
        };
        self.metrics.connections.increment(1.0);
        self.metrics.by_transport.of(transport).connections.increment(1.0);
        self.metrics.by_transport.of(transport).opened.increment(1);
        Ok(d)
    }

    pub fn unregister(&self, device: &Device) {
        let mut removed = false;
        let now_empty = match self.users.get_mut(&device.user) {
            Some(mut devices) => {
                let before = devices.len();
                devices.retain(|d| d.id != device.id);
                removed = devices.len() < before;
                devices.is_empty()
            }
            None => false,
        };
        if now_empty && self.users.remove_if(&device.user, |_, v| v.is_empty()).is_some() {
            self.metrics.users.decrement(1.0);
        }
        if removed {
            self.metrics.connections.decrement(1.0);
            self.metrics.by_transport.of(device.transport).connections.decrement(1.0);
        }
    }

    /// Writes or queues `item` on the user's devices registered before
    /// `cutoff_us` (unix micros; `u64::MAX` for all): later ones already
    /// have it or never expected it.
    pub fn deliver_registered_before(&self, user: &str, item: &Queued, cutoff_us: u64) -> Delivery {
        let mut out = Delivery::default();
        let Some(devices) = self.users.get(user) else {
            return out;
        };
        for d in devices.iter().filter(|d| d.registered_at_us < cutoff_us) {
            match d.outbox.push(item) {
                Push::Written => out.written += 1,
                Push::Queued => out.queued += 1,
                Push::Overflow(n) => {
                    out.dropped += n;
                    out.slow_closed += 1;
                }
                Push::Closed => out.dropped += 1,
            }
        }
        out
    }

    /// Calls `f` on every device (pinging, shutdown). Takes a snapshot of
    /// the handles first so no shard lock is held while `f` runs.
    pub fn for_each_device(&self, f: impl FnMut(&Arc<Device>)) {
        self.for_each_device_where(|_| true, f);
    }

    /// Like [`Sessions::for_each_device`], over the devices for which
    /// `pred` holds (only those handles are taken).
    pub fn for_each_device_where(&self, pred: impl Fn(&Device) -> bool, f: impl FnMut(&Arc<Device>)) {
        let mut some: Vec<Arc<Device>> = Vec::new();
        for e in self.users.iter() {
            some.extend(e.value().iter().filter(|d| pred(d)).cloned());
        }
        some.iter().for_each(f);
    }

    /// Closes every device of the users for whom `pred` is true.
    pub fn close_where(&self, pred: impl Fn(&str) -> bool, close: Close) -> usize {
        let mut n = 0;
        self.for_each_device(|d| {
            if pred(&d.user) {
                d.outbox.close(close.clone());
                n += 1;
            }
        });
        n
    }

    pub fn device_count(&self) -> usize {
        self.users.iter().map(|e| e.value().len()).sum()
    }

    pub fn device_count_of(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |d| d.len())
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}
