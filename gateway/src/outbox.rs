//! A device's bounded send queue, shared by the producers (broker consumer,
//! pinger, reader) and the device's one writer task.
//!
//! When nothing is queued and the writer is not writing, `push` writes the
//! frame to the socket itself (non-blocking): most events then cost one
//! syscall and no task wake-up. Anything the socket does not take at once
//! is queued for the writer, in order.
//!
//! Not a tokio mpsc channel: that allocates a block of slots per channel up
//! front, and an idle device should cost nothing. An empty `VecDeque`
//! allocates nothing; the writer takes the whole queue in one swap.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::close::CloseCode;

/// An encoded event frame and when it was published (unix microseconds).
#[derive(Debug, Clone)]
pub struct Queued {
    pub frame: Bytes,
    pub published_at_us: u64,
}

/// Why and how the writer should end the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// Send a close frame with this code and reason, then end.
    Frame { code: CloseCode, reason: String },
    /// End without a close frame (the peer is gone or stopped answering).
    Abort,
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket whole, by the caller's thread.
    Written,
    Queued,
    /// The queue was full: it was dropped and the device is being closed
    /// with 4008. Carries the number of frames dropped (including this one).
    Overflow(usize),
    /// The device is already closing; the frame was not queued.
    Closed,
}

/// Work for the writer, taken in one go.
#[derive(Debug, Default)]
pub struct Batch {
    pub frames: VecDeque<Queued>,
    /// Control frames (ping, pong) to write before the events.
    pub control: Vec<Bytes>,
    pub close: Option<Close>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Queued>,
    control: Vec<Bytes>,
    close: Option<Close>,
    /// Set once the writer has taken the close: nothing more is accepted.
    finished: bool,
    /// The writer holds a batch: pushes must queue behind it.
    writing: bool,
    /// The first queued frame is partly on the wire already (`push` wrote
    /// its start): it must be finished before anything else, a close frame
    /// included, or the stream is corrupt. Dropping the backlog keeps it.
    front_partial: bool,
    /// The socket, for writes straight from `push` (none in unit tests and
    /// once the writer is done).
    sock: Option<Arc<OwnedWriteHalf>>,
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    capacity: usize,
}

/// Most event frames the writer takes at once (one `writev` of 64 buffers).
const MAX_BATCH: usize = 64;

