//! A user-space network impairment for UDP, standing in for netem (unavailable here): a proxy
//! on loopback between a client (the edge) and a server (the core) that drops datagrams at
//! random, delays them (with jitter), caps the bandwidth behind a drop-tail queue, and can
//! blackhole everything — each direction set on its own, changeable while it runs.
//!
//! The model per direction: a datagram survives the loss draw, then leaves the bottleneck at
//! `max(now, previous departure) + size / rate` (dropped if that queue would hold more than
//! `queue` of delay), then arrives `delay + jitter·U(0,1)` later.

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One direction's impairment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Probability that a datagram is dropped (0..=1).
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter (datagrams may be reordered by it, as with netem).
    pub jitter: Duration,
    /// Bottleneck rate in bit/s; 0 for none.
    pub rate_bps: u64,
    /// The bottleneck's buffer, as queueing delay at `rate_bps`; beyond it datagrams are dropped.
    pub queue: Duration,
}

impl Link {
    /// A clean direction with this one-way delay.
    pub fn delay_ms(ms: u64) -> Self {
        Link {
            loss: 0.0,
            delay: Duration::from_millis(ms),
            jitter: Duration::ZERO,
            rate_bps: 0,
            queue: Duration::from_millis(100),
        }
    }

    /// The same with random loss.
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// The same behind a bottleneck of `bps`.
    pub fn rate(mut self, bps: u64) -> Self {
        self.rate_bps = bps;
        self
    }
}

/// What one direction did.
#[derive(Debug, Default)]
pub struct DirStats {
    pub passed: AtomicU64,
    pub bytes: AtomicU64,
    pub lost: AtomicU64,
    pub queue_dropped: AtomicU64,
    pub blackholed: AtomicU64,
}

impl DirStats {
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.passed.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.queue_dropped.load(Ordering::Relaxed),
            self.blackholed.load(Ordering::Relaxed),
        )
    }
}

struct Pending {
    at: Instant,
    seq: u64,
    sock: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // A min-heap on (time, arrival order).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Shared {
    stop: AtomicBool,
    blackhole: AtomicBool,
    /// [client → server, server → client]
    links: Mutex<[Link; 2]>,
    /// Departure time of the last datagram through each direction's bottleneck.
    busy_until: Mutex<[Instant; 2]>,
    stats: [DirStats; 2],
    queue: Mutex<(BinaryHeap<Pending>, u64)>,
    wake: Condvar,
}

/// Upstream: client → server. Downstream: server → client.
pub const UP: usize = 0;
pub const DOWN: usize = 1;

/// The proxy. Clients send to `addr()`; each client address gets its own socket towards the
/// server, as a NAT would.
pub struct UdpImpair {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl UdpImpair {
    /// Starts a proxy to `server` with `up` (client → server) and `down` impairments.
    pub fn start(server: SocketAddr, up: Link, down: Link) -> Self {
        let front = Arc::new(udp_socket());
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = front.local_addr().unwrap();
        let now = Instant::now();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            links: Mutex::new([up, down]),
            busy_until: Mutex::new([now, now]),
            stats: Default::default(),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            wake: Condvar::new(),
        });
        let sh = shared.clone();
        std::thread::spawn(move || deliver(&sh));
        let sh = shared.clone();
        std::thread::spawn(move || {
            let mut clients: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> =
                Default::default();
            let mut buf = vec![0u8; 65536];
            while !sh.stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let back = clients.entry(from).or_insert_with(|| {
                    let s = Arc::new(udp_socket());
                    s.connect(server).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    let (sh, s2, front) = (sh.clone(), s.clone(), front.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while !sh.stop.load(Ordering::Relaxed) {
                            if let Ok(n) = s2.recv(&mut buf) {
                                sh.offer(DOWN, &front, Some(from), &buf[..n]);
                            }
                        }
                    });
                    s
                });
                sh.offer(UP, back, None, &buf[..n]);
            }
        });
        UdpImpair { addr, shared }
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops everything in both directions while on.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// Changes one direction's impairment.
    pub fn set(&self, dir: usize, link: Link) {
        self.shared.links.lock().unwrap()[dir] = link;
    }

    /// One direction's counters.
    pub fn stats(&self, dir: usize) -> &DirStats {
        &self.shared.stats[dir]
    }
}

impl Drop for UdpImpair {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn offer(&self, dir: usize, sock: &Arc<UdpSocket>, to: Option<SocketAddr>, data: &[u8]) {
        let st = &self.stats[dir];
        if self.blackhole.load(Ordering::Relaxed) {
            st.blackholed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let link = self.links.lock().unwrap()[dir];
        if link.loss > 0.0 && rand::random::<f64>() < link.loss {
            st.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut depart = now;
        // Serialization of the datagram plus IP/UDP headers at the bottleneck.
        let bits = (data.len() as u64 + 28) * 8;
        if let Some(ns) = (bits * 1_000_000_000).checked_div(link.rate_bps) {
            let mut busy = self.busy_until.lock().unwrap();
            let start = busy[dir].max(now);
            if start - now > link.queue {
                st.queue_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            depart = start + Duration::from_nanos(ns);
            busy[dir] = depart;
        }
        let jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            link.jitter.mul_f64(rand::random::<f64>())
        };
        st.passed.fetch_add(1, Ordering::Relaxed);
        st.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut q = self.queue.lock().unwrap();
        q.1 += 1;
        let seq = q.1;
        q.0.push(Pending {
            at: depart + link.delay + jitter,
            seq,
            sock: sock.clone(),
            to,
            data: data.to_vec(),
        });
        drop(q);
        self.wake.notify_one();
    }
}

/// A loopback UDP socket with 8 MiB buffers: a burst must meet the configured impairment,
/// not the kernel's default buffer.
fn udp_socket() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.into()
}

/// Sends each datagram when its time comes.
fn deliver(sh: &Shared) {
    let mut q = sh.queue.lock().unwrap();
    while !sh.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match q.0.peek() {
            Some(p) if p.at <= now => {
                let p = q.0.pop().unwrap();
                drop(q);
                let _ = match p.to {
                    Some(to) => p.sock.send_to(&p.data, to),
                    None => p.sock.send(&p.data),
                };
                q = sh.queue.lock().unwrap();
            }
            Some(p) => {
                let wait = p.at - now;
                q = sh.wake.wait_timeout(q, wait).unwrap().0;
            }
            None => {
                q = sh
                    .wake
                    .wait_timeout(q, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
        }
    }
}
