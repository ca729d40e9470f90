//! `gpugate proxy HOST`: an OpenSSH ProxyCommand. It opens TLS to the gateway's TLS port with
//! HOST as the server name (the gateway routes by it to that workspace's SSH server, without
//! terminating the TLS of anything else) and carries standard input and output through it, so
//! `ssh` reaches a workspace by name through one port, with no `openssl` and nothing but this
//! binary on the client. `--tcp` carries them over plain TCP instead (a pool port).

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::exit::Failure;

/// Where to go and how.
pub struct Target {
    /// The workspace's host name (the TLS server name).
    pub host: String,
    /// The port (the gateway's TLS port, or a pool port with `tcp`).
    pub port: u16,
    /// Where `host` leads when DNS does not say (the configuration's `gateway`).
    pub connect_to: Option<String>,
    /// Plain TCP, no TLS.
    pub tcp: bool,
    /// The deployment's CA (DER), or Mozilla's roots when `None`.
    pub roots: Option<Vec<Vec<u8>>>,
}

/// Carries standard input and output to `target` until either side ends.
pub fn run(target: Target) -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("starting the runtime: {e}")))?;
    rt.block_on(carry(target))
}

async fn carry(target: Target) -> Result<(), Failure> {
    let via = target.connect_to.as_deref().unwrap_or(&target.host);
    let addrs: Vec<_> = (via, target.port)
        .to_socket_addrs()
        .map_err(|e| Failure::Unreachable(format!("{via}: {e} (set the gateway's address with `gpugate login --gateway`)")))?
        .collect();
    let tcp = tokio::time::timeout(Duration::from_secs(15), TcpStream::connect(addrs.as_slice()))
        .await
        .map_err(|_| Failure::Unreachable(format!("{via}:{} did not answer within 15 s", target.port)))?
        .map_err(|e| Failure::Unreachable(format!("{via}:{}: {e}", target.port)))?;
    let _ = tcp.set_nodelay(true);
    let mut local = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    if target.tcp {
        let mut tcp = tcp;
        let _ = tokio::io::copy_bidirectional(&mut local, &mut tcp).await;
        return Ok(());
    }
    let config = Arc::new(client_config(target.roots.as_deref())?);
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| Failure::Other(format!("{:?} is not a host name", target.host)))?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::Unreachable(format!("TLS to {via}:{} as {}: {e}", target.port, target.host)))?;
    let _ = tokio::io::copy_bidirectional(&mut local, &mut tls).await;
    let _ = tls.shutdown().await;
    Ok(())
}

/// rustls with ring; the deployment's CA or Mozilla's roots; HTTP/1.1 is irrelevant here: no
/// ALPN is offered (the gateway passes the bytes to sshd).
fn client_config(roots: Option<&[Vec<u8>]>) -> Result<rustls::ClientConfig, Failure> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(certs) => {
            for c in certs {
                store
                    .add(CertificateDer::from(c.clone()))
                    .map_err(|e| Failure::Config(format!("the CA file's certificate: {e}")))?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Other(format!("TLS set-up: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth())
}
