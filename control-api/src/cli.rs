//! The administrative commands of `gpugate-api`: tokens (create, list, revoke) and users
//! (admin rights, quota overrides). `main.rs` parses them; they run here.

use anyhow::Context;
use clap::Subcommand;

use crate::config::Config;
use crate::db::{hosts, quotas, users, Db};

/// `gpugate-api token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a user (created if missing) and print it once.
    Create {
        /// The user's name.
        #[arg(long)]
        user: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Let the token expire after this long: a number with s, m, h or d (30d, 12h).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
    /// List tokens (never the tokens themselves: id, user, hint, dates).
    List {
        /// Only this user's tokens.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id (from `token list`); refused at once on every API process.
    Revoke {
        /// The token's id.
        #[arg(long)]
        id: i64,
    },
}

/// `gpugate-api user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Grant a user admin rights.
    SetAdmin {
        /// The user's name.
        #[arg(long)]
        user: String,
    },
    /// Remove a user's admin rights.
    UnsetAdmin {
        /// The user's name.
        #[arg(long)]
        user: String,
    },
    /// Set a user's quota overrides; an omitted limit falls back to the deployment default
    /// ([quotas] in the configuration); with none given, the overrides are removed.
    SetQuota {
        /// The user's name.
        #[arg(long)]
        user: String,
        /// Most environments (any status but deleted).
        #[arg(long)]
        environments: Option<u32>,
        /// Most GPUs across the user's environments.
        #[arg(long)]
        gpus: Option<u32>,
        /// Most environments creating or running at once.
        #[arg(long)]
        running: Option<u32>,
    },
}

/// `gpugate-api host ...`: the fleet's GPU hosts.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List every host: state, health, GPUs free of total, environments.
    List,
    /// Add a GPU host (active at once; its engine is probed within fleet.probe_interval_s).
    Add {
        /// 1 to 63 of a-z, 0-9 and '-'.
        #[arg(long)]
        name: String,
        /// unix:///path, tcp://host:2376 or https://host:2376 (with --tls-dir), or http://host:port
        /// (no TLS: a trusted lab network only).
        #[arg(long)]
        docker: String,
        /// Directory (on every API host) with the engine's TLS client certificates: ca.pem,
        /// cert.pem, key.pem.
        #[arg(long)]
        tls_dir: Option<String>,
        /// The address the host's containers publish on; gateways dial routes there.
        #[arg(long)]
        upstream: std::net::IpAddr,
        /// GPU indexes of the host, comma-separated (0,1,2,3); none for a CPU-only host.
        #[arg(long, value_delimiter = ',')]
        gpus: Vec<u32>,
        /// The GPUs' model label (matched by a create's gpu_model).
        #[arg(long, default_value = "")]
        gpu_model: String,
        /// Most environments at once.
        #[arg(long)]
        max_environments: Option<u32>,
    },
    /// Stop placing new environments on a host (those there keep running, stop and start).
    Drain {
        /// The host's name.
        name: String,
    },
    /// Take a host out of the fleet's work: no placement and no probe (a host being rebuilt);
    /// its environments stay as they are. `undrain` makes it active again.
    Disable {
        /// The host's name.
        name: String,
    },
    /// Place new environments on a drained or disabled host again.
    Undrain {
        /// The host's name.
        name: String,
    },
    /// Remove a host and its GPUs; refused while environments live there.
    Remove {
        /// The host's name.
        name: String,
    },
    /// Forget the Docker engine a host name stands for (the host was rebuilt with a new
    /// engine): the next process that reaches it records the new one. Until then, a process
    /// whose engine differs from the recorded one refuses to act for the host.
    ForgetEngine {
        /// The host's name.
        name: String,
    },
}

/// Parses `30d`, `12h`, `15m`, `90s` (or plain seconds) into seconds.
pub fn parse_duration(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (num, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("\"{v}\" is not a duration (e.g. 30d, 12h, 15m, 90s)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("\"{v}\": unit must be s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("\"{v}\" must be at least one second and at most a few centuries")),
        Some(s) => Ok(s),
    }
}

async fn connect(cfg: &Config) -> anyhow::Result<Db> {
    let db = Db::connect(cfg).await.context("connecting to PostgreSQL")?;
    db.migrate().await.context("applying database migrations")?;
    Ok(db)
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "-".into())
}

/// Runs a token command.
pub async fn token(cfg: &Config, command: TokenCommand) -> anyhow::Result<()> {
    let db = connect(cfg).await?;
    match command {
        TokenCommand::Create { user, admin, expires_in } => {
            let (u, token) = users::create_token(&db, &user, admin, expires_in)
                .await
                .with_context(|| format!("creating a token for {user}"))?;
            let expiry = expires_in.map(|s| format!(", expires in {s} s")).unwrap_or_default();
            eprintln!("token for {}{}{expiry} (shown once):", u.name, if u.is_admin { " (admin)" } else { "" });
            println!("{token}");
        }
        TokenCommand::List { user } => {
            println!("{:>6}  {:<20} {:<10} {:<20} {:<20} {:<20} {:<20}", "id", "user", "hint", "created", "expires", "last used", "revoked");
            for t in users::list_tokens(&db, user.as_deref()).await? {
                println!(
                    "{:>6}  {:<20} {:<10} {:<20} {:<20} {:<20} {:<20}",
                    t.id,
                    t.user,
                    format!("{}…", t.hint),
                    when(Some(t.created_at)),
                    when(t.expires_at),
                    when(t.last_used_at),
                    when(t.revoked_at)
                );
            }
        }
        TokenCommand::Revoke { id } => {
            if !users::revoke_token(&db, id).await? {
                anyhow::bail!("no token with id {id}, or it is already revoked (see token list)");
            }
            eprintln!("token {id} revoked");
        }
    }
    Ok(())
}

