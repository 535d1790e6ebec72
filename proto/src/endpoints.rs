//! Which coordinator a client talks to, when several run and one leads.
//!
//! Standby coordinators share the leader's store but serve nothing: they
//! answer every `WorkerApi` and `AdminApi` call with `UNAVAILABLE` and, when
//! they know it, the leader's URL in the [`LEADER_HEADER`] metadata entry.
//! A client (worker or CLI) keeps an [`Endpoints`]: the coordinator URLs it
//! was given, in order, and the one it currently calls. When a call fails
//! with a code [`should_try_another`] accepts, it reports
//! [`Endpoints::failed`] with the hint from [`leader_hint`], and its next
//! call goes to the leader named, or else to the next URL in order.
//!
//! Pure logic, no IO and no clock: the worker and the CLI own the channels
//! and decide when to call again.

use std::fmt;

use tonic::Code;

/// The metadata key under which a standby names the leader's URL
/// (e.g. `http://127.0.0.1:7001`) in its `UNAVAILABLE` answers.
pub const LEADER_HEADER: &str = "shardline-leader";

/// What a coordinator URL must look like, as errors say it.
const ALLOWED: &str = "a comma-separated list of distinct http:// or https:// URLs, at least one";

/// A coordinator list that cannot be used: which entry and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointsError {
    /// The offending entry as written (trimmed); empty for an empty entry.
    pub entry: String,
    /// What is wrong with it.
    pub problem: String,
}

impl EndpointsError {
    /// What is allowed, for errors that state it separately.
    pub const ALLOWED: &str = ALLOWED;
}

impl fmt::Display for EndpointsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coordinator URL `{}` {}; allowed: {ALLOWED}", self.entry, self.problem)
    }
}

impl std::error::Error for EndpointsError {}

/// The coordinator URLs a client knows, in order, and the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Never empty, no duplicates (compared without a trailing `/`).
    urls: Vec<String>,
    current: usize,
}

impl Endpoints {
    /// Parses `list`: comma-separated `http://` or `https://` URLs,
    /// whitespace around each trimmed, at least one, no duplicates. The
    /// first one is current.
    pub fn parse(list: &str) -> Result<Self, EndpointsError> {
        let mut urls: Vec<String> = Vec::new();
        for entry in list.split(',').map(str::trim) {
            let url = check(entry)?;
            if urls.iter().any(|u| same(u, &url)) {
                return Err(EndpointsError { entry: entry.to_owned(), problem: "is listed twice".into() });
            }
            urls.push(url);
        }
        // `split` yields at least one entry, and `check` refuses an empty
        // one, so `urls` is never empty here; said again for the reader.
        debug_assert!(!urls.is_empty());
        Ok(Self { urls, current: 0 })
    }

    /// The URL the next call goes to.
    pub fn current(&self) -> &str {
        &self.urls[self.current]
    }

    /// Every URL known, in order: those given, then leaders learned from
    /// hints that were not among them.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// A call to `url` failed in a way [`should_try_another`] accepts.
    /// With a `hint` (the leader's URL a standby named) other than `url`,
    /// the hint becomes current, added to the list if it is new: a single
    /// Service URL or one standby's URL is enough to find the leader.
    /// Otherwise the next URL in order (wrapping) becomes current.
    ///
    /// A report about a URL that is no longer current is ignored: when two
    /// calls in flight to the same coordinator both fail, only the first
    /// moves on, so no URL is skipped. A hint that is not an http(s) URL is
    /// ignored too (the list then simply moves on).
    ///
    /// Returns the new current URL if it changed.
    pub fn failed(&mut self, url: &str, hint: Option<&str>) -> Option<&str> {
        if !same(self.current(), url) {
            return None;
        }
        let before = self.current;
        let leader = hint.and_then(|h| check(h.trim()).ok()).filter(|h| !same(h, url));
        match leader {
            Some(leader) => match self.urls.iter().position(|u| same(u, &leader)) {
                Some(i) => self.current = i,
                None => {
                    self.urls.push(leader);
                    self.current = self.urls.len() - 1;
                }
            },
            None => self.current = (self.current + 1) % self.urls.len(),
        }
        (self.current != before).then(|| self.current())
    }

