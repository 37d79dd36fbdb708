//! Denied packets as the audit log records them: per interval, one summary
//! per protected (port, protocol) that saw drops, and one of the totals.
//!
//! The exact numbers come from the kernel's per-CPU counters (their growth
//! since the last stored summary), so the summaries add up to what the
//! kernel dropped; who was denied comes from the deny events, a sample the
//! program sends under a per-CPU budget. A flood therefore costs at most
//! (protected ports + 1) records per interval and a bounded sample in
//! memory. The counters as of the last stored summaries are stored with
//! them: a summary that cannot be stored is not lost, the next one covers
//! its interval too, and a restarted agent carries on where it stopped.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    audit::{AGENT, Event, Kind},
    enforce::{Counters, DeniedPacket, GrantFlowCounts},
    net::Protocol,
};
use jit_gate_common::verdict::Reason;

/// Sources remembered per port and interval; samples from others are
/// counted, not kept.
const MAX_SOURCES: usize = 4_096;
/// Sources named in a summary.
const TOP_SOURCES: usize = 10;
/// Grants named in a summary with the connections their limits refused.
const TOP_GRANTS: usize = 16;
/// A summary that could not be stored is tried again this soon.
const RETRY: Duration = Duration::from_secs(5);

/// The kernel counters the summaries are made of, as of some instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CounterSnapshot {
    /// Packets dropped, by reason name.
    pub dropped_by_reason: BTreeMap<String, u64>,
    /// Per protected port ("22/tcp"): packets dropped, and of them new
    /// connections refused.
    pub by_port: BTreeMap<String, PortDrops>,
    /// New connections refused under each grant.
    pub refused_by_grant: BTreeMap<u64, u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PortDrops {
    pub dropped: u64,
    pub refused: u64,
}

impl CounterSnapshot {
    pub(super) fn new(counters: &Counters, grants: &BTreeMap<u64, GrantFlowCounts>) -> Self {
        CounterSnapshot {
            dropped_by_reason: counters
                .by_reason
                .iter()
                .filter(|(reason, _)| !reason.is_pass())
                .map(|(reason, n)| (reason.name().to_owned(), *n))
                .collect(),
            by_port: counters
                .by_port
                .iter()
                .map(|((protocol, port), c)| {
                    let drops = PortDrops {
                        dropped: c.dropped,
                        refused: c.refused,
                    };
                    (port_name(*protocol, *port), drops)
                })
                .collect(),
            refused_by_grant: grants
                .iter()
                .filter(|(_, c)| c.refused > 0)
                .map(|(id, c)| (*id, c.refused))
                .collect(),
        }
    }
}

fn port_name(protocol: Protocol, port: u16) -> String {
    format!("{port}/{protocol}")
}

