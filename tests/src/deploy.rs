//! The deployment material under `deploy/` as the tests read it: which
//! `shardline_*` series the observability pack (dashboard, alert rules
//! and their unit tests, the autoscalers' queries) names, and the
//! Secrets `deploy/k8s/secrets/generate.sh` makes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files that name series, relative to the repository's root.
pub const PACK: &[&str] = &[
    "deploy/observability/grafana/shardline.json",
    "deploy/observability/prometheus/alerts.yml",
    "deploy/observability/prometheus/alerts_test.yml",
    "deploy/k8s/components/keda/scaledobject.yaml",
    "deploy/k8s/components/hpa/hpa.yaml",
    "deploy/k8s/components/hpa/prometheus-adapter.yaml",
];

/// Every `shardline_*` name in `text`: each maximal run of the characters
/// a PromQL metric name is made of that starts with `shardline_`. The
/// whole text is read, prose included (a description naming a series
/// must name a real one), so nothing hides in a comment or a title.
/// Names are taken as written: the binaries export summaries, whose
/// series are `NAME{quantile}`, `NAME_sum` and `NAME_count` exactly as a
/// query must name them (a `_bucket` would find nothing).
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("shardline_") {
        // Inside a longer name (`x_shardline_y`): not a name of ours.
        let inside = rest[..start].chars().next_back().is_some_and(is_name);
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        if !inside {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The names each file of [`PACK`] uses.
pub fn observability_pack() -> Result<BTreeMap<&'static str, BTreeSet<String>>> {
    let mut pack = BTreeMap::new();
    for file in PACK {
        let text = std::fs::read_to_string(repo().join(file)).with_context(|| format!("read {file}"))?;
        let names = metric_names(&text);
        ensure!(!names.is_empty(), "{file} names no shardline_* series");
        pack.insert(*file, names);
    }
    Ok(pack)
}

/// Runs `deploy/k8s/secrets/generate.sh` into `dir`: the tokens, the CA,
/// the coordinator's certificate and the PostgreSQL URL a user deploys.
pub fn generate_secrets(dir: &Path) -> Result<()> {
    let script = repo().join("deploy/k8s/secrets/generate.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_whole_tokens_outside_longer_names() {
        let text = r#"max(shardline_desired_workers and on (instance) (shardline_coordinator_leader == 1))
            rate(shardline_x_sum[5m]) "see shardline_y." my_shardline_z shardline_a:b"#;
        let names: Vec<String> = metric_names(text).into_iter().collect();
        assert_eq!(
            names,
            [
                "shardline_a:b",
                "shardline_coordinator_leader",
                "shardline_desired_workers",
                "shardline_x_sum",
                "shardline_y"
            ]
        );
    }
}