/// Runs a user command.
pub async fn user(cfg: &Config, command: UserCommand) -> anyhow::Result<()> {
    let db = connect(cfg).await?;
    let missing = |user: &str| anyhow::anyhow!("no user named {user} (token create --user {user} makes one)");
    match command {
        UserCommand::SetAdmin { user } => {
            if !users::set_admin(&db, &user, true).await? {
                return Err(missing(&user));
            }
            eprintln!("{user} is an admin");
        }
        UserCommand::UnsetAdmin { user } => {
            if !users::set_admin(&db, &user, false).await? {
                return Err(missing(&user));
            }
            eprintln!("{user} is no longer an admin");
        }
        UserCommand::SetQuota { user, environments, gpus, running } => {
            let o = quotas::Overrides { environments, gpus, running };
            if !quotas::set(&db, &user, o).await? {
                return Err(missing(&user));
            }
            eprintln!("quota of {user}: environments {environments:?}, gpus {gpus:?}, running {running:?} (None: the default)");
        }
    }
    Ok(())
}

/// Runs a host command.
pub async fn host(cfg: &Config, command: HostCommand) -> anyhow::Result<()> {
    let db = connect(cfg).await?;
    let missing = |name: &str| anyhow::anyhow!("no host named {name} (see host list)");
    match command {
        HostCommand::List => {
            println!(
                "{:<20} {:<9} {:<7} {:>9} {:>5} {:<16} {:<24} {}",
                "name", "state", "health", "gpus", "envs", "upstream", "model", "docker"
            );
            for h in hosts::list(&db).await? {
                println!(
                    "{:<20} {:<9} {:<7} {:>9} {:>5} {:<16} {:<24} {}",
                    h.name,
                    h.state,
                    h.health,
                    format!("{}/{}", h.gpus_free, h.gpus_total),
                    h.environments,
                    h.upstream_address,
                    if h.gpu_model.is_empty() { "-" } else { &h.gpu_model },
                    if h.docker_endpoint.is_empty() { "(local defaults)" } else { &h.docker_endpoint },
                );
            }
        }
        HostCommand::Add { name, docker, tls_dir, upstream, gpus, gpu_model, max_environments } => {
            let new = hosts::NewHost {
                name,
                docker_endpoint: docker,
                tls_dir,
                upstream_address: upstream,
                gpu_model,
                max_environments,
                gpus,
            };
            crate::fleet::check_new_host(&new).map_err(anyhow::Error::msg)?;
            let Some(row) = hosts::add(&db, &new).await? else {
                anyhow::bail!("a host named {} exists (see host list)", new.name);
            };
            eprintln!("host {} added: {} GPUs, publishing on {}", row.name, row.gpus_total, row.upstream_address);
        }
        HostCommand::Drain { name } => {
            hosts::set_state(&db, &name, hosts::state::DRAINING).await?.ok_or_else(|| missing(&name))?;
            eprintln!("host {name} is draining: no new placements there");
        }
        HostCommand::Disable { name } => {
            hosts::set_state(&db, &name, hosts::state::DISABLED).await?.ok_or_else(|| missing(&name))?;
            eprintln!("host {name} is disabled: no placements, no probes");
        }
        HostCommand::Undrain { name } => {
            hosts::set_state(&db, &name, hosts::state::ACTIVE).await?.ok_or_else(|| missing(&name))?;
            eprintln!("host {name} is active");
        }
        HostCommand::ForgetEngine { name } => {
            if !hosts::forget_engine(&db, &name).await? {
                return Err(missing(&name));
            }
            eprintln!("host {name} forgot its engine; the next process to reach it records the one it finds");
        }
        HostCommand::Remove { name } => {
            if name == cfg.fleet.host_name {
                anyhow::bail!("host {name} is this configuration's own engine (fleet.host_name); drain it instead");
            }
            match hosts::remove(&db, &name).await? {
                hosts::Removed::Done => eprintln!("host {name} removed"),
                hosts::Removed::NotFound => return Err(missing(&name)),
                hosts::Removed::InUse(n) => anyhow::bail!(
                    "host {name} still has {n} environments (any status but deleted); drain it, and delete them or wait for them first"
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        use super::parse_duration as p;
        assert_eq!(p("30d"), Ok(30 * 86_400));
        assert_eq!(p("12h"), Ok(43_200));
        assert_eq!(p("90"), Ok(90));
        assert!(p("0s").is_err() && p("5w").is_err() && p("abc").is_err() && p("").is_err());
    }
}
