//! The wall clock every part of the crate stamps with (unix milliseconds).

/// Unix time in milliseconds from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