    /// Makes the first URL, from the current one on in order (wrapping),
    /// that `tried` refuses current; `None` when every one was tried. For a
    /// client that tries each coordinator once per request (the CLI) after
    /// a hint led it back to one it already tried.
    pub fn next_untried(&mut self, tried: impl Fn(&str) -> bool) -> Option<&str> {
        let n = self.urls.len();
        let i = (0..n).map(|k| (self.current + k) % n).find(|&i| !tried(&self.urls[i]))?;
        self.current = i;
        Some(self.current())
    }
}

/// Whether a call that failed with `code` should be tried on another
/// coordinator: the one called is a standby or shutting down
/// (`Unavailable`), unreachable (transport errors read as `Unavailable` or
/// `Unknown`), or frozen (`DeadlineExceeded`, and `Cancelled`, which is
/// how tonic reports a client-side timeout). Every other code is an answer
/// from a serving leader (unknown worker, bad request, bad token, ...) that
/// another coordinator would give too.
pub fn should_try_another(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
}

/// The leader's URL a standby named in `status`'s metadata, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// A failed call's status for people: its code, its message, and the
/// transport error under it (tonic's messages for those are terse, e.g.
/// `tcp connect error`, while the cause says `Connection refused`).
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// One entry, trimmed, checked.
fn check(entry: &str) -> Result<String, EndpointsError> {
    let bad = |problem: &str| EndpointsError { entry: entry.to_owned(), problem: problem.to_owned() };
    if entry.is_empty() {
        return Err(bad("is empty"));
    }
    let rest = entry.strip_prefix("http://").or_else(|| entry.strip_prefix("https://"));
    let Some(rest) = rest else { return Err(bad("is not an http:// or https:// URL")) };
    if rest.trim_end_matches('/').is_empty() {
        return Err(bad("names no host"));
    }
    if entry.chars().any(char::is_whitespace) {
        return Err(bad("contains whitespace"));
    }
    Ok(entry.to_owned())
}

