//! Input rules, one function each, shared by the configuration, the API,
//! the engine and the CLI: port numbers, prefixes without host bits, the
//! sources a grant may name, and bounded text. Each returns the message a
//! person can act on; callers wrap it in their own error type.

use std::{fmt::Write as _, net::IpAddr};

use ipnet::IpNet;

/// Broadest source prefix a grant may name, per family.
pub const BROADEST_PREFIX_V4: u8 = 16;
pub const BROADEST_PREFIX_V6: u8 = 48;

/// Text limits, in characters (README "Limits").
pub const MAX_REQUEST_ID_LEN: usize = 128;
pub const MAX_REQUESTER_LEN: usize = 256;
pub const MAX_JUSTIFICATION_LEN: usize = 1024;
pub const MAX_TICKET_LEN: usize = 256;
pub const MAX_REASON_LEN: usize = 512;
/// Connections a single grant may be limited to opening (`max_connections`;
/// 0 means no limit). A handful is the point of the limit; the bound keeps
/// the value a person can reason about.
pub const MAX_CONNECTIONS_PER_GRANT: u32 = 1000;
/// What an audit record keeps of a refused text field (the rest is cut).
pub const EXCERPT_LEN: usize = 64;

/// A port number in 1..=65535.
pub fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {value} is not in 1..=65535"))
}

/// A prefix whose host bits are clear.
pub fn prefix(net: IpNet) -> Result<IpNet, String> {
    if net.trunc() == net {
        Ok(net)
    } else {
        Err(format!(
            "{net} has host bits set (did you mean {}?)",
            net.trunc()
        ))
    }
}

/// An address (as a host prefix) or a prefix without host bits, from text.
pub fn address_or_prefix(text: &str) -> Result<IpNet, String> {
    if let Ok(address) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(address));
    }
    let net = text.parse::<IpNet>().map_err(|_| {
        format!(
            "\"{}\" is not an IPv4/IPv6 address or prefix",
            excerpt(text)
        )
    })?;
    prefix(net)
}

/// Ranges no packet can come from, or whose addresses stand for another
/// family: a grant for a source inside or around one of them makes no sense.
const SPECIAL_PURPOSE: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (unspecified)"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("ff00::/8", "multicast"),
];

/// `SPECIAL_PURPOSE` parsed once: every grant is checked against them.
static SPECIAL_PURPOSE_RANGES: std::sync::LazyLock<Vec<(IpNet, &str)>> =
    std::sync::LazyLock::new(|| {
        SPECIAL_PURPOSE
            .iter()
            .map(|(range, what)| (range.parse().expect("special-purpose ranges parse"), *what))
            .collect()
    });

/// A source a grant may open a port for: no broader than the per-family
/// bound, and clear of special-purpose ranges.
pub fn grantable_source(source: IpNet) -> Result<IpNet, String> {
    let broadest = match source {
        IpNet::V4(_) => BROADEST_PREFIX_V4,
        IpNet::V6(_) => BROADEST_PREFIX_V6,
    };
    if source.prefix_len() < broadest {
        return Err(format!(
            "source {source} is too broad: at most /{broadest} for this family"
        ));
    }
    for (range, what) in SPECIAL_PURPOSE_RANGES.iter() {
        if range.contains(&source) || source.contains(range) {
            return Err(format!(
                "source {source} overlaps {range}, a special-purpose range ({what}): no packet comes from it as such"
            ));
        }
    }
    Ok(source)
}

/// Bounded text: at most `max` characters, none of them control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.chars().count() > max {
        return Err(format!(
            "{field} is longer than {max} characters ({} characters)",
            value.chars().count()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

/// A grant's limit on connections opened under it: 0 (no limit) or
/// 1..=`MAX_CONNECTIONS_PER_GRANT`.
pub fn max_connections(value: u32) -> Result<u32, String> {
    if value > MAX_CONNECTIONS_PER_GRANT {
        return Err(format!(
            "max_connections {value} is above the limit of {MAX_CONNECTIONS_PER_GRANT} (0 means no limit)"
        ));
    }
    Ok(value)
}

/// A bounded, printable excerpt of text a caller sent, for records of
/// refusals: control characters escaped, at most `EXCERPT_LEN` characters
/// kept, and the full length said when cut.
pub fn excerpt(value: &str) -> String {
    let total = value.chars().count();
    let mut out: String = value
        .chars()
        .take(EXCERPT_LEN)
        .flat_map(char::escape_debug)
        .collect();
    if total > EXCERPT_LEN {
        let _ = write!(out, "… ({total} characters)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_bounded() {
        assert_eq!(max_connections(0), Ok(0));
        assert_eq!(max_connections(1), Ok(1));
        assert_eq!(
            max_connections(MAX_CONNECTIONS_PER_GRANT),
            Ok(MAX_CONNECTIONS_PER_GRANT)
        );
        assert!(max_connections(MAX_CONNECTIONS_PER_GRANT + 1).is_err());
        assert!(max_connections(u32::MAX).is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(port(22), Ok(22));
        for bad in [0, 65536, u32::MAX] {
            assert!(port(bad).unwrap_err().contains("1..=65535"));
        }
    }

    #[test]
    fn prefixes_and_addresses() {
        assert_eq!(
            address_or_prefix("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert!(
            address_or_prefix("192.0.2.7/24")
                .unwrap_err()
                .contains("did you mean 192.0.2.0/24?")
        );
        assert!(
            address_or_prefix("192.0.2.300")
                .unwrap_err()
                .contains("not an IPv4/IPv6")
        );
    }

    #[test]
    fn special_purpose_sources_are_refused() {
        for (source, needle) in [
            ("0.0.0.0/16", "unspecified"),
            ("0.0.0.0/32", "unspecified"),
            ("127.0.0.1/32", "loopback"),
            ("224.0.0.1/32", "multicast"),
            ("255.255.255.255/32", "broadcast"),
            ("::/48", "::/128"),
            ("::/128", "unspecified"),
            ("::ffff:0:0/96", "IPv4-mapped"),
            ("::ffff:192.0.2.7/128", "IPv4-mapped"),
            ("ff02::1/128", "multicast"),
        ] {
            let err = grantable_source(source.parse().unwrap()).unwrap_err();
            assert!(err.contains(needle), "{source}: {err}");
        }
        for fine in [
            "192.0.2.7/32",
            "198.51.100.0/24",
            "2001:db8::/48",
            "10.0.0.0/16",
        ] {
            grantable_source(fine.parse().unwrap()).unwrap();
        }
        assert!(
            grantable_source("10.0.0.0/8".parse().unwrap())
                .unwrap_err()
                .contains("too broad")
        );
    }

    #[test]
    fn text_bounds_and_excerpts() {
        text("reason", "fine", 10).unwrap();
        assert!(
            text("reason", "x".repeat(11).as_str(), 10)
                .unwrap_err()
                .contains("longer than 10")
        );
        assert!(
            text("reason", "a\u{1b}[2J", 10)
                .unwrap_err()
                .contains("control")
        );
        assert_eq!(excerpt("a\u{1b}[2J"), "a\\u{1b}[2J");
        let long = excerpt(&"y".repeat(1_000_000));
        assert!(long.ends_with("… (1000000 characters)"), "{long}");
        assert!(long.chars().count() < 100);
    }
}
