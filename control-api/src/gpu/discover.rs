//! Where a GPU host's inventory comes from: `nvidia-smi` (or a configured command printing
//! its CSV), or a list of indexes from configuration. Parsing is pure and unit-tested.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

/// The arguments gpugate appends to the discovery command.
pub const QUERY_ARGS: [&str; 2] = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"];

/// How long the discovery command may run.
const TIMEOUT: Duration = Duration::from_secs(20);

/// One GPU as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Its index now (may change across reboots and driver reloads).
    pub index: u32,
    /// Its UUID (`GPU-…`), stable across reboots; `None` for an index from configuration.
    pub uuid: Option<String>,
    /// The model name, e.g. `NVIDIA A100-SXM4-80GB` (empty when unknown).
    pub name: String,
    /// Its memory in MiB, when known.
    pub memory_mib: Option<u64>,
}

impl Device {
    /// The inventory key: the UUID when known, else `index:<n>`.
    pub fn key(&self) -> String {
        match &self.uuid {
            Some(u) => u.clone(),
            None => format!("index:{}", self.index),
        }
    }
}

/// Where the inventory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InventorySource {
    /// No GPUs here (no `devices`, no discovery command found).
    None,
    /// Indexes listed in configuration (`gpu.devices`), no UUIDs.
    Configured(Vec<u32>),
    /// A command printing `nvidia-smi`'s CSV; read at start and on every reconcile pass.
    NvidiaSmi(Vec<String>),
}

impl InventorySource {
    /// The source configuration names: `devices` when listed; else the discovery command when
    /// it is present on this host (a bare name is looked up on `PATH`); else none.
    pub fn from_config(devices: &[u32], command: &[String]) -> InventorySource {
        if !devices.is_empty() {
            return InventorySource::Configured(devices.to_vec());
        }
        match command.first() {
            Some(program) if command_exists(program) => InventorySource::NvidiaSmi(command.to_vec()),
            _ => InventorySource::None,
        }
    }

    /// What the API shows as the inventory's source.
    pub fn describe(&self) -> &'static str {
        match self {
            InventorySource::None => "none",
            InventorySource::Configured(_) => "config",
            InventorySource::NvidiaSmi(_) => "nvidia-smi",
        }
    }

    /// Whether the inventory is re-read on every reconcile pass.
    pub fn is_discovered(&self) -> bool {
        matches!(self, InventorySource::NvidiaSmi(_))
    }

    /// The host's GPUs now.
    pub async fn read(&self) -> Result<Vec<Device>, String> {
        match self {
            InventorySource::None => Ok(vec![]),
            InventorySource::Configured(ix) => Ok(ix
                .iter()
                .map(|i| Device { index: *i, uuid: None, name: String::new(), memory_mib: None })
                .collect()),
            InventorySource::NvidiaSmi(cmd) => run(cmd).await,
        }
    }
}

fn command_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Runs the discovery command and parses what it prints.
async fn run(cmd: &[String]) -> Result<Vec<Device>, String> {
    let Some(text) = query(cmd, &QUERY_ARGS).await? else {
        return Ok(vec![]);
    };
    parse(&text).map_err(|e| format!("`{} {}` printed {e}", cmd.join(" "), QUERY_ARGS.join(" ")))
}

