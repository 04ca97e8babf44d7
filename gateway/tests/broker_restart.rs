//! The broker (a private RabbitMQ node) restarts while events wait in a
//! gateway's queue (its consumer was cut off just before). The queue is
//! durable and the events persistent, so after the restart the node
//! consumes them and its devices, still connected, lose nothing.
//!
//! Prints its figures with:
//!   cargo test -p gateway --test broker_restart -- --nocapture

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::wait_converged;
use common::procs::{self, Services};
use common::services::PrivateRabbit;
use common::*;
use tokio::net::{TcpListener, TcpStream};

/// A TCP forwarder to the private broker that a test can shut: shut, it
/// drops its connections and refuses new ones (closes them at once).
struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Gate {
    async fn start(to: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let (o, list) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(Ordering::Relaxed) {
                    continue; // Dropped: closed at once.
                }
                list.lock().push(tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                }));
            }
        });
        Gate { addr, open, conns }
    }

    fn shut(&self) {
        self.open.store(false, Ordering::Relaxed);
        self.conns.lock().drain(..).for_each(|h| h.abort());
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_broker_restart_keeps_the_events_waiting_in_a_nodes_queue() {
    let rabbit = PrivateRabbit::start().await;
    let gate = Gate::start(rabbit.port).await;
    let key = unique("ring");
    let services = Services { amqp_url: rabbit.url(), ..Services::shared(&key) };
    let (k, gated) = (key.clone(), format!("amqp://guest:guest@{}/%2f", gate.addr));
    let a = Node::start(move |c| {
        c.membership_key = k;
        c.amqp_url = gated;
    })
    .await;
    let (k, url) = (key.clone(), rabbit.url());
    let b = Node::start(move |c| {
        c.membership_key = k;
        c.amqp_url = url;
    })
    .await;
    let nodes = [a, b];
    wait_converged(&nodes).await;
    let a_queue = contract::topology::node_queue(nodes[0].gw.config.node_id(), nodes[0].gw.incarnation());

    let users: Vec<String> = (0..30).map(|i| unique(&format!("b{i}"))).collect();
    let devices = Devices::start(&format!("ws://{}", nodes[0].addr), &users);
    wait_for("devices connected", || async { nodes.iter().map(|n| n.gw.sessions.device_count()).sum::<usize>() == 30 })
        .await;
    let publishing = publish_series_via(services, users.clone(), 100_000, Duration::from_millis(50));
    publishing.wait_published(20).await;

    // Node a loses the broker; events for its users pile up in its queue.
    gate.shut();
    wait_for_within("events waiting in node a's queue", Duration::from_secs(20), || async {
        rabbit.messages(&a_queue).await.is_some_and(|n| n >= 10)
    })
    .await;
    let waiting = rabbit.messages(&a_queue).await.unwrap_or(0);
    let restart = Instant::now();
    rabbit.restart().await;
    let restarted_in = restart.elapsed();
    let kept = rabbit.messages(&a_queue).await.unwrap_or(0);
    gate.reopen();
    wait_for_within("both nodes consuming again", Duration::from_secs(30), || async {
        nodes.iter().all(|n| n.gw.is_ready())
    })
    .await;
    let back_in = restart.elapsed();
    let published = publishing.published();
    publishing.wait_published(published + 20).await;
    let all: BTreeSet<String> = publishing.stop().await.into_iter().collect();
    let complete = devices.wait_complete(&all, Duration::from_secs(20)).await;
    let logs = devices.finish().await;
    let (lost, duplicates) = procs::losses(&all, &logs);
    let reconnects: u32 = logs.iter().map(|(_, l)| l.reconnects).sum();
    eprintln!(
        "broker restart: {waiting} messages waiting in node a's queue, {kept} still there after the restart \
         ({:.1}s), both nodes consuming {:.1}s after it began; {} events x 30 devices, {lost} lost, \
         {duplicates} duplicates, {reconnects} reconnects, complete {complete:?} after the last publish",
        restarted_in.as_secs_f64(),
        back_in.as_secs_f64(),
        all.len()
    );
    assert!(kept >= 10, "the broker restart dropped what waited in the queue ({waiting} -> {kept})");
    assert_eq!(lost, 0);
}
