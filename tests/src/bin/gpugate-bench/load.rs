//! Native load on loopback: the backends nginx proxies to (echo, source) and the clients that
//! measure connection rate, bulk throughput and the first successful round trip on a port.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fixed pool of threads sharing one listener, each serving one connection at a time:
/// whatever arrives is written back until the peer closes. No thread is spawned per
/// connection, so the backend costs the same few syscalls for every proxy under test.
pub fn echo_server(threads: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo backend");
    let addr = listener.local_addr().expect("echo backend address");
    let listener = Arc::new(listener);
    for _ in 0..threads {
        let l = listener.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || loop {
                if let Ok((conn, _)) = l.accept() {
                    echo(conn);
                }
            })
            .expect("spawn echo thread");
    }
    addr
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A backend that streams bytes to each connection until the peer goes away.
pub fn source_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind source backend");
    let addr = listener.local_addr().expect("source backend address");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 1 << 20];
                while conn.write_all(&chunk).is_ok() {}
            });
        }
    });
    addr
}

/// Connects to 127.0.0.1:`port`, sends `msg.len()` bytes and reads as many back.
fn round_trip(port: u16, msg: &[u8], reply: &mut [u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    s.read_exact(reply)?;
    Ok(())
}

/// Connections per second through `port`: `threads` clients loop connect → one round trip
/// of 64 bytes → close for `dur`. Failed connections are counted apart and not in the rate.
pub fn conn_rate(port: u16, threads: usize, dur: Duration) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let msg = [b'x'; 64];
                let mut reply = [0u8; 64];
                let (mut n_ok, mut n_failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match round_trip(port, &msg, &mut reply) {
                        Ok(()) => n_ok += 1,
                        Err(_) => n_failed += 1,
                    }
                }
                ok.fetch_add(n_ok, Ordering::Relaxed);
                failed.fetch_add(n_failed, Ordering::Relaxed);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    (ok.load(Ordering::Relaxed) as f64 / secs, failed.load(Ordering::Relaxed))
}

/// Bytes per second of one connection through `port` reading `total` bytes from the source.
pub fn bulk(port: u16, total: u64) -> std::io::Result<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut got = 0u64;
    while got < total {
        match s.read(&mut buf) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "source closed early")),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

/// Time from `start` until a one-byte round trip through `port` succeeds, retrying every
/// `poll` (zero: at once) for at most `limit`, and the number of attempts it took. `None` if it
/// never succeeded.
pub fn first_success(
    port: u16,
    start: Instant,
    poll: Duration,
    limit: Duration,
) -> Option<(Duration, u32)> {
    let mut reply = [0u8; 1];
    let mut attempts = 0;
    loop {
        attempts += 1;
        if round_trip(port, b"?", &mut reply).is_ok() {
            return Some((start.elapsed(), attempts));
        }
        if start.elapsed() > limit {
            return None;
        }
        if !poll.is_zero() {
            std::thread::sleep(poll);
        }
    }
}

/// The median of `v` (sorted in place); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// The `p`th percentile of `v` by nearest rank (sorted in place); 0 for an empty slice.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// (min, max) of `v`; (0, 0) for an empty slice.
pub fn spread(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The median over rounds of `ours[r] / base[r]`: each round's runs are minutes closer in time
/// than the runs of other rounds, so pairing them cancels the drift of the host's load.
pub fn paired_ratio(ours: &[f64], base: &[f64]) -> f64 {
    let mut r: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    median(&mut r)
}