/// Growth of a counter since `before`; a counter below it was reset (the
/// kernel state was rebuilt) and counts from zero.
fn growth(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// A protected (protocol, port), or `None` for drops at no protected port.
type PortKey = Option<(Protocol, u16)>;
/// (grant id, connections refused).
type Refusals = Vec<(u64, u64)>;

/// The deny events of one port (or of no protected port) in an interval.
#[derive(Default)]
struct Sample {
    events: u64,
    by_source: HashMap<IpAddr, u64>,
    /// Events from sources past `MAX_SOURCES`.
    untracked: u64,
    by_reason: BTreeMap<Reason, u64>,
}

impl Sample {
    fn add(&mut self, denied: &DeniedPacket) {
        self.events += 1;
        *self.by_reason.entry(denied.reason).or_default() += 1;
        let known =
            self.by_source.len() < MAX_SOURCES || self.by_source.contains_key(&denied.source);
        if known {
            *self.by_source.entry(denied.source).or_default() += 1;
        } else {
            self.untracked += 1;
        }
    }

    /// Estimated distinct sources among `total` packets: the bias-corrected
    /// Chao1 estimator over the sampled sources (those seen once and twice
    /// tell how many were never sampled), each untracked sample counted as
    /// a new source, at most `total`.
    fn distinct_estimate(&self, total: u64) -> u64 {
        let seen = |times| self.by_source.values().filter(|n| **n == times).count() as u64;
        let (f1, f2) = (seen(1), seen(2));
        let estimate = self.by_source.len() as u64
            + f1 * f1.saturating_sub(1) / (2 * (f2 + 1))
            + self.untracked;
        estimate.min(total).max(self.by_source.len().min(1) as u64)
    }

    fn top_sources(&self) -> Vec<serde_json::Value> {
        let mut sources: Vec<(&IpAddr, &u64)> = self.by_source.iter().collect();
        sources.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        sources
            .into_iter()
            .take(TOP_SOURCES)
            .map(|(source, n)| serde_json::json!({ "source": source.to_string(), "sampled": n }))
            .collect()
    }

    fn details(&self, total: u64) -> serde_json::Value {
        let by_reason: BTreeMap<&str, u64> =
            self.by_reason.iter().map(|(r, n)| (r.name(), *n)).collect();
        serde_json::json!({
            "sampled": self.events,
            "sampled_by_reason": by_reason,
            "distinct_sources_sampled": self.by_source.len() as u64 + self.untracked,
            "distinct_sources_estimate": self.distinct_estimate(total),
            "top_sources": self.top_sources(),
        })
    }
}

/// The summaries of the interval being collected.
pub(super) struct Denials {
    interval: Duration,
    from: SystemTime,
    due: Instant,
    /// The counters as of the last stored summaries.
    baseline: CounterSnapshot,
    /// Samples per protected (protocol, port); `None`: no protected port.
    samples: BTreeMap<PortKey, Sample>,
}

/// Summaries ready to store, with the counters they bring the baseline to.
pub(super) struct Summaries {
    pub events: Vec<Event>,
    pub counters: CounterSnapshot,
    to: SystemTime,
}

impl Denials {
    /// Starts collecting, from the counters stored with the last summaries
    /// (none: from `current`, what the kernel counted before is not ours
    /// to summarize).
    pub(super) fn resume(
        interval: Duration,
        stored: Option<CounterSnapshot>,
        current: CounterSnapshot,
    ) -> Self {
        Denials {
            interval,
            from: SystemTime::now(),
            due: Instant::now() + interval,
            baseline: stored.unwrap_or(current),
            samples: BTreeMap::new(),
        }
    }

    /// Adds a deny event to the sample of its port.
    pub(super) fn sample(&mut self, denied: &DeniedPacket, protected: bool) {
        let port = denied
            .protocol
            .filter(|_| protected)
            .map(|protocol| (protocol, denied.port));
        self.samples.entry(port).or_default().add(denied);
    }

    /// Whether the interval is over (or a failed store is due again).
    pub(super) fn due(&self, now: Instant) -> bool {
        now >= self.due
    }

    /// The summaries of the interval up to now, from the counters `current`
    /// and the grant each refusing grant belongs to.
    pub(super) fn summarize(
        &self,
        current: CounterSnapshot,
        port_of_grant: impl Fn(u64) -> Option<(Protocol, u16)>,
    ) -> Summaries {
        let to = SystemTime::now();
        let seconds = to.duration_since(self.from).unwrap_or_default().as_secs();
        let window = serde_json::json!({
            "from": crate::time::to_ms(self.from),
            "to": crate::time::to_ms(to),
        });
        let mut refused_by_port: BTreeMap<PortKey, Refusals> = BTreeMap::new();
        for (grant, refused) in &current.refused_by_grant {
            let before = self
                .baseline
                .refused_by_grant
                .get(grant)
                .copied()
                .unwrap_or(0);
            let refused = growth(*refused, before);
            if refused > 0 {
                refused_by_port
                    .entry(port_of_grant(*grant))
                    .or_default()
                    .push((*grant, refused));
            }
        }
        let empty = Sample::default();
        let mut events = Vec::new();
        let mut dropped_at_ports = 0;
        for (name, drops) in &current.by_port {
            let before = self.baseline.by_port.get(name).copied().unwrap_or_default();
            let dropped = growth(drops.dropped, before.dropped);
            if dropped == 0 {
                continue;
            }
            dropped_at_ports += dropped;
            let refused = growth(drops.refused, before.refused);
            let key = parse_port_name(name);
            let sample = self.samples.get(&key).unwrap_or(&empty);
            let mut details = sample.details(dropped);
            details["window"] = window.clone();
            details["port"] = name.as_str().into();
            details["dropped"] = dropped.into();
            details["refused_connections"] = refused.into();
            details["refused_by_grant"] = top_grants(refused_by_port.remove(&key));
            let mut message = format!(
                "denied {dropped} packets to {name} in {seconds}s, about {} sources",
                details["distinct_sources_estimate"]
            );
            if refused > 0 {
                let _ = write!(message, "; {refused} new connections refused by limits");
            }
            events.push(Event::new(Kind::AccessDenied, AGENT, 0, message).with_details(details));
        }
        let by_reason: BTreeMap<&str, u64> = current
            .dropped_by_reason
            .iter()
            .map(|(reason, n)| {
                let before = self
                    .baseline
                    .dropped_by_reason
                    .get(reason)
                    .copied()
                    .unwrap_or(0);
                (reason.as_str(), growth(*n, before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let total: u64 = by_reason.values().sum();
        if total > 0 {
            let elsewhere = total.saturating_sub(dropped_at_ports);
            let sample = self.samples.get(&None).unwrap_or(&empty);
            let mut details = sample.details(elsewhere);
            details["window"] = window;
            details["dropped"] = total.into();
            details["dropped_by_reason"] = serde_json::json!(by_reason);
            details["dropped_at_protected_ports"] = dropped_at_ports.into();
            details["dropped_elsewhere"] = elsewhere.into();
            let unattributed: Vec<(u64, u64)> = refused_by_port.into_values().flatten().collect();
            details["refused_by_grant"] = top_grants(Some(unattributed));
            events.push(
                Event::new(
                    Kind::AccessDenied,
                    AGENT,
                    0,
                    format!(
                        "denied {total} packets in {seconds}s: {dropped_at_ports} to protected \
                         ports, {elsewhere} that could not be attributed to one"
                    ),
                )
                .with_details(details),
            );
        }
        Summaries {
            events,
            counters: current,
            to,
        }
    }

    /// The summaries were stored: the next interval starts.
    pub(super) fn stored(&mut self, summaries: Summaries) {
        self.baseline = summaries.counters;
        self.from = summaries.to;
        self.due = Instant::now() + self.interval;
        self.samples.clear();
    }

    /// The summaries could not be stored: they are made again, covering
    /// this interval too, soon.
    pub(super) fn not_stored(&mut self) {
        self.due = Instant::now() + RETRY.min(self.interval);
    }
}

/// "22/tcp" back to its key.
fn parse_port_name(name: &str) -> PortKey {
    let (port, protocol) = name.split_once('/')?;
    Some((protocol.parse().ok()?, port.parse().ok()?))
}

fn top_grants(refused: Option<Refusals>) -> serde_json::Value {
    let mut refused = refused.unwrap_or_default();
    refused.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<serde_json::Value> = refused
        .iter()
        .take(TOP_GRANTS)
        .map(|(grant, n)| serde_json::json!({ "grant_id": grant, "refused": n }))
        .collect();
    let others: u64 = refused.iter().skip(TOP_GRANTS).map(|(_, n)| n).sum();
    serde_json::json!({ "grants": shown, "other_grants_refused": others })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(source: &str, reason: Reason) -> DeniedPacket {
        DeniedPacket {
            source: source.parse().unwrap(),
            protocol: Some(Protocol::Tcp),
            port: 22,
            reason,
            grant_id: None,
        }
    }

    fn snapshot(
        dropped_22: u64,
        refused_22: u64,
        no_grant: u64,
        malformed: u64,
    ) -> CounterSnapshot {
        CounterSnapshot {
            dropped_by_reason: [
                ("drop_no_grant".to_owned(), no_grant),
                ("drop_flow_quota".to_owned(), refused_22),
                ("drop_malformed_ip".to_owned(), malformed),
            ]
            .into_iter()
            .collect(),
            by_port: [(
                "22/tcp".to_owned(),
                PortDrops {
                    dropped: dropped_22,
                    refused: refused_22,
                },
            )]
            .into_iter()
            .collect(),
            refused_by_grant: [(7, refused_22)].into_iter().collect(),
        }
    }

    fn ssh(_grant: u64) -> Option<(Protocol, u16)> {
        Some((Protocol::Tcp, 22))
    }

    #[test]
    fn summaries_add_up_to_the_counters_growth() {
        let mut denials = Denials::resume(Duration::from_mins(1), None, snapshot(10, 1, 9, 0));
        for i in 0..50 {
            denials.sample(&denied(&format!("10.0.0.{i}"), Reason::DropNoGrant), true);
        }
        let summaries = denials.summarize(snapshot(1_010, 6, 1_004, 7), ssh);
        assert_eq!(summaries.events.len(), 2, "one for 22/tcp, one of totals");
        let port = &summaries.events[0].details;
        assert_eq!(port["dropped"], 1_000);
        assert_eq!(port["refused_connections"], 5);
        assert_eq!(port["refused_by_grant"]["grants"][0]["refused"], 5);
        assert_eq!(port["sampled"], 50);
        // 50 sources seen once each: many more were never sampled.
        let estimate = port["distinct_sources_estimate"].as_u64().unwrap();
        assert!(estimate > 50 && estimate <= 1_000, "{estimate}");
        let totals = &summaries.events[1].details;
        assert_eq!(totals["dropped"], 1_007);
        assert_eq!(totals["dropped_at_protected_ports"], 1_000);
        assert_eq!(totals["dropped_elsewhere"], 7);
        denials.stored(summaries);
        assert!(
            denials
                .summarize(snapshot(1_010, 6, 1_004, 7), ssh)
                .events
                .is_empty(),
            "nothing new, nothing recorded"
        );
    }

    #[test]
    fn a_summary_not_stored_is_covered_by_the_next() {
        let mut denials = Denials::resume(Duration::from_mins(1), None, snapshot(0, 0, 0, 0));
        let first = denials.summarize(snapshot(100, 0, 100, 0), ssh);
        assert_eq!(first.events[0].details["dropped"], 100);
        denials.not_stored();
        let second = denials.summarize(snapshot(250, 0, 250, 0), ssh);
        assert_eq!(second.events[0].details["dropped"], 250);
        denials.stored(second);
        let third = denials.summarize(snapshot(260, 0, 260, 0), ssh);
        assert_eq!(third.events[0].details["dropped"], 10);
    }

    #[test]
    fn one_source_is_estimated_as_one_and_memory_is_bounded() {
        let mut sample = Sample::default();
        for _ in 0..1_000 {
            sample.add(&denied("192.0.2.7", Reason::DropNoGrant));
        }
        assert_eq!(sample.distinct_estimate(1_000_000), 1);
        let mut flood = Sample::default();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let source = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            flood.add(&denied(&source, Reason::DropNoGrant));
        }
        assert_eq!(flood.by_source.len(), MAX_SOURCES);
        assert_eq!(flood.untracked, 100);
        assert_eq!(flood.distinct_estimate(2_000), 2_000, "capped at the total");
    }

    #[test]
    fn a_reset_counter_counts_from_zero() {
        assert_eq!(growth(5, 100), 5);
        assert_eq!(growth(105, 100), 5);
    }
}
