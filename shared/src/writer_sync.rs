//! The writer's whole-table re-sync: the table made to hold exactly the wanted routes, stale
//! ones removed and revoked first.

use std::collections::BTreeMap;

use super::{SyncReport, Writer};
use crate::error::{Error, Result};
use crate::hosts::HostKey;
use crate::route::Route;

impl Writer {
    /// Makes the table hold exactly `routes`: writes the ones that differ and clears every
    /// other slot, revoking the sessions still open there (a route nobody wants any more must
    /// not keep carrying traffic). The whole-table re-sync of the publisher.
    pub fn sync(&mut self, routes: &BTreeMap<u16, Route>) -> Result<SyncReport> {
        self.sync_all(routes, &BTreeMap::new())
    }

    /// [`Writer::sync`] for port routes and hostname routes together: the table holds exactly
    /// `routes` by port and `names` by (environment id, service) afterwards. A name route
    /// whose key differs from its route's env id and service is refused.
    ///
    /// Stale routes are removed (and their sessions revoked) before wanted ones are written,
    /// so a hostname region full of stale names makes room first; a route that cannot be
    /// written does not stop the others. The first such error is returned after everything
    /// else was applied.
    pub fn sync_all(&mut self, routes: &BTreeMap<u16, Route>, names: &BTreeMap<HostKey, Route>) -> Result<SyncReport> {
        self.verify()?;
        let mut report = SyncReport::default();
        let mut failed: Option<Error> = None;
        let stale: Vec<u16> = self
            .table
            .routes()
            .map(|(port, _)| port)
            .filter(|port| !routes.contains_key(port))
            .collect();
        for port in stale {
            if self.remove_and_revoke(port)? {
                report.removed += 1;
            }
        }
        for (&port, route) in routes {
            match self.set(port, route) {
                Ok(true) => report.written += 1,
                Ok(false) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if self.mapping().host_slots() > 0 {
            let stale: Vec<HostKey> = self
                .table
                .host_routes()
                .map(|(_, r)| HostKey::of(&r))
                .filter(|k| !names.contains_key(k))
                .collect();
            for key in stale {
                if self.remove_and_revoke_host(key)? {
                    report.removed += 1;
                }
            }
        }
        for (key, route) in names {
            let written = if HostKey::of(route) != *key {
                Err(Error::InvalidRoute(format!(
                    "hostname route for {}.{} carries {}.{}",
                    key.env_id, key.service, route.env_id, route.service
                )))
            } else {
                self.set_host(route).map(|w| w.changed)
            };
            match written {
                Ok(true) => report.written += 1,
                Ok(false) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        self.counters().sweep_dead();
        self.heartbeat()?;
        match failed {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
