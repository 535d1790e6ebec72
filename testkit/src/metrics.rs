//! Prometheus scrapes. A series that is absent is an error naming it: a
//! renamed or never-emitted series must fail whoever reads it, not read
//! as 0. The `_or_zero` readers are for the one case where absent means
//! 0: a counter the binary creates at its first event, read before that
//! event may have happened.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one scrape may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` over plain HTTP/1.0 (one GET does not justify an HTTP
/// client); the body of a 200 answer.
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    let (status, body) = http_status(addr, path).await?;
    if status != 200 {
        bail!("GET {path} from {addr} answered {status}: {}", body.trim_end());
    }
    Ok(body)
}

/// `GET path`: the status code and the body, whatever the status (a
/// probe's 503 says why in its body).
pub async fn http_status(addr: &str, path: &str) -> Result<(u16, String)> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(TIMEOUT, fetch)
        .await
        .with_context(|| format!("{addr} did not answer GET {path} within {TIMEOUT:?}"))?
        .with_context(|| format!("GET {path} from {addr}"))?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response without a body")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path} from {addr}: no status in `{status_line}`"))?;
    Ok((status, body.to_owned()))
}

/// Reads the Prometheus endpoint at `addr`.
pub async fn scrape(addr: &str) -> Result<Metrics> {
    Ok(Metrics::parse(&http_get(addr, "/metrics").await?))
}

/// Samples by series, `name{labels}` as printed.
#[derive(Debug, Default, Clone)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                Some((key.trim().to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        Self(samples)
    }

    /// One series' value (`name` or `name{labels}` exactly as printed).
    pub fn get(&self, series: &str) -> Result<f64> {
        match self.0.get(series) {
            Some(value) => Ok(*value),
            None => bail!("no series {series} in the metrics; {}", self.near(series)),
        }
    }

    /// One series' value, 0 when absent: only for a counter created at its
    /// first event, read where that event may not have happened yet.
    pub fn get_or_zero(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over every label set of `name`; an error when there is none.
    pub fn sum(&self, name: &str) -> Result<f64> {
        let mut samples = self.of(name).peekable();
        if samples.peek().is_none() {
            bail!("no series named {name} in the metrics; {}", self.near(name));
        }
        Ok(samples.map(|(_, value)| value).sum())
    }

    /// [`Metrics::sum`], 0 when absent: as [`Metrics::get_or_zero`].
    pub fn sum_or_zero(&self, name: &str) -> f64 {
        self.of(name).map(|(_, value)| value).sum()
    }

    /// Every sample of `name` (any label set) with its full series.
    pub fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .iter()
            .filter(move |(key, _)| {
                key.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(key, value)| (key.as_str(), *value))
    }

    /// What there is instead of a missing series, for the error.
    fn near(&self, series: &str) -> String {
        let name = series.split('{').next().unwrap_or(series);
        let same: Vec<&str> = self.of(name).map(|(key, _)| key).collect();
        if same.is_empty() {
            format!("{} series, none named {name}", self.0.len())
        } else {
            format!("{name} has {}", same.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        Metrics::parse(
            "# TYPE x counter\nshardline_checkpoints_total{result=\"accepted\"} 12\nflush_count 3\n\
             flush{quantile=\"0.99\"} 0.5\nrecords{h=\"a\"} 2\nrecords{h=\"b\"} 3\nrecords_other 100\n",
        )
    }

    #[test]
    fn series_are_keyed_by_name_and_labels() -> Result<()> {
        let m = sample();
        assert_eq!(m.get("shardline_checkpoints_total{result=\"accepted\"}")?, 12.0);
        assert_eq!(m.get("flush{quantile=\"0.99\"}")?, 0.5);
        assert_eq!(m.sum("records")?, 5.0, "records_other is another name");
        Ok(())
    }

    #[test]
    fn a_missing_series_is_an_error_naming_it_and_what_there_is() {
        let m = sample();
        let e = m.get("shardline_checkpoints_total{result=\"refused\"}").map_err(|e| e.to_string());
        let e = e.err().unwrap_or_default();
        assert!(e.contains("result=\"refused\""), "names the series: {e}");
        assert!(e.contains("result=\"accepted\""), "lists the label sets there are: {e}");
        assert!(m.sum("shardline_renamed_total").is_err());
        assert!(m.get("records").is_err(), "a name with labels is no series of its own");
    }

    #[test]
    fn only_the_explicit_readers_take_absent_as_zero() {
        let m = sample();
        assert_eq!(m.get_or_zero("shardline_redeliveries_total"), 0.0);
        assert_eq!(m.sum_or_zero("absent"), 0.0);
        assert_eq!(m.sum_or_zero("records"), 5.0);
    }
}
