//! The checkpoint export file (`shardline export` writes it, `shardline
//! import` reads it), both here so the two cannot drift. A library module
//! so the fuzz target (`fuzz/`) reads files exactly as the CLI does.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use shardline_proto::{LeaseId, WindowState, v1};

/// The export file's format marker.
pub const EXPORT_FORMAT: &str = "shardline.checkpoints/1";

/// The export document.
pub fn export(checkpoints: &[v1::ExportedCheckpoint]) -> Result<String, serde_json::Error> {
    let rows: Vec<Value> = checkpoints
        .iter()
        .map(|c| {
            let lease = LeaseId::try_from(c.lease.as_ref()).map_or("?".to_owned(), |i| i.to_string());
            let mut row = json!({"lease": lease, "checkpoint": c.checkpoint, "epoch": c.epoch});
            // A tumbling window and its state (base64), where the mapping
            // has windows; an import restores it with the checkpoint.
            if let Some(w) = c.window.as_ref().and_then(|w| WindowState::try_from(w).ok()) {
                row["window"] = serde_json::to_value(w)?;
            }
            Ok(row)
        })
        .collect::<Result<_, serde_json::Error>>()?;
    let exported_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let doc = json!({"format": EXPORT_FORMAT, "exported_at": exported_at, "checkpoints": rows});
    serde_json::to_string_pretty(&doc)
}

/// Reads an export document, checking every entry (format, lease ids,
/// offsets, windows, duplicates) before anything is sent anywhere.
pub fn parse_export(text: &str) -> Result<Vec<(LeaseId, i64, Option<WindowState>)>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match doc.get("format").and_then(Value::as_str) {
        Some(EXPORT_FORMAT) => {}
        Some(other) => {
            return Err(format!("format `{other}`; allowed: `{EXPORT_FORMAT}` (from `shardline export`)"));
        }
        None => {
            return Err(format!("no `format` field; expected a `shardline export` file (`{EXPORT_FORMAT}`)"));
        }
    }
    let entries = doc.get("checkpoints").and_then(Value::as_array).ok_or("no `checkpoints` array")?;
    let mut out = Vec::with_capacity(entries.len());
    let mut seen = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let lease =
            e.get("lease").and_then(Value::as_str).ok_or(format!("checkpoints[{i}]: no `lease` string"))?;
        let lease: LeaseId = lease.parse().map_err(|e| format!("checkpoints[{i}]: {e}"))?;
        let offset = e
            .get("checkpoint")
            .and_then(Value::as_i64)
            .filter(|o| *o >= 0)
            .ok_or(format!("checkpoints[{i}] ({lease}): `checkpoint` must be an offset, 0 or more"))?;
        if !seen.insert(lease.clone()) {
            return Err(format!("checkpoints[{i}]: `{lease}` is listed twice"));
        }
        let window = match e.get("window") {
            None | Some(Value::Null) => None,
            Some(w) => {
                let bad = |why: String| {
                    format!(
                        "checkpoints[{i}] ({lease}): `window` {why}; expected {{\"start_ms\", \"end_ms\", \"state\" (base64), \"closed\"}} as `shardline export` writes it"
                    )
                };
                let w: WindowState = serde_json::from_value(w.clone()).map_err(|e| bad(e.to_string()))?;
                if w.end_ms <= w.start_ms {
                    return Err(bad(format!("ends ({}) before it starts ({})", w.end_ms, w.start_ms)));
                }
                Some(w)
            }
        };
        out.push((lease, offset, window));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_reads_back_and_bad_files_name_their_problem() {
        let window = WindowState { state: Some(b"{\"k\":3}".to_vec()), ..WindowState::open(60_000, 120_000) };
        let doc = export(&[
            v1::ExportedCheckpoint {
                lease: Some((&LeaseId::shard("orders", 3)).into()),
                checkpoint: 42,
                epoch: 7,
                window: None,
            },
            v1::ExportedCheckpoint {
                lease: Some((&LeaseId::shard("orders", 4)).into()),
                checkpoint: 9,
                epoch: 1,
                window: Some((&window).into()),
            },
        ]);
        let doc = doc.unwrap_or_else(|_| panic!("export"));
        assert_eq!(
            parse_export(&doc),
            Ok(vec![(LeaseId::shard("orders", 3), 42, None), (LeaseId::shard("orders", 4), 9, Some(window))]),
            "a window and its state come back with the checkpoint"
        );
        let bad = |text: &str| parse_export(text).err().unwrap_or_default();
        assert!(bad("{").contains("not JSON"));
        assert!(bad("{\"checkpoints\": []}").contains("no `format`"));
        let entries = |e: &str| format!("{{\"format\": \"{EXPORT_FORMAT}\", \"checkpoints\": [{e}]}}");
        assert!(bad(&entries("{\"lease\": \"orders\", \"checkpoint\": 1}")).contains("checkpoints[0]"));
        assert!(bad(&entries("{\"lease\": \"orders/1\", \"checkpoint\": -1}")).contains("0 or more"));
        let twice =
            entries("{\"lease\": \"o/1\", \"checkpoint\": 1}, {\"lease\": \"o/1\", \"checkpoint\": 2}");
        assert!(bad(&twice).contains("listed twice"));
        let window =
            |w: &str| entries(&format!("{{\"lease\": \"o/1\", \"checkpoint\": 1, \"window\": {w}}}"));
        assert!(bad(&window("{\"start_ms\": 5, \"end_ms\": 1}")).contains("before it starts"));
        assert!(bad(&window("{\"start_ms\": 0, \"end_ms\": 1, \"state\": \"!!\"}")).contains("`window`"));
        assert!(bad(&window("7")).contains("`window`"));
    }
}
