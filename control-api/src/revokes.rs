//! The publisher's half of sessions/close: applies the fleet's close requests
//! ([`crate::db::close_requests`]) to this gateway's table.
//!
//! Each request raises the revoke epoch of its ports and names by one from whatever this
//! table holds, so it lands whatever the table's history (an absolute target computed on
//! another gateway would be a no-op here when this table is ahead). A port or name is revoked
//! only while the table still holds the requesting environment's route of the generation the
//! request saw; a route that changed since was removed, and its sessions revoked, by the
//! change itself, and the new route's sessions are not the request's to close.

use gpugate_routes::{EnvId, Error as TableError, HostKey, Lookup, Service, Writer};

use crate::db::close_requests::CloseRequest;

/// What one request did to the table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Ports and names whose epoch was raised.
    pub revoked: usize,
    /// Ports and names no longer holding the request's route (nothing to do).
    pub moved_on: usize,
}

/// Applies `req` to the table; the caller records it as applied afterwards.
pub fn apply(writer: &mut Writer, req: &CloseRequest) -> Result<Applied, TableError> {
    let mut done = Applied::default();
    let now = gpugate_routes::now_ms();
    for (&port, &generation) in req.ports.iter().zip(&req.port_generations) {
        let Ok(port) = u16::try_from(port) else { continue };
        let ours = matches!(writer.table().lookup(port, now), Lookup::Live(r) | Lookup::Expired(r)
            if r.env_id.as_str() == req.env_id && i64::try_from(r.generation) == Ok(generation));
        if ours {
            writer.revoke(port)?;
            done.revoked += 1;
        } else {
            done.moved_on += 1;
        }
    }
    let env: Option<EnvId> = req.env_id.parse().ok();
    for (service, &generation) in req.services.iter().zip(&req.name_generations) {
        let (Some(env), Ok(service)) = (env, service.parse::<Service>()) else { continue };
        let key = HostKey::new(env, service);
        let ours = matches!(writer.table().lookup_host(key, now).0, Lookup::Live(r) | Lookup::Expired(r)
            if i64::try_from(r.generation) == Ok(generation));
        if ours {
            writer.revoke_host(key)?;
            done.revoked += 1;
        } else {
            done.moved_on += 1;
        }
    }
    Ok(done)
}
