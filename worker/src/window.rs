//! Tumbling windows (a stream's `tumbling_window`, Lambda's stream
//! aggregation): per shard, records are grouped into windows of a fixed
//! size aligned on their broker timestamps; every invocation of a window
//! gets the state the previous successful one returned, and the last one
//! is flagged final. The open window and its state travel with each
//! checkpoint (the coordinator stores both in one record, fenced by epoch),
//! so a new owner after a failover or a handoff resumes the window with the
//! state of the last checkpoint, and the records after it.
//!
//! Which window a record belongs to: the window of its timestamp
//! (`floor(t / size) × size`), except that a record whose timestamp falls
//! before the end of the open window counts in the open window, and one
//! before the end of a window that closed counts in the window right after
//! it (a producer's CreateTime may go backwards; the partition's order is
//! the truth, and a closed window never opens again). A record without a
//! timestamp counts in the open window, or in the window of the worker's
//! clock when none is open.
//!
//! The rules that keep the state equal to the records counted:
//! - the state changes only when an invocation succeeds; a retry gets the
//!   state from before the failed attempt;
//! - bisected halves run in order, the second with the first's state;
//! - with item failures, the records before the first failed one are
//!   finished and the returned state is kept: it must count exactly those
//!   (the records from the failed one on are offered again);
//! - records that give up (to `on_failure`) are not counted;
//! - the final invocation is retried until it succeeds (as Lambda: the
//!   shard waits), also when its records gave up: then it runs with no
//!   records, only the state.

use std::sync::Mutex;

use shardline_proto::WindowState;

/// Largest state a handler may return (Lambda's 1 MB per shard); a larger
/// one fails its invocation with an error saying so.
pub const MAX_STATE_BYTES: usize = 1 << 20;

/// What a handler sees of its window in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Unix ms, inclusive.
    pub start_ms: i64,
    /// Unix ms, exclusive.
    pub end_ms: i64,
    /// What the previous invocation of this window returned; `None` in the
    /// window's first invocation.
    pub state: Option<Vec<u8>>,
    /// The window's last invocation: act on the state now (write the
    /// aggregate out); after it succeeds the state is dropped.
    pub is_final: bool,
}

/// The window `timestamp_ms` falls in, for windows of `size_ms`, given the
/// lease's last window (see the module docs).
pub fn window_of(
    size_ms: i64,
    last: Option<&WindowState>,
    timestamp_ms: Option<i64>,
    now_ms: i64,
) -> (i64, i64) {
    let align = |t: i64| {
        let start = t.div_euclid(size_ms).saturating_mul(size_ms);
        (start, start.saturating_add(size_ms))
    };
    match (last, timestamp_ms) {
        (Some(w), Some(t)) if t < w.end_ms && !w.closed => (w.start_ms, w.end_ms),
        (Some(w), Some(t)) if t < w.end_ms => align(w.end_ms),
        (Some(w), None) if !w.closed => (w.start_ms, w.end_ms),
        (Some(w), None) => align(now_ms.max(w.end_ms)),
        (None, None) => align(now_ms),
        (_, Some(t)) => align(t),
    }
}

/// A lease's open window, shared by its driver (which opens and closes
/// windows), its lane (which runs invocations with it and keeps the state
/// they return) and its finalizer (which checkpoints it with each offset).
#[derive(Debug, Default)]
pub struct Slot {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The lease's last window: open (with its state) or closed.
    open: Option<WindowState>,
    /// The position of the open window's last record, once a record of a
    /// later window was seen: the invocation holding it is final.
    last: Option<i64>,
}

impl Slot {
    /// Resumes `last` (the window of the lease's last checkpoint).
    pub fn resume(last: Option<WindowState>) -> Self {
        Self { inner: Mutex::new(Inner { open: last, last: None }) }
    }

    /// The last window (open with its state, or closed), as it is
    /// checkpointed.
    pub fn snapshot(&self) -> Option<WindowState> {
        crate::lock(&self.inner).open.clone()
    }

    /// The open window's bounds; `None` when none is open.
    pub fn bounds(&self) -> Option<(i64, i64)> {
        crate::lock(&self.inner).open.as_ref().and_then(WindowState::open_bounds)
    }

    /// The window a record with `timestamp_ms` belongs to ([`window_of`]).
    pub fn window_of(&self, size_ms: i64, timestamp_ms: Option<i64>, now_ms: i64) -> (i64, i64) {
        window_of(size_ms, crate::lock(&self.inner).open.as_ref(), timestamp_ms, now_ms)
    }

    /// Records of window `bounds` are next: opens it (a window that was open
    /// must have been closed first); `last`: the position of its last record
    /// if a record of a later window is already known.
    pub fn enter(&self, bounds: (i64, i64), last: Option<i64>) {
        let mut inner = crate::lock(&self.inner);
        if inner.open.as_ref().and_then(WindowState::open_bounds) != Some(bounds) {
            inner.open = Some(WindowState::open(bounds.0, bounds.1));
        }
        inner.last = last;
    }

    /// The window as an invocation of `positions` sees it (`None`: no window
    /// open). An invocation with no records is a closing one: final.
    pub fn context(&self, positions: &[i64]) -> Option<Window> {
        let inner = crate::lock(&self.inner);
        let open = inner.open.as_ref().filter(|w| !w.closed)?;
        let is_final = match positions.last() {
            None => true,
            Some(p) => inner.last == Some(*p),
        };
        Some(Window { start_ms: open.start_ms, end_ms: open.end_ms, state: open.state.clone(), is_final })
    }

