//! `gpugate-api`: parse the command line and configuration, start logging, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpugate_api::app::{self, Mode};
use gpugate_api::cli::{self as admin, HostCommand, TokenCommand, UserCommand};
use gpugate_api::config::Config;

/// The gpugate control plane: REST API, port pools, workspaces, route publisher.
///
/// Configuration comes from a TOML file (--config or GPUGATE_CONFIG; see gpugate.example.toml)
/// and environment variables, which override the file (DATABASE_URL, GPUGATE_LISTEN, ...).
#[derive(Parser)]
#[command(name = "gpugate-api", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "GPUGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, its publisher and reconciler (the default).
    Serve {
        /// Do not run a publisher in this process.
        #[arg(long)]
        no_publisher: bool,
    },
    /// Run only the publisher: keep the route table equal to the database.
    Publish,
    /// Print the wildcard DNS records to create for the configured domain.
    Dns {
        /// The gateway's public address (default: gateway_address from the configuration).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage users: admin rights and quotas.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage the fleet's GPU hosts: list, add, drain, undrain, remove.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
    /// Print the API's OpenAPI 3.1 document (JSON) and exit; needs no configuration.
    Openapi,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve { no_publisher: false });
    if matches!(command, Command::Openapi) {
        // Before the configuration is read: the document does not depend on it.
        println!("{}", gpugate_api::http::openapi::json());
        return Ok(());
    }
    init_tracing();
    // The publisher maps the route table: a file truncated under it must not kill the API.
    if let Err(e) = gpugate_routes::install_sigbus_guard() {
        tracing::warn!(error = %e, "cannot install the route table's SIGBUS guard");
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match command {
        Command::Serve { no_publisher } => serve(cfg, Mode::Api { publisher: !no_publisher }).await,
        Command::Publish => serve(cfg, Mode::PublishOnly).await,
        Command::Dns { address } => {
            let addr = address.or(cfg.gateway_address).context(
                "no gateway address: pass --address or set gateway_address / GPUGATE_GATEWAY_ADDRESS",
            )?;
            let kind = if addr.is_ipv4() { "A" } else { "AAAA" };
            for (service, _) in cfg.services() {
                println!("*.{}.{}. 300 IN {kind} {addr}", service.as_str(), cfg.domain);
            }
            Ok(())
        }
        Command::Token { command } => admin::token(&cfg, command).await,
        Command::User { command } => admin::user(&cfg, command).await,
        Command::Host { command } => admin::host(&cfg, command).await,
        Command::Migrate => {
            let db = gpugate_api::db::Db::connect(&cfg).await.context("connecting to PostgreSQL")?;
            db.migrate().await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::CheckConfig => {
            println!("{cfg:#?}");
            Ok(())
        }
        // Printed above.
        Command::Openapi => Ok(()),
    }
}

async fn serve(cfg: Config, mode: Mode) -> anyhow::Result<()> {
    let running = app::start(cfg, mode).await?;
    let state = running.state.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(st) = &state {
                    match gpugate_api::http::reload_pools(st).await {
                        Ok(r) => tracing::info!(?r, "SIGHUP: pools reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: pool reload refused"),
                    }
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
