//! Timing rules the coordinator and the worker must compute alike: when a
//! worker fences itself, and how far ahead a leading coordinator may set
//! its deadline for that fence to hold through a takeover
//! (ARCHITECTURE.md, "Leader election").

use std::time::Duration;

/// How long after the last acknowledged heartbeat was sent a worker fences
/// itself: `session_timeout` less a margin of a fifth of it (at least two
/// heartbeats), and at least one heartbeat.
pub fn fence_after(session_timeout: Duration, heartbeat_interval: Duration) -> Duration {
    let margin = (session_timeout / 5).max(heartbeat_interval * 2);
    session_timeout.saturating_sub(margin).max(heartbeat_interval)
}

/// The longest `leadership_timeout` a configuration may have: half the
/// fence time. A dead leader's deadline passes at most one
/// `leadership_timeout` after its last renewal; a standby notices within a
/// quarter more, and workers then have the rest of the fence time (with
/// heartbeats every `heartbeat_interval`) to find it and be acknowledged
/// before any of them fences itself.
pub fn max_leadership_timeout(session_timeout: Duration, heartbeat_interval: Duration) -> Duration {
    fence_after(session_timeout, heartbeat_interval) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_fences_itself_well_inside_its_session_and_a_takeover_fits() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // The defaults: 10 s session, 1 s heartbeats: 2 s to stop handlers.
        assert_eq!(fence_after(s(10), s(1)), s(8));
        // The load tests' 3 s session with 300 ms heartbeats.
        assert_eq!(fence_after(s(3), ms(300)), ms(2400));
        // At least two heartbeat intervals of margin.
        assert_eq!(fence_after(s(2), ms(500)), s(1));
        // Never sooner than one heartbeat interval.
        assert_eq!(fence_after(ms(200), ms(100)), ms(100));
        // The default leadership_timeout (2 s) fits the default session.
        assert_eq!(max_leadership_timeout(s(10), s(1)), s(4));
    }
}