/// Close code for a device whose queue overflowed.
pub const CLOSE_SLOW_CONSUMER: CloseCode = CloseCode::SlowConsumer;

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox { state: Mutex::new(State::default()), wake: Notify::new(), capacity }
    }

    /// Lets `push` write to `sock` directly.
    pub fn attach(&self, sock: Arc<OwnedWriteHalf>) {
        self.state.lock().sock = Some(sock);
    }

    /// Takes the socket back (the writer is done with the connection).
    pub fn detach(&self) -> Option<Arc<OwnedWriteHalf>> {
        self.state.lock().sock.take()
    }

    /// Writes an event frame, or queues it. Never blocks: a full queue
    /// closes the device instead of slowing the producer (and so every
    /// other device).
    pub fn push(&self, item: &Queued) -> Push {
        let mut s = self.state.lock();
        if s.close.is_some() || s.finished {
            return Push::Closed;
        }
        if s.frames.len() >= self.capacity {
            let dropped = drop_backlog(&mut s) + 1;
            s.close = Some(Close::Frame { code: CLOSE_SLOW_CONSUMER, reason: "slow consumer".into() });
            drop(s);
            self.wake.notify_one();
            return Push::Overflow(dropped);
        }
        let was_empty = s.frames.is_empty() && s.control.is_empty();
        if was_empty
            && !s.writing
            && let Some(sock) = &s.sock
        {
            // Under the lock, so that nothing can be written in between.
            match sock.try_write(&item.frame) {
                Ok(n) if n == item.frame.len() => return Push::Written,
                Ok(n) => {
                    let mut rest = item.clone();
                    rest.frame.advance(n);
                    s.frames.push_back(rest);
                    s.front_partial = n > 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.frames.push_back(item.clone()),
                Err(_) => {
                    // The peer is gone; the writer ends the connection.
                    s.close.get_or_insert(Close::Abort);
                    drop(s);
                    self.wake.notify_one();
                    return Push::Closed;
                }
            }
        } else {
            s.frames.push_back(item.clone());
        }
        drop(s);
        // The writer only sleeps on an empty queue, so only the first push
        // after it emptied needs to wake it.
        if was_empty {
            self.wake.notify_one();
        }
        Push::Queued
    }

    /// Puts recovered events, made by `make` from what is queued already
    /// (so it can leave out what live delivery queued), in front of it, in
    /// order, and returns how many. Bounded by the capacity like live
    /// events: if the replay and what is queued do not fit, the device is
    /// closed with 4008 (dropping both), as a device this far behind would
    /// be by live delivery.
    ///
    /// A device closed before its replay is queued (moved, fenced, while
    /// the feed was read) gets no replay, and none of the live events
    /// queued meanwhile either: they are newer than the gap the replay
    /// fills, and the device's next `since` would skip it. (The rolling
    /// restart lost events so: a 4001 during a slow replay.)
    pub fn prepend_with(&self, make: impl FnOnce(&VecDeque<Queued>) -> Vec<Queued>) -> usize {
        let mut s = self.state.lock();
        if s.finished {
            return 0;
        }
        if s.close.is_some() {
            drop_backlog(&mut s);
            return 0;
        }
        let items = make(&s.frames);
        let n = items.len();
        if n == 0 {
            return 0;
        }
        if s.frames.len() + n > self.capacity {
            drop_backlog(&mut s);
            s.close = Some(Close::Frame { code: CLOSE_SLOW_CONSUMER, reason: "slow consumer".into() });
            drop(s);
            self.wake.notify_one();
            return 0;
        }
        for item in items.into_iter().rev() {
            s.frames.push_front(item);
        }
        drop(s);
        self.wake.notify_one();
        n
    }

    /// Queues a control frame (ping or pong). Not counted against the
    /// capacity: there is at most one per ping interval or client ping.
    pub fn push_control(&self, frame: Bytes) {
        let mut s = self.state.lock();
        if s.close.is_some() || s.finished || s.control.len() >= 4 {
            return;
        }
        s.control.push(frame);
        drop(s);
        self.wake.notify_one();
    }

    /// Asks the writer to close. The first reason wins; queued frames are
    /// still written before the close frame. Returns whether this close is
    /// the one (so its reason is counted once).
    pub fn close(&self, close: Close) -> bool {
        let mut s = self.state.lock();
        if s.close.is_none() && !s.finished {
            s.close = Some(close);
            drop(s);
            self.wake.notify_one();
            return true;
        }
        false
    }

    /// Like [`Outbox::close`], but drops what is queued: for a device that
    /// must not see newer events than a gap it has (failed recovery), or
    /// its next `since` would skip the gap.
    pub fn close_discarding(&self, close: Close) {
        let mut s = self.state.lock();
        if s.close.is_none() && !s.finished {
            drop_backlog(&mut s);
            s.close = Some(close);
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Whether the device is being closed for falling behind (4008): a
    /// writer stuck on a full socket then gives up the batch it holds.
    pub fn falling_behind(&self) -> bool {
        matches!(self.state.lock().close, Some(Close::Frame { code: CLOSE_SLOW_CONSUMER, .. }))
    }

    /// Resolves at the next wake-up meant for the writer (a push after the
    /// queue emptied, a close). Lets a writer waiting for socket space
    /// notice a close; a wake-up it takes costs `take` nothing, since
    /// `take` looks at the queue before it sleeps.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// For a writer that gives up (the device stopped reading): closes with
    /// `close` unless a close is pending already, drops what is queued, and
    /// hands over the close that wins with the number of frames dropped.
    /// Nothing is accepted afterwards.
    pub fn abandon(&self, close: Close) -> (Close, usize) {
        let mut s = self.state.lock();
        let dropped = s.frames.len();
        s.frames = VecDeque::new();
        s.control = Vec::new();
        s.front_partial = false;
        s.finished = true;
        (s.close.take().unwrap_or(close), dropped)
    }

    /// Waits for work and takes it, at most `MAX_BATCH` event frames at a
    /// time. Cancel-safe: work is only taken in the poll that returns it.
    pub async fn take(&self) -> Batch {
        self.take_marked().await.0
    }

    /// Like [`Outbox::take`], and says whether the batch's first event
    /// frame is partly on the wire already (`push` wrote its start). Such a
    /// frame comes alone, without control frames: nothing may be written
    /// before its end.
    pub async fn take_marked(&self) -> (Batch, bool) {
        loop {
            {
                let mut s = self.state.lock();
                if s.front_partial {
                    s.writing = true;
                    s.front_partial = false;
                    let frames: VecDeque<Queued> = s.frames.pop_front().into_iter().collect();
                    let close = if s.frames.is_empty() { s.close.take() } else { None };
                    if close.is_some() {
                        s.finished = true;
                    }
                    return (Batch { frames, control: Vec::new(), close }, true);
                }
                if !s.frames.is_empty() || !s.control.is_empty() || s.close.is_some() {
                    s.writing = true;
                    // At most a batch at a time: what the writer has not
                    // taken stays queued and counts against the capacity,
                    // so a device that stopped reading overflows at
                    // `capacity` frames behind, not at twice that. The
                    // close goes with the last batch, after every frame.
                    let frames = if s.frames.len() > MAX_BATCH {
                        let rest = s.frames.split_off(MAX_BATCH);
                        std::mem::replace(&mut s.frames, rest)
                    } else {
                        std::mem::take(&mut s.frames)
                    };
                    let close = if s.frames.is_empty() { s.close.take() } else { None };
                    if close.is_some() {
                        s.finished = true;
                    }
                    return (Batch { frames, control: std::mem::take(&mut s.control), close }, false);
                }
                s.writing = false;
            }
            self.wake.notified().await;
        }
    }
}

/// Drops the queued frames but one partly written already. Returns how
/// many were dropped.
fn drop_backlog(s: &mut State) -> usize {
    let keep = if s.front_partial { s.frames.pop_front() } else { None };
    let dropped = s.frames.len();
    s.frames = keep.into_iter().collect();
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u8) -> Queued {
        Queued { frame: Bytes::from(vec![n]), published_at_us: 0 }
    }

    #[tokio::test]
    async fn overflow_drops_the_queue_and_asks_for_4008() {
        let o = Outbox::new(2);
        assert_eq!(o.push(&item(1)), Push::Queued);
        assert_eq!(o.push(&item(2)), Push::Queued);
        assert_eq!(o.push(&item(3)), Push::Overflow(3));
        assert_eq!(o.push(&item(4)), Push::Closed);
        let b = o.take().await;
        assert!(b.frames.is_empty());
        assert_eq!(b.close, Some(Close::Frame { code: CloseCode::SlowConsumer, reason: "slow consumer".into() }));
        assert_eq!(o.push(&item(5)), Push::Closed);
    }

    #[tokio::test]
    async fn close_keeps_queued_frames_and_first_reason_wins() {
        let o = Outbox::new(8);
        o.push(&item(1));
        o.close(Close::Frame { code: CloseCode::GoingAway, reason: "bye".into() });
        o.close(Close::Abort);
        let b = o.take().await;
        assert_eq!(b.frames.len(), 1);
        assert_eq!(b.close, Some(Close::Frame { code: CloseCode::GoingAway, reason: "bye".into() }));
    }

    #[tokio::test]
    async fn the_writer_takes_a_batch_at_a_time_and_the_close_last() {
        let o = Outbox::new(1000);
        for i in 0..100 {
            o.push(&item(i));
        }
        o.close(Close::Frame { code: CloseCode::GoingAway, reason: "bye".into() });
        let first = o.take().await;
        assert_eq!((first.frames.len(), first.close), (MAX_BATCH, None));
        let second = o.take().await;
        assert_eq!(second.frames.len(), 100 - MAX_BATCH);
        assert_eq!(second.frames[0].frame[0], MAX_BATCH as u8, "in order");
        assert!(second.close.is_some());
    }

    #[tokio::test]
    async fn a_device_closed_before_its_replay_gets_no_live_event_ahead_of_the_gap() {
        let o = Outbox::new(8);
        o.push(&item(9)); // live, newer than the replay
        o.close(Close::Frame { code: CloseCode::Moved, reason: "ws://other".into() });
        assert_eq!(o.prepend_with(|_| vec![item(1), item(2)]), 0);
        let b = o.take().await;
        assert!(b.frames.is_empty(), "the live event is not sent without the replay before it");
        assert!(b.close.is_some());
    }

    #[tokio::test]
    async fn take_wakes_on_push_from_another_task() {
        let o = std::sync::Arc::new(Outbox::new(8));
        let o2 = o.clone();
        let t = tokio::spawn(async move { o2.take().await.frames.len() });
        tokio::task::yield_now().await;
        o.push(&item(1));
        assert_eq!(t.await.unwrap(), 1);
    }
}