/// The same coordinator: equal but for a trailing `/`.
fn same(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &str) -> Endpoints {
        Endpoints::parse(list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    #[test]
    fn parses_a_list_trimmed_in_order() {
        let e = parse(" http://c1:7000 ,https://c2:7000,\thttp://10.0.0.3:7400/ ");
        assert_eq!(e.urls(), ["http://c1:7000", "https://c2:7000", "http://10.0.0.3:7400/"]);
        assert_eq!(e.current(), "http://c1:7000");
        assert_eq!(parse("http://one:1").urls(), ["http://one:1"]);
    }

    #[test]
    fn refuses_bad_lists_naming_the_entry_and_what_is_allowed() {
        for (list, entry, problem) in [
            ("", "", "empty"),
            ("  ", "", "empty"),
            ("http://a:1,", "", "empty"),
            ("http://a:1,,http://b:1", "", "empty"),
            ("ftp://x", "ftp://x", "http://"),
            ("http://a:1, c2:7000", "c2:7000", "http://"),
            ("http://", "http://", "no host"),
            ("https:///", "https:///", "no host"),
            ("http://a b:1", "http://a b:1", "whitespace"),
            ("http://a:1,http://b:1,http://a:1/", "http://a:1/", "twice"),
        ] {
            let Err(e) = Endpoints::parse(list) else { panic!("`{list}` was accepted") };
            assert_eq!(e.entry, entry, "{list}");
            let text = e.to_string();
            assert!(text.contains(problem), "`{list}`: {text}");
            assert!(text.contains(&format!("`{entry}`")), "`{list}` names the entry: {text}");
            assert!(text.contains("allowed: a comma-separated list"), "`{list}`: {text}");
        }
    }

    #[test]
    fn a_failure_moves_to_the_next_url_wrapping() {
        let mut e = parse("http://a:1,http://b:1,http://c:1");
        assert_eq!(e.failed("http://a:1", None), Some("http://b:1"));
        assert_eq!(e.failed("http://b:1", None), Some("http://c:1"));
        assert_eq!(e.failed("http://c:1", None), Some("http://a:1"), "wraps to the first");
        // A single URL stays current: there is nowhere else to go.
        let mut one = parse("http://a:1");
        assert_eq!(one.failed("http://a:1", None), None);
        assert_eq!(one.current(), "http://a:1");
    }

    #[test]
    fn a_hint_names_the_next_url_and_is_learned_if_new() {
        let mut e = parse("http://a:1,http://b:1,http://c:1");
        // A standby at a names c: b is skipped.
        assert_eq!(e.failed("http://a:1", Some("http://c:1")), Some("http://c:1"));
        // c (now dead) names nobody: on in order, wrapping to a.
        assert_eq!(e.failed("http://c:1", None), Some("http://a:1"));
        // A leader outside the list (one Service URL was given) is added.
        let mut svc = parse("http://svc:7000");
        assert_eq!(
            svc.failed("http://svc:7000", Some(" http://10.0.0.7:7000 ")),
            Some("http://10.0.0.7:7000")
        );
        assert_eq!(svc.urls(), ["http://svc:7000", "http://10.0.0.7:7000"]);
        // The learned leader dies: back to the Service, not re-added.
        assert_eq!(svc.failed("http://10.0.0.7:7000", None), Some("http://svc:7000"));
        assert_eq!(
            svc.failed("http://svc:7000", Some("http://10.0.0.7:7000/")),
            Some("http://10.0.0.7:7000")
        );
        assert_eq!(svc.urls().len(), 2, "a trailing / names the same coordinator");
    }

    #[test]
    fn a_hint_naming_the_failed_url_or_no_url_is_ignored() {
        let mut e = parse("http://a:1,http://b:1");
        // A coordinator shutting down that still names itself as leader.
        assert_eq!(e.failed("http://a:1", Some("http://a:1/")), Some("http://b:1"));
        for junk in ["", "  ", "a:1", "ftp://c"] {
            let from = e.current().to_owned();
            let to = if from == "http://a:1" { "http://b:1" } else { "http://a:1" };
            assert_eq!(e.failed(&from, Some(junk)), Some(to), "hint `{junk}`");
            assert_eq!(e.urls().len(), 2, "hint `{junk}` is not learned");
        }
    }

    #[test]
    fn a_failure_of_a_url_no_longer_current_is_ignored() {
        let mut e = parse("http://a:1,http://b:1,http://c:1");
        // Two calls in flight to a fail one after the other: the second
        // report must not skip b.
        assert_eq!(e.failed("http://a:1", None), Some("http://b:1"));
        assert_eq!(e.failed("http://a:1", None), None);
        assert_eq!(e.current(), "http://b:1");
        // Even with a hint: a late answer from a must not move us off b.
        assert_eq!(e.failed("http://a:1", Some("http://c:1")), None);
        assert_eq!(e.current(), "http://b:1");
        // A URL never heard of changes nothing either.
        assert_eq!(e.failed("http://z:1", Some("http://c:1")), None);
        assert_eq!(e.urls().len(), 3);
    }

    #[test]
    fn next_untried_walks_on_from_the_current_url() {
        let mut e = parse("http://a:1,http://b:1,http://c:1");
        let tried = |set: &'static [&'static str]| move |u: &str| set.contains(&u);
        assert_eq!(e.next_untried(tried(&[])), Some("http://a:1"));
        // b named a, which was tried: the next untried after a is c.
        assert_eq!(e.next_untried(tried(&["http://a:1", "http://b:1"])), Some("http://c:1"));
        assert_eq!(e.next_untried(tried(&["http://a:1", "http://b:1", "http://c:1"])), None);
        assert_eq!(e.current(), "http://c:1", "unchanged when all were tried");
    }

    #[test]
    fn only_signs_of_a_wrong_or_absent_coordinator_move_on() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Unknown, Code::Cancelled] {
            assert!(should_try_another(code), "{code:?}");
        }
        for code in [
            Code::Ok,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
        ] {
            assert!(!should_try_another(code), "{code:?}");
        }
    }

    #[test]
    fn the_hint_is_read_from_the_status_metadata() {
        let mut status =
            tonic::Status::unavailable("this coordinator is a standby; the leader is http://b:1");
        assert_eq!(leader_hint(&status), None);
        let value = "http://b:1".parse().unwrap_or_else(|e| panic!("{e}"));
        status.metadata_mut().insert(LEADER_HEADER, value);
        assert_eq!(leader_hint(&status), Some("http://b:1"));
        let blank = tonic::Status::unavailable("no leader is known yet");
        assert_eq!(leader_hint(&blank), None);
        assert_eq!(describe(&blank), "Unavailable: no leader is known yet");
    }
}
