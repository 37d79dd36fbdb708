//! Reading an agent's metrics as a scraper does: `GET /metrics` on its
//! listener inside the agent's namespace, and one sample's value.

use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use crate::netns::Netns;

/// GET /metrics at `listen` from inside `ns` (the listener is on its
/// loopback); checks the status line and content type.
pub fn scrape(ns: &Netns, listen: &str) -> String {
    let text = ns
        .run(|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(listen)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .expect("scrape the metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    text
}

/// The value of the sample `name{labels}` (labels as printed), if present
/// and a whole number.
pub fn try_sample(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The value of the sample `series`; panics naming it if absent.
pub fn sample(text: &str, series: &str) -> u64 {
    try_sample(text, series)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}
