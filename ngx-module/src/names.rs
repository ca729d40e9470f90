//! Server names as name routing reads them: the `gpugate_name_domain` value and a TLS server
//! name split into (environment id, service). Plain Rust, unit-tested with the decisions.

use gpugate_routes::{EnvId, HostKey, NameRefusal, Service};

/// Checks a `gpugate_name_domain` value: a DNS name of at least two labels of lowercase
/// letters, digits and inner hyphens (as the control plane's domain), returned lowercased.
pub fn check_domain(raw: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "is not a DNS name")?.to_ascii_lowercase();
    let text = text.strip_suffix('.').unwrap_or(&text).to_owned();
    let labels: Vec<&str> = text.split('.').collect();
    if text.len() > 200 || labels.len() < 2 {
        return Err("is not a DNS name of at least two labels (e.g. gpu.example.com)");
    }
    let ok = labels.iter().all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if ok { Ok(text) } else { Err("is not a DNS name: labels of a-z, 0-9 and inner '-' only") }
}

/// Reads a TLS server name as `<env-id>.<service>.<domain>` (case-insensitive, one trailing
/// dot allowed); `domain` as [`check_domain`] returns it.
pub fn parse_name(name: &[u8], domain: &str) -> Result<HostKey, NameRefusal> {
    if name.is_empty() {
        return Err(NameRefusal::NoName);
    }
    let mut buf = [0u8; 256];
    let name = name.strip_suffix(b".").unwrap_or(name);
    let lower = buf.get_mut(..name.len()).ok_or(NameRefusal::BadName)?;
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let d = domain.as_bytes();
    let head = match lower.strip_suffix(d) {
        Some(h) if h.last() == Some(&b'.') => &h[..h.len() - 1],
        _ => return Err(NameRefusal::OtherDomain),
    };
    let mut labels = head.split(|&b| b == b'.');
    let (Some(id), Some(service), None) = (labels.next(), labels.next(), labels.next()) else {
        return Err(NameRefusal::BadName);
    };
    let service = match service {
        b"ssh" => Service::Ssh,
        b"jupyter" => Service::Jupyter,
        b"code" => Service::Code,
        b"rdp" => Service::Rdp,
        _ => return Err(NameRefusal::UnknownService),
    };
    let id = std::str::from_utf8(id).ok().filter(|s| !s.is_empty()).ok_or(NameRefusal::BadName)?;
    let env_id: EnvId = id.parse().map_err(|_| NameRefusal::BadName)?;
    Ok(HostKey::new(env_id, service))
}
