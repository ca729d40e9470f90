//! Cost of one `Table::lookup_owned` — the table read the module makes per connection — on a
//! live route and on a miss (a port with no route), measured with criterion.
//!
//! `scripts/bench.sh` runs it and quotes criterion's median estimate from
//! `target/criterion/lookup/{live,miss}/new/estimates.json`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpugate_routes::{now_ms, Lookup, LockMode, Route, Service, Table, Writer};

const LIVE_PORT: u16 = 20417;
const MISS_PORT: u16 = 20418;

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
    // A separate, read-only mapping of the routes file, as an nginx worker has.
    let table = Table::open_routes(&path).expect("open the table for reading");
    let now = now_ms();
    assert!(matches!(table.lookup(LIVE_PORT, now), Lookup::Live(_)));
    assert_eq!(table.lookup(MISS_PORT, now), Lookup::Absent);

    let mut group = c.benchmark_group("lookup");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("live", |b| {
        b.iter(|| table.lookup_owned(black_box(LIVE_PORT), black_box(now)))
    });
    group.bench_function("miss", |b| {
        b.iter(|| table.lookup_owned(black_box(MISS_PORT), black_box(now)))
    });
    group.finish();

    drop(table);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, lookup);
criterion_main!(benches);
