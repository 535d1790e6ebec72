//! Refuses to run the end-to-end tests on stale binaries.
//!
//! The tests start the workspace's binaries as child processes, and
//! `cargo test` builds test targets, not those binaries: after an edit, a
//! bare `cargo test` would test the previous build and could pass on code
//! that no longer exists. Cargo writes, next to each binary, a dep-info file
//! (`<bin>.d`) listing every source file it was built from; a binary older
//! than any of them is stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

/// What to run instead, in every message.
const BUILD_FIRST: &str = "run scripts/test.sh (or cargo build --workspace --bins) first";

/// Checks `binary` once per test process; panics (failing the test that
/// asked for it, with the reason) when it is missing or stale.
pub fn ensure_fresh(binary: &Path) {
    static CHECKED: OnceLock<Mutex<BTreeMap<PathBuf, Result<(), String>>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(Mutex::default);
    let result = checked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(binary.to_owned())
        .or_insert_with(|| check(binary))
        .clone();
    if let Err(reason) = result {
        panic!("{BUILD_FIRST}: {reason}");
    }
}

/// `Err` says why `binary` must be built again.
fn check(binary: &Path) -> Result<(), String> {
    let built = modified(binary).map_err(|e| format!("{} is missing ({e})", binary.display()))?;
    let dep_info = binary.with_extension("d");
    let text = std::fs::read_to_string(&dep_info)
        .map_err(|e| format!("cannot read {} ({e}) to tell whether it is stale", dep_info.display()))?;
    // `target: dep dep ...`; spaces inside paths are escaped as `\ `.
    let (_, deps) = text.split_once(": ").unwrap_or(("", &text));
    let deps = deps.replace("\\ ", "\u{0}");
    let deps: Vec<String> = deps.split_whitespace().map(|d| d.replace('\u{0}', " ")).collect();
    // A target dir copied from another checkout holds binaries built from
    // that checkout's sources, not this one's.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("/"));
    if !deps.iter().any(|d| Path::new(d).starts_with(workspace)) {
        return Err(format!(
            "{} was not built from this checkout ({})",
            binary.display(),
            workspace.display()
        ));
    }
    for dep in deps {
        let Ok(changed) = modified(Path::new(&dep)) else {
            // A source that is gone (a module removed or moved) means an edit
            // after the build.
            return Err(format!("{} was built from {dep}, which is gone", binary.display()));
        };
        if changed > built {
            return Err(format!("{} is older than {dep}", binary.display()));
        }
    }
    Ok(())
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}
