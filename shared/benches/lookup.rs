//! Cost of the table reads the module makes per connection, measured with criterion:
//!
//! - `lookup/live`, `lookup/miss`: `Table::lookup_owned` on a port with a live route and on a
//!   port without one.
//! - `lookup/host_live`, `lookup/host_miss`: `Table::lookup_host` (routing by TLS server name)
//!   in the default hostname region (262,144 slots) holding 100,000 name routes with random
//!   16-character ids, on names that have a route and on names that do not. Each iteration
//!   looks the next of 1,024 keys up, so the figure is an average over the probe lengths the
//!   region actually has, not the cost of one lucky home slot.
//!
//! `scripts/bench.sh` runs it and quotes criterion's median estimate from
//! `target/criterion/lookup/<name>/new/estimates.json`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpugate_routes::{now_ms, HostKey, Lookup, LockMode, Route, Service, Table, Writer};

const LIVE_PORT: u16 = 20417;
const MISS_PORT: u16 = 20418;
/// Name routes in the table for the hostname lookups (the region keeps its default size).
const HOST_ROUTES: usize = 100_000;
/// Keys cycled through per hostname benchmark.
const SAMPLE: usize = 1024;

/// A deterministic source of ids (splitmix64): the same table every run, no extra crate.
struct Ids(u64);

impl Ids {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A random 16-character [a-z0-9] id, as the control plane hands out.
    fn id(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..16).map(|_| char::from(ALPHABET[(self.next_u64() % 36) as usize])).collect()
    }

    fn key(&mut self) -> HostKey {
        HostKey::new(self.id().parse().expect("env id"), Service::Jupyter)
    }
}

fn lookup(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("gpugate-lookup-bench-{}", std::process::id()));
    let path = dir.join("routes");
    let mut writer = Writer::open(&path, LockMode::NoWait).expect("open the route table");
    let upstream: SocketAddr = "127.0.0.1:2222".parse().expect("address");
    let route = Route {
        upstream,
        env_id: "6hiflzwte2xnkroq".parse().expect("env id"),
        service: Service::Ssh,
        generation: 7,
        expires_ms: None,
    };
    writer.set(LIVE_PORT, &route).expect("set the route");
    let mut ids = Ids(0x6770_7567_6174_6531);
    let mut live_keys = Vec::with_capacity(SAMPLE);
    for i in 0..HOST_ROUTES {
        let key = ids.key();
        let r = Route { env_id: key.env_id, service: key.service, ..route };
        writer.set_host(&r).expect("set a name route");
        // Every 97th key: spread over the whole insertion order (early keys sit nearer home).
        if i % 97 == 0 && live_keys.len() < SAMPLE {
            live_keys.push(key);
        }
    }
    // A separate, read-only mapping of the routes file, as an nginx worker has.
    let table = Table::open_routes(&path).expect("open the table for reading");
    let now = now_ms();
    assert!(matches!(table.lookup(LIVE_PORT, now), Lookup::Live(_)));
    assert_eq!(table.lookup(MISS_PORT, now), Lookup::Absent);
    let miss_keys: Vec<HostKey> = (0..SAMPLE).map(|_| ids.key()).collect();
    assert!(live_keys.iter().all(|&k| matches!(table.lookup_host(k, now).0, Lookup::Live(_))));
    assert!(miss_keys.iter().all(|&k| table.lookup_host(k, now).0 == Lookup::Absent));
    eprintln!(
        "lookup: {HOST_ROUTES} name routes in {} hostname slots, longest probe {}",
        table.host_slots(),
        table.host_probe_max()
    );

    let mut group = c.benchmark_group("lookup");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("live", |b| {
        b.iter(|| table.lookup_owned(black_box(LIVE_PORT), black_box(now)))
    });
    group.bench_function("miss", |b| {
        b.iter(|| table.lookup_owned(black_box(MISS_PORT), black_box(now)))
    });
    for (name, keys) in [("host_live", &live_keys), ("host_miss", &miss_keys)] {
        group.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % SAMPLE;
                table.lookup_host(black_box(keys[i]), black_box(now))
            })
        });
    }
    group.finish();

    drop(table);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, lookup);
criterion_main!(benches);
