//! Which loopback ports the run may listen on: below the kernel's ephemeral range, below the
//! pools the project's tests and shipped configuration use (20000 and up), and free right now
//! (other work on the machine listens too). Each phase starts its own `Ports` once the previous
//! phase's nginx is gone, so 10,000-port phases fit one after another.

use std::net::TcpListener;

/// Lowest and highest port considered: unprivileged, and under the nginx tests' pools
/// (20000-28999) and the shipped pools (30000-32767), which may be bound while this runs.
const LO: u16 = 1025;
const HI: u16 = 19999;

/// Hands out free ports in increasing order.
pub struct Ports {
    next: u16,
}

impl Ports {
    pub fn new() -> Ports {
        Ports { next: LO }
    }

    /// The next `n` ports that can be bound on 127.0.0.1 now. Panics if the range runs out.
    pub fn take(&mut self, n: usize) -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let p = self.next;
            assert!(p <= HI, "not enough free ports below {HI} for this run");
            self.next += 1;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                out.push(p);
            }
        }
        out
    }
}

/// `ports` (increasing) as `listen` lines, one per run of consecutive ports.
pub fn listen_lines(ports: &[u16]) -> String {
    let mut lines = String::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
            j += 1;
        }
        if i == j {
            lines.push_str(&format!("        listen 127.0.0.1:{};\n", ports[i]));
        } else {
            lines.push_str(&format!("        listen 127.0.0.1:{}-{};\n", ports[i], ports[j]));
        }
        i = j + 1;
    }
    lines
}
