//! Workspace SSH host identity. Every workspace has one Ed25519 host key for its whole life,
//! kept in the database and given to each of its containers, with a certificate from the
//! deployment's SSH host CA naming the workspace's SSH host name. A client that trusts the CA
//! (one `@cert-authority` line for every workspace's names) or saw the key once never gets a
//! warning: not after a stop and start, not after a move to another host, not when the
//! workspace's pool port later goes to another workspace (whose certificate names another
//! host). The CA's private key stays in the API and its database: only certificates reach
//! workspaces.

use std::time::{SystemTime, UNIX_EPOCH};

use ssh_key::{certificate, Algorithm, LineEnding, PrivateKey};

use crate::db::{ssh_identity as rows, Db};

/// Why an identity could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("SSH key: {0}")]
    Key(#[from] ssh_key::Error),
}

/// How far back a certificate's validity starts (clients whose clock is behind).
const CLOCK_SKEW_S: u64 = 600;

/// A certificate's end of validity: none (the largest time the format's library takes; the
/// certificate lives as long as the key, and is made again at every start).
const NO_END: u64 = i64::MAX as u64;

/// The deployment's SSH host CA.
pub struct HostCa {
    key: PrivateKey,
    public: String,
}

impl std::fmt::Debug for HostCa {
    // Never the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCa").field("public", &self.public).finish()
    }
}

impl HostCa {
    /// The deployment's CA, made and stored by the first process that asks.
    pub async fn load(db: &Db) -> Result<HostCa, IdentityError> {
        let pem = rows::host_ca(db, &new_private_key()?).await?;
        let key = PrivateKey::from_openssh(&pem)?;
        let public = key.public_key().to_openssh()?;
        Ok(HostCa { key, public })
    }

    /// Its public key (`ssh-ed25519 AAAA...`).
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The known_hosts line that trusts every workspace's certificate under `domain`, on any
    /// port (a pool port, or the TLS port through a ProxyCommand).
    pub fn known_hosts_line(&self, domain: &str) -> String {
        format!("@cert-authority *.ssh.{domain},[*.ssh.{domain}]:* {}", self.public)
    }

    /// A host certificate for `host_key` naming `principal` (the workspace's SSH host name),
    /// valid from a few minutes ago with no end; `key_id` says whose it is in sshd's and the
    /// client's logs.
    fn certify(&self, host_key: &PrivateKey, key_id: &str, principal: &str) -> Result<String, IdentityError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut b = certificate::Builder::new_with_random_nonce(
            &mut rand_core::OsRng,
            host_key.public_key(),
            now.saturating_sub(CLOCK_SKEW_S),
            NO_END,
        )?;
        b.cert_type(certificate::CertType::Host)?;
        b.key_id(key_id)?;
        b.valid_principal(principal)?;
        Ok(b.sign(&self.key)?.to_openssh()?)
    }
}

/// What a workspace's container gets: its host key and the certificate for it.
pub struct HostIdentity {
    /// The private key, OpenSSH format.
    pub private_key: String,
    /// Its certificate (`ssh-ed25519-cert-v01@openssh.com AAAA...`).
    pub certificate: String,
}

/// Environment `env_id`'s identity for a new container (its key made on first use), with a
/// fresh certificate naming `principal`. `None` for an unknown environment.
pub async fn for_container(db: &Db, ca: &HostCa, env_id: &str, principal: &str) -> Result<Option<HostIdentity>, IdentityError> {
    let Some(pem) = rows::env_host_key(db, env_id, &new_private_key()?).await? else {
        return Ok(None);
    };
    let key = PrivateKey::from_openssh(&pem)?;
    let certificate = ca.certify(&key, &format!("gpugate workspace {env_id}"), principal)?;
    Ok(Some(HostIdentity { private_key: pem, certificate }))
}

/// The public half (`ssh-ed25519 AAAA...`) of a stored host key; `None` if it does not parse
/// (never a panic on a row).
pub fn public_of(pem: &str) -> Option<String> {
    PrivateKey::from_openssh(pem).ok()?.public_key().to_openssh().ok()
}

fn new_private_key() -> Result<String, IdentityError> {
    let key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)?;
    Ok(key.to_openssh(LineEnding::LF)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> HostCa {
        let key = PrivateKey::from_openssh(new_private_key().expect("key")).expect("parses");
        let public = key.public_key().to_openssh().expect("public");
        HostCa { key, public }
    }

    #[test]
    fn a_certificate_names_the_workspace_and_verifies_against_the_ca() {
        let ca = ca();
        let host = PrivateKey::from_openssh(new_private_key().expect("key")).expect("parses");
        let line = ca.certify(&host, "gpugate workspace abc", "abc.ssh.example.test").expect("certified");
        let cert = ssh_key::Certificate::from_openssh(&line).expect("a certificate");
        assert_eq!(cert.cert_type(), certificate::CertType::Host);
        assert_eq!(cert.valid_principals(), ["abc.ssh.example.test".to_string()]);
        assert_eq!(cert.public_key(), host.public_key().key_data(), "it certifies the host's key");
        let fingerprint = ca.key.public_key().fingerprint(Default::default());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("time").as_secs();
        cert.validate_at(now, [&fingerprint]).expect("valid now, signed by the CA");
        let other = ca_fingerprint_of_another();
        assert!(cert.validate_at(now, [&other]).is_err(), "another CA does not vouch for it");
        assert!(format!("{ca:?}").contains("public") && !format!("{ca:?}").contains("PRIVATE"));
        assert_eq!(
            ca.known_hosts_line("example.test"),
            format!("@cert-authority *.ssh.example.test,[*.ssh.example.test]:* {}", ca.public_key())
        );
    }

    fn ca_fingerprint_of_another() -> ssh_key::Fingerprint {
        ca().key.public_key().fingerprint(Default::default())
    }
}
