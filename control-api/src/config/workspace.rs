//! What a workspace may use: resource limits (a deployment default and a maximum a create may
//! ask for), the images it may run, and how its users log in over SSH.

use serde::Deserialize;

/// Whether a workspace's SSH server takes its password (`docker.password_login`,
/// `GPUGATE_PASSWORD_LOGIN`). Keys always work; the password stays the editor's login either way.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PasswordLogin {
    /// Password login until the owner has an account key, then keys only.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: keys only.
    Off,
}

impl PasswordLogin {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordLogin::Auto => "auto",
            PasswordLogin::On => "on",
            PasswordLogin::Off => "off",
        }
    }

    /// Whether an owner with `account_keys` account keys logs in with the password.
    pub fn allows(self, account_keys: usize) -> bool {
        match self {
            PasswordLogin::Auto => account_keys == 0,
            PasswordLogin::On => true,
            PasswordLogin::Off => false,
        }
    }
}

impl std::str::FromStr for PasswordLogin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(PasswordLogin::Auto),
            "on" => Ok(PasswordLogin::On),
            "off" => Ok(PasswordLogin::Off),
            _ => Err("expected auto, on or off".into()),
        }
    }
}

/// Memory, CPU and process limits of every workspace container. A create may ask for any
/// value from the floor up to the maximum; without one it gets the default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Memory limit in MiB (swap included: the container gets no swap beyond it).
    pub memory_mb: u64,
    /// The most memory a create may ask for, in MiB.
    pub max_memory_mb: u64,
    /// CPU limit in cores (fractions allowed: 0.5 is half a core).
    pub cpus: f64,
    /// The most cores a create may ask for.
    pub max_cpus: f64,
    /// Most processes and threads in the container (a fork bomb stops here).
    pub pids: u32,
    /// The most processes a create may ask for.
    pub max_pids: u32,
    /// Open files per process (`RLIMIT_NOFILE`, soft and hard), for every workspace; 0 leaves
    /// it to the Docker daemon (its own limit, often 1,048,576: one workspace could then pin a
    /// large share of the host's kernel file table). It must not exceed the daemon's own hard
    /// limit (`LimitNOFILE` of its service): the engine cannot raise a container past it.
    pub open_files: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            memory_mb: 8192,
            max_memory_mb: 65536,
            cpus: 4.0,
            max_cpus: 32.0,
            pids: 2048,
            max_pids: 16384,
            open_files: 16384,
        }
    }
}

/// Smallest memory limit, in MiB: below it a workspace's sshd cannot start.
pub const MIN_MEMORY_MB: u64 = 32;
/// Smallest CPU limit.
pub const MIN_CPUS: f64 = 0.01;
/// Smallest pids limit.
pub const MIN_PIDS: u32 = 16;
/// Open-files limit bounds: below the floor sshd and Jupyter fail in odd ways; above the
/// ceiling the kernel refuses it (`fs.nr_open`'s default).
pub const MIN_OPEN_FILES: u64 = 1024;
pub const MAX_OPEN_FILES: u64 = 1_048_576;

impl LimitsConfig {
    /// Checks that defaults lie between the floors and the maxima.
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_mb < MIN_MEMORY_MB || self.memory_mb > self.max_memory_mb {
            return Err(format!(
                "docker.limits.memory_mb {} must be between {MIN_MEMORY_MB} and max_memory_mb {}",
                self.memory_mb, self.max_memory_mb
            ));
        }
        if !(self.cpus >= MIN_CPUS && self.cpus <= self.max_cpus) {
            return Err(format!(
                "docker.limits.cpus {} must be between {MIN_CPUS} and max_cpus {}",
                self.cpus, self.max_cpus
            ));
        }
        if self.pids < MIN_PIDS || self.pids > self.max_pids {
            return Err(format!(
                "docker.limits.pids {} must be between {MIN_PIDS} and max_pids {}",
                self.pids, self.max_pids
            ));
        }
        if self.open_files != 0 && !(MIN_OPEN_FILES..=MAX_OPEN_FILES).contains(&self.open_files) {
            return Err(format!(
                "docker.limits.open_files {} must be 0 (the Docker daemon's) or between {MIN_OPEN_FILES} and {MAX_OPEN_FILES}",
                self.open_files
            ));
        }
        Ok(())
    }
}

/// Whether `image` matches an allow-list rule: an exact name, or a prefix ending in `*`
/// (`registry.example.com/gpu/*`). An empty list allows only `default_image`.
pub fn image_allowed(rules: &[String], default_image: &str, image: &str) -> Result<(), String> {
    if rules.is_empty() {
        if image == default_image {
            return Ok(());
        }
        return Err(format!(
            "image \"{image}\" is not allowed: docker.allowed_images is empty, so only the default image \"{default_image}\" may run"
        ));
    }
    let hit = rules.iter().any(|r| match r.strip_suffix('*') {
        Some(prefix) => image.starts_with(prefix),
        None => image == r,
    });
    if hit {
        Ok(())
    } else {
        let list = rules.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ");
        Err(format!("image \"{image}\" is not allowed by docker.allowed_images ({list})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_login_auto_turns_off_with_the_first_account_key() {
        assert!(PasswordLogin::Auto.allows(0));
        assert!(!PasswordLogin::Auto.allows(1));
        assert!(PasswordLogin::On.allows(3));
        assert!(!PasswordLogin::Off.allows(0));
        assert_eq!("off".parse::<PasswordLogin>(), Ok(PasswordLogin::Off));
        assert!("yes".parse::<PasswordLogin>().unwrap_err().contains("auto, on or off"));
    }

    #[test]
    fn allow_list_matches_exact_names_and_prefixes() {
        assert!(image_allowed(&[], "ws:1", "ws:1").is_ok());
        let err = image_allowed(&[], "ws:1", "postgres:15").expect_err("refused");
        assert!(err.contains("only the default image \"ws:1\""), "{err}");
        let rules = vec!["reg.example/gpu/*".to_string(), "ws:1".to_string()];
        assert!(image_allowed(&rules, "ws:1", "reg.example/gpu/torch:2").is_ok());
        assert!(image_allowed(&rules, "ws:1", "ws:1").is_ok());
        let err = image_allowed(&rules, "ws:1", "ws:2").expect_err("refused");
        assert!(err.contains("\"reg.example/gpu/*\", \"ws:1\""), "{err}");
        assert!(image_allowed(&rules, "ws:1", "reg.example/gpux").is_err());
    }

    #[test]
    fn limits_defaults_must_fit_their_maxima() {
        LimitsConfig::default().validate().expect("defaults valid");
        let l = LimitsConfig { memory_mb: 100_000, ..LimitsConfig::default() };
        assert!(l.validate().expect_err("refused").contains("max_memory_mb"));
        let l = LimitsConfig { pids: 4, ..LimitsConfig::default() };
        assert!(l.validate().expect_err("refused").contains("pids"));
        LimitsConfig { open_files: 0, ..LimitsConfig::default() }.validate().expect("0: the daemon's");
        for open_files in [1, 1023, 1_048_577] {
            let l = LimitsConfig { open_files, ..LimitsConfig::default() };
            assert!(l.validate().expect_err("refused").contains("docker.limits.open_files"), "{open_files}");
        }
    }
}