/// Runs `cmd` (`nvidia-smi` or a command printing its CSV) with `query` appended, within the
/// time limit; returns what it printed (`None` for an empty command), or why it failed, naming
/// the command and its first complaint.
pub(super) async fn query(cmd: &[String], query: &[&str]) -> Result<Option<String>, String> {
    let Some((program, args)) = cmd.split_first() else {
        return Ok(None);
    };
    let shown = format!("{} {}", cmd.join(" "), query.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .args(query)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TIMEOUT, child)
        .await
        .map_err(|_| format!("`{shown}` did not finish within {} s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if !out.status.success() {
        let (err, text) = (String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        let first = err.lines().chain(text.lines()).map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        return Err(format!("`{shown}` failed ({}): {first}", out.status));
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Whether `uuid` can be a GPU (or MIG device) UUID as `nvidia-smi` prints it: 1 to 128 ASCII
/// letters, digits and dashes. Every parser of `nvidia-smi` output checks its UUIDs with it.
pub(super) fn is_gpu_uuid(uuid: &str) -> bool {
    !uuid.is_empty() && uuid.len() <= 128 && uuid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader`
/// (memory with or without its ` MiB` unit; `[N/A]` for unknown values). Blank lines are
/// skipped; anything else that is not four fields with an index and a UUID is an error
/// naming the line, so a changed output format never empties the inventory.
pub fn parse(text: &str) -> Result<Vec<Device>, String> {
    let mut out: Vec<Device> = vec![];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("an unexpected line {}: \"{line}\" ({why})", n + 1);
        // The name may itself hold commas: index and UUID first, memory last.
        let mut head = line.splitn(3, ',');
        let (Some(index), Some(uuid), Some(rest)) = (head.next(), head.next(), head.next()) else {
            return Err(bad("expected index, uuid, name, memory.total"));
        };
        let Some((name, memory)) = rest.rsplit_once(',') else {
            return Err(bad("expected index, uuid, name, memory.total"));
        };
        let index: u32 = index.trim().parse().map_err(|_| bad("the index is not a number"))?;
        let uuid = uuid.trim();
        if !is_gpu_uuid(uuid) {
            return Err(bad("the UUID is not a GPU UUID"));
        }
        let memory = memory.trim();
        let memory_mib = match memory.trim_end_matches("MiB").trim() {
            "[N/A]" | "N/A" | "" => None,
            m => Some(m.parse::<u64>().map_err(|_| bad("memory.total is not a number of MiB"))?),
        };
        if out.iter().any(|d| d.uuid.as_deref() == Some(uuid)) {
            return Err(bad("the UUID is listed twice"));
        }
        let name = name.trim();
        let name = if name == "[N/A]" { "" } else { name };
        out.push(Device { index, uuid: Some(uuid.to_string()), name: name.chars().take(200).collect(), memory_mib });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv_with_units_commas_in_names_and_unknowns() {
        let text = "0, GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000, NVIDIA A100-SXM4-80GB, 81920 MiB\n\
                    \n\
                    1, GPU-11111111-2222-3333-4444-555555555555, Tesla T4, custom, [N/A]\n\
                    3, MIG-9f0e, NVIDIA H100 80GB HBM3, 81559\n";
        let d = parse(text).expect("parses");
        assert_eq!(d.len(), 3);
        assert_eq!(d[0], Device {
            index: 0,
            uuid: Some("GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000".into()),
            name: "NVIDIA A100-SXM4-80GB".into(),
            memory_mib: Some(81920),
        });
        assert_eq!((d[1].name.as_str(), d[1].memory_mib), ("Tesla T4, custom", None));
        assert_eq!((d[2].index, d[2].memory_mib), (3, Some(81559)));
        assert_eq!(d[2].key(), "MIG-9f0e");
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn anything_else_is_an_error_naming_the_line() {
        for (text, why) in [
            ("No devices were found\n", "expected index"),
            ("x, GPU-1, A, 1 MiB\n", "index is not a number"),
            ("0, GPU 1, A, 1 MiB\n", "not a GPU UUID"),
            ("0, GPU-1, A, lots\n", "not a number of MiB"),
            ("0, GPU-1, A, 1 MiB\n1, GPU-1, A, 1 MiB\n", "listed twice"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(why) && e.contains("line"), "{text}: {e}");
        }
    }

    #[test]
    fn configured_indexes_have_no_uuid_and_are_keyed_by_index() {
        let src = InventorySource::from_config(&[2, 0], &["nvidia-smi".into()]);
        assert_eq!(src, InventorySource::Configured(vec![2, 0]));
        let d = futures_util::FutureExt::now_or_never(src.read()).expect("ready").expect("reads");
        assert_eq!(d.iter().map(Device::key).collect::<Vec<_>>(), vec!["index:2", "index:0"]);
        let missing = InventorySource::from_config(&[], &["/nonexistent/nvidia-smi".into()]);
        assert_eq!(missing, InventorySource::None);
        assert_eq!(InventorySource::from_config(&[], &[]), InventorySource::None);
    }
}
