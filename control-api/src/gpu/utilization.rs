//! How busy a GPU host's GPUs are now: the discovery command (`gpu.nvidia_smi`) asked for
//! `--query-gpu=uuid,utilization.gpu --format=csv,noheader,nounits`. Parsing is pure and
//! unit-tested; the idle task turns the samples into activity ([`crate::gpu_activity`]).

use super::discover::{self, InventorySource};

/// The arguments gpugate appends to the discovery command to sample utilisation.
pub const QUERY_ARGS: [&str; 2] = ["--query-gpu=uuid,utilization.gpu", "--format=csv,noheader,nounits"];

/// One GPU's utilisation as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The GPU's UUID (its inventory key).
    pub uuid: String,
    /// Percent of the last sample period in which a kernel ran; `None` when the host reports
    /// no value (`[N/A]`, as for MIG devices).
    pub percent: Option<u8>,
}

/// Samples the GPUs of `source`: `None` when it has nothing to ask (no GPUs, or indexes listed
/// in configuration, which have no UUID to match samples to), else the samples or why the
/// command failed.
pub async fn read(source: &InventorySource) -> Option<Result<Vec<Sample>, String>> {
    let InventorySource::NvidiaSmi(cmd) = source else {
        return None;
    };
    let text = match discover::query(cmd, &QUERY_ARGS).await {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    Some(parse(&text).map_err(|e| format!("`{} {}` printed {e}", cmd.join(" "), QUERY_ARGS.join(" "))))
}

/// Parses `uuid, percent` lines (the percent with or without ` %`; `[N/A]` for unknown).
/// Blank lines are skipped; anything else is an error naming the line, never a panic and
/// never a guess (a changed output format must not make a busy GPU look idle, or the reverse).
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out: Vec<Sample> = vec![];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("an unexpected line {}: \"{line}\" ({why})", n + 1);
        let Some((uuid, percent)) = line.split_once(',') else {
            return Err(bad("expected uuid, utilization.gpu"));
        };
        let uuid = uuid.trim();
        if !discover::is_gpu_uuid(uuid) {
            return Err(bad("the UUID is not a GPU UUID"));
        }
        let percent = match percent.trim().trim_end_matches('%').trim() {
            "[N/A]" | "N/A" | "[Not Supported]" => None,
            p => match p.parse::<u8>() {
                Ok(v) if v <= 100 => Some(v),
                _ => return Err(bad("utilization.gpu is not a percentage")),
            },
        };
        if out.iter().any(|s| s.uuid == uuid) {
            return Err(bad("the UUID is listed twice"));
        }
        out.push(Sample { uuid: uuid.to_string(), percent });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_percentages_with_or_without_units_and_unknowns() {
        let text = "GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000, 90\n\
                    \n\
                    GPU-11111111-2222-3333-4444-555555555555, 0 %\n\
                    MIG-9f0e, [N/A]\n\
                    GPU-22222222-2222-3333-4444-555555555555, 100\n";
        let s = parse(text).expect("parses");
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], Sample { uuid: "GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000".into(), percent: Some(90) });
        assert_eq!(s[1].percent, Some(0));
        assert_eq!((s[2].uuid.as_str(), s[2].percent), ("MIG-9f0e", None));
        assert_eq!(s[3].percent, Some(100));
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line_never_panics() {
        for (text, why) in [
            ("No devices were found\n", "expected uuid"),
            ("GPU-1\n", "expected uuid"),
            ("GPU 1, 5\n", "not a GPU UUID"),
            (", 5\n", "not a GPU UUID"),
            ("GPU-1, busy\n", "not a percentage"),
            ("GPU-1, 101\n", "not a percentage"),
            ("GPU-1, -1\n", "not a percentage"),
            ("GPU-1, 99999999999999999999\n", "not a percentage"),
            ("GPU-1, 5, 7\n", "not a percentage"),
            ("GPU-1, 5\nGPU-1, 6\n", "listed twice"),
            ("GPU-\u{e9}, 5\n", "not a GPU UUID"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(why) && e.contains("line"), "{text}: {e}");
        }
    }

    #[test]
    fn sources_without_uuids_are_not_sampled() {
        let now = |src: InventorySource| futures_util::FutureExt::now_or_never(async move { read(&src).await }).expect("ready");
        assert_eq!(now(InventorySource::None), None);
        assert_eq!(now(InventorySource::Configured(vec![0, 1])), None);
        assert_eq!(now(InventorySource::NvidiaSmi(vec![])), None);
    }
}