    /// An invocation of `window` succeeded and returned `state`: kept, or,
    /// after a final invocation whose records all finished, the window
    /// closes. `finished_all`: none of its records is offered again.
    pub fn succeeded(&self, window: &Window, state: Option<Vec<u8>>, finished_all: bool) {
        let mut inner = crate::lock(&self.inner);
        let Some(open) = inner.open.as_mut().filter(|w| !w.closed) else { return };
        if (open.start_ms, open.end_ms) != (window.start_ms, window.end_ms) {
            return;
        }
        if window.is_final && finished_all {
            // Closed: the state goes, the bounds stay (late records count
            // in a later window).
            open.closed = true;
            open.state = None;
            inner.last = None;
        } else {
            open.state = state;
        }
    }
}

/// A state over [`MAX_STATE_BYTES`]: the invocation's error.
pub fn check_state(state: Option<&[u8]>) -> Result<(), String> {
    match state {
        Some(s) if s.len() > MAX_STATE_BYTES => Err(format!(
            "the handler returned a window state of {} bytes; at most {MAX_STATE_BYTES} (1 MiB) are kept",
            s.len()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn windows_align_on_the_timestamp_and_late_records_join_the_open_one() {
        assert_eq!(window_of(MIN, None, Some(125_000), 0), (120_000, 180_000));
        assert_eq!(window_of(MIN, None, Some(120_000), 0), (120_000, 180_000), "start is inclusive");
        assert_eq!(window_of(MIN, None, Some(179_999), 0), (120_000, 180_000));
        assert_eq!(window_of(MIN, None, Some(180_000), 0), (180_000, 240_000), "end is exclusive");
        let open = WindowState::open(120_000, 180_000);
        let open = Some(&open);
        assert_eq!(
            window_of(MIN, open, Some(30_000), 0),
            (120_000, 180_000),
            "late: counts in the open window"
        );
        assert_eq!(
            window_of(MIN, open, Some(250_000), 0),
            (240_000, 300_000),
            "past the end: its own window"
        );
        assert_eq!(window_of(MIN, open, None, 999_999), (120_000, 180_000), "no timestamp: the open window");
        let closed = WindowState { closed: true, ..WindowState::open(120_000, 180_000) };
        let closed = Some(&closed);
        assert_eq!(
            window_of(MIN, closed, Some(130_000), 0),
            (180_000, 240_000),
            "late after a close: the next one"
        );
        assert_eq!(window_of(MIN, closed, Some(300_000), 0), (300_000, 360_000));
        assert_eq!(window_of(MIN, closed, None, 0), (180_000, 240_000), "no timestamp: never the closed one");
        assert_eq!(
            window_of(MIN, None, None, 61_000),
            (60_000, 120_000),
            "no timestamp, none open: the clock's"
        );
        assert_eq!(window_of(MIN, None, Some(-1), 0), (-60_000, 0), "before 1970 still aligns");
    }

    #[test]
    fn state_threads_through_successes_and_a_final_invocation_closes_the_window() {
        let slot = Slot::default();
        slot.enter((0, MIN), None);
        let first = slot.context(&[0, 1]).unwrap();
        assert_eq!((first.state.clone(), first.is_final), (None, false));
        slot.succeeded(&first, Some(b"2".to_vec()), true);
        assert_eq!(
            slot.context(&[2]).unwrap().state.as_deref(),
            Some(&b"2"[..]),
            "the next invocation gets it"
        );
        // A record of the next window is known: the invocation holding
        // record 3 (the window's last) is final.
        slot.enter((0, MIN), Some(3));
        let not_last = slot.context(&[2]).unwrap();
        assert!(!not_last.is_final, "a bisected first half is not final");
        slot.succeeded(&not_last, Some(b"3".to_vec()), true);
        let last = slot.context(&[3]).unwrap();
        assert!(last.is_final);
        // Item failures in the final batch: the window stays open with the
        // state of what finished.
        slot.succeeded(&last, Some(b"3".to_vec()), false);
        assert_eq!(slot.snapshot().unwrap().state.as_deref(), Some(&b"3"[..]));
        slot.succeeded(&last, Some(b"4".to_vec()), true);
        let closed = WindowState { closed: true, ..WindowState::open(0, MIN) };
        assert_eq!(slot.snapshot(), Some(closed), "closed: its bounds checkpointed, its state gone");
        assert_eq!(slot.bounds(), None);
        assert!(slot.context(&[4]).is_none(), "no invocation runs in a closed window");
        slot.enter((MIN, 2 * MIN), None);
        assert_eq!(slot.context(&[4]).unwrap().state, None, "a new window starts with no state");
    }

    #[test]
    fn a_resumed_window_keeps_its_state_and_an_empty_invocation_is_final() {
        let open = WindowState { state: Some(b"7".to_vec()), ..WindowState::open(0, MIN) };
        let slot = Slot::resume(Some(open));
        slot.enter((0, MIN), None);
        assert_eq!(slot.context(&[9]).unwrap().state.as_deref(), Some(&b"7"[..]), "resumed, not reset");
        let closing = slot.context(&[]).unwrap();
        assert!(closing.is_final);
        // A late answer about another window changes nothing.
        slot.succeeded(&Window { start_ms: MIN, end_ms: 2 * MIN, ..closing.clone() }, None, true);
        assert!(slot.snapshot().is_some());
        slot.succeeded(&closing, None, true);
        assert!(slot.snapshot().is_some_and(|w| w.closed && w.state.is_none()));
    }

    #[test]
    fn a_state_over_one_mebibyte_is_refused_naming_both_sizes() {
        assert!(check_state(Some(&vec![0; MAX_STATE_BYTES])).is_ok());
        let e = check_state(Some(&vec![0; MAX_STATE_BYTES + 1])).unwrap_err();
        assert!(e.contains("1048577") && e.contains("1048576"), "{e}");
    }
}
