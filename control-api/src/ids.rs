//! Random identifiers and secrets, drawn from the operating system's RNG.

const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// `len` characters drawn uniformly from `alphabet` (rejection sampling, no modulo bias).
fn draw(alphabet: &[u8], len: usize) -> String {
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        // The OS RNG failing leaves no safe way to make credentials; abort rather than
        // hand out predictable ones.
        if let Err(e) = getrandom::getrandom(&mut buf) {
            tracing::error!(error = %e, "operating system RNG failed");
            std::process::abort();
        }
        for &b in &buf {
            if (b as usize) < limit && out.len() < len {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

/// A new environment id: 16 lowercase alphanumerics (about 82 bits).
pub fn env_id() -> String {
    draw(LOWER_ALNUM, 16)
}

/// A password or Jupyter token: 24 alphanumerics (about 142 bits).
pub fn secret() -> String {
    draw(ALNUM, 24)
}

/// A new API token: `ggt_` and 40 alphanumerics.
pub fn token() -> String {
    format!("ggt_{}", draw(ALNUM, 40))
}

/// A random tag that tells this process's messages from any other's (barrier tokens): 16
/// lowercase alphanumerics.
pub fn nonce() -> String {
    draw(LOWER_ALNUM, 16)
}

/// A random positive 31-bit number (instance ids).
pub fn instance_id() -> i32 {
    let s = draw(b"0123456789", 9);
    s.parse::<i32>().unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_documented_shape() {
        let a = super::env_id();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, super::env_id());
        assert!(a.parse::<gpugate_routes::EnvId>().is_ok());
        assert!(super::token().starts_with("ggt_"));
        assert!(super::instance_id() > 0);
    }
}
