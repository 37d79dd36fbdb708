//! Which interfaces the XDP gate covers, and keeping it on them: every
//! interface of the namespace is classified against the configuration
//! (covered, excluded, not listed, loopback, not Ethernet), the gate is
//! attached to covered ones as they appear, and each check verifies with
//! the kernel (rtnetlink) that every covered interface still runs the
//! gate's program, attaching it again (removing a foreign program first)
//! where it does not. What it finds is each interface's status.

use std::{collections::BTreeMap, time::SystemTime};

use crate::{
    config::{Config, Coverage},
    enforce::{
        links::{self, Link, XdpSlot},
        xdp::{AttachMode, Attachment, XdpGate},
    },
};

/// How an interface is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceMode {
    XdpNative,
    XdpGeneric,
    NftablesOnly,
    Unsupported,
    /// Neither XDP nor nftables gates it.
    Uncovered,
}

impl InterfaceMode {
    fn is_xdp(self) -> bool {
        matches!(self, InterfaceMode::XdpNative | InterfaceMode::XdpGeneric)
    }
}

impl InterfaceStatus {
    /// Whether it is a path into the host that nothing gates, or one where
    /// the gate is not what it should be.
    pub fn is_sound(&self) -> bool {
        self.problem.is_none() && (self.mode != InterfaceMode::Uncovered || self.loopback)
    }
}

/// A repair and when it was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    pub at: SystemTime,
    pub what: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceStatus {
    pub name: String,
    /// The driver kind (`veth`, `vxlan`, …), if any.
    pub kind: String,
    /// Loopback carries only this host's own traffic: not covered by
    /// default, and no path around the gate.
    pub loopback: bool,
    pub mode: InterfaceMode,
    /// Why the mode is not XDP; empty otherwise.
    pub reason: String,
    /// What is wrong with the gate on it right now; `None`: nothing.
    pub problem: Option<String>,
    /// The last repair of the gate on it.
    pub last_repair: Option<Repair>,
}

/// What one pass over the interfaces did.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Drift found and repaired, one line each.
    pub repairs: Vec<String>,
    /// Some covered interface can only be gated by nftables.
    pub needs_nftables: bool,
}

/// The interfaces as last checked.
#[derive(Debug, Default)]
pub(super) struct Interfaces {
    statuses: BTreeMap<String, InterfaceStatus>,
}

impl Interfaces {
    /// Classifies every interface, attaches XDP where it should run and is
    /// missing, lets go of interfaces that are gone or no longer covered.
    pub(super) fn scan(
        &mut self,
        config: &Config,
        mut xdp: Option<&mut XdpGate>,
        xdp_unavailable: Option<&str>,
    ) -> anyhow::Result<Scan> {
        let listed = links::list()?;
        let mut scan = Scan::default();
        let mut next = BTreeMap::new();
        for link in &listed {
            let previous = self.statuses.remove(&link.name);
            let status = match xdp.as_deref_mut() {
                Some(gate) if config.mode.uses_xdp() => {
                    gate_link(config, gate, link, previous.as_ref(), &mut scan)
                }
                _ if !config.mode.uses_xdp() => status(
                    link,
                    InterfaceMode::NftablesOnly,
                    "configured mode is nftables".into(),
                ),
                _ => match config.coverage(&link.name, link.loopback) {
                    Coverage::Covered => {
                        scan.needs_nftables = true;
                        let why = xdp_unavailable.unwrap_or_default();
                        status(
                            link,
                            InterfaceMode::NftablesOnly,
                            format!("XDP unavailable: {why}"),
                        )
                    }
                    other => status(
                        link,
                        InterfaceMode::Uncovered,
                        uncovered_reason(other).into(),
                    ),
                },
            };
            if previous.as_ref().is_none_or(|p| p.mode != status.mode) {
                announce(&status);
            }
            next.insert(link.name.clone(), status);
        }
        if let Some(gate) = xdp {
            let gone: Vec<String> = gate
                .held()
                .filter(|(name, _)| !next.contains_key(*name))
                .map(|(name, _)| name.to_owned())
                .collect();
            for name in gone {
                tracing::info!("interface {name} is gone; its XDP link released");
                gate.detach(&name)?;
            }
        }
        self.statuses = next;
        Ok(scan)
    }

    /// The statuses as last checked; interfaces XDP leaves alone count as
    /// enforced by nftables if it runs.
    pub(super) fn statuses(&self, nftables_active: bool) -> Vec<InterfaceStatus> {
        self.statuses
            .values()
            .map(|s| match s.mode {
                InterfaceMode::Uncovered if nftables_active => InterfaceStatus {
                    mode: InterfaceMode::NftablesOnly,
                    ..s.clone()
                },
                _ => s.clone(),
            })
            .collect()
    }

    /// The statuses with what is wrong right now, read from the kernel
    /// without repairing anything (the next scan repairs).
    pub(super) fn check(
        &self,
        config: &Config,
        xdp: Option<&XdpGate>,
        nftables_active: bool,
    ) -> anyhow::Result<Vec<InterfaceStatus>> {
        let mut statuses = self.statuses(nftables_active);
        let Some(gate) = xdp.filter(|_| config.mode.uses_xdp()) else {
            return Ok(statuses);
        };
        let ours = gate.program_id()?;
        let held: BTreeMap<&str, u32> = gate.held().collect();
        let listed: BTreeMap<String, Link> = links::list()?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        for status in &mut statuses {
            status.problem = match listed.get(&status.name) {
                None => Some("the interface is gone".into()),
                Some(link) if status.mode.is_xdp() => {
                    drift(held.get(status.name.as_str()).copied(), link, ours)
                }
                Some(_) => None,
            };
        }
        for (name, link) in &listed {
            let known = statuses.iter().any(|s| &s.name == name);
            if !known && config.coverage(name, link.loopback) == Coverage::Covered {
                let mut new = status(link, InterfaceMode::Uncovered, "new interface".into());
                new.problem = Some("new interface, not yet gated".into());
                statuses.push(new);
            }
        }
        Ok(statuses)
    }
}

fn status(link: &Link, mode: InterfaceMode, reason: String) -> InterfaceStatus {
    InterfaceStatus {
        name: link.name.clone(),
        kind: link.kind.clone().unwrap_or_default(),
        loopback: link.loopback,
        mode,
        reason,
        problem: None,
        last_repair: None,
    }
}

fn announce(status: &InterfaceStatus) {
    let name = &status.name;
    match status.mode {
        InterfaceMode::XdpNative | InterfaceMode::XdpGeneric => {
            tracing::info!("XDP gates interface {name} ({:?})", status.mode);
        }
        InterfaceMode::Uncovered => tracing::warn!(
            "interface {name} is not covered by XDP ({}); only nftables, if it runs, gates it",
            status.reason
        ),
        InterfaceMode::NftablesOnly | InterfaceMode::Unsupported => {
            tracing::warn!("interface {name}: nftables only ({})", status.reason);
        }
    }
}

/// What is wrong with the gate on `link`, if anything: the gate should run
/// there through the link held on interface index `held`.
fn drift(held: Option<u32>, link: &Link, ours: u32) -> Option<String> {
    match held {
        None => Some("no XDP link held for it".into()),
        Some(index) if index != link.index => Some(format!(
            "the interface was re-created (index {index}, now {})",
            link.index
        )),
        Some(_) if link.xdp.slot_of(ours).is_some() => None,
        Some(_) => Some(match link.xdp.foreign(ours).first() {
            Some((slot, id)) => {
                format!("XDP program {id} runs in {slot:?} mode instead of the gate's")
            }
            None => "no XDP program runs on it (the gate's link was detached)".into(),
        }),
    }
}

/// The status of a link under an XDP-using mode, attaching the gate where
/// it should run and does not.
fn gate_link(
    config: &Config,
    gate: &mut XdpGate,
    link: &Link,
    previous: Option<&InterfaceStatus>,
    scan: &mut Scan,
) -> InterfaceStatus {
    let name = &link.name;
    let uncovered = |reason: &str| status(link, InterfaceMode::Uncovered, reason.to_owned());
    let held = gate.held().find(|(n, _)| n == name).map(|(_, index)| index);
    match config.coverage(name, link.loopback) {
        Coverage::Covered => {}
        other => {
            if held.is_some()
                && let Err(e) = gate.detach(name)
            {
                tracing::warn!("detaching from {name}: {e}");
            }
            return uncovered(uncovered_reason(other));
        }
    }
    if !link.ethernet {
        scan.needs_nftables = true;
        return status(
            link,
            InterfaceMode::NftablesOnly,
            "not an Ethernet device: the XDP program reads Ethernet frames".into(),
        );
    }
    let ours = match gate.program_id() {
        Ok(id) => id,
        Err(e) => return attach_failed(link, &e.to_string(), scan),
    };
    let mut last_repair = previous.and_then(|p| p.last_repair.clone());
    let found = drift(held, link, ours);
    if let (None, Some(slot)) = (&found, link.xdp.slot_of(ours)) {
        let mode = match slot {
            XdpSlot::Driver => InterfaceMode::XdpNative,
            XdpSlot::Generic => InterfaceMode::XdpGeneric,
        };
        return InterfaceStatus {
            last_repair,
            ..xdp_status(link, mode)
        };
    }
    if held.is_some()
        && let Err(e) = gate.detach(name)
    {
        tracing::warn!("releasing the XDP link of {name}: {e}");
    }
    let attached = gate.attach(name).or_else(|first| {
        // A program attached without a link holds the hook: remove it.
        let foreign = link.xdp.foreign(ours);
        if foreign.is_empty() {
            return Err(first.to_string());
        }
        for (slot, id) in foreign {
            tracing::warn!("removing XDP program {id} ({slot:?} mode) from {name}");
            links::detach_foreign(link.index, slot).map_err(|e| e.to_string())?;
        }
        gate.attach(name).map_err(|e| e.to_string())
    });
    let mode = match attached {
        Ok(Attachment::Attached(AttachMode::Native)) => InterfaceMode::XdpNative,
        Ok(Attachment::Attached(AttachMode::Generic)) => InterfaceMode::XdpGeneric,
        // Adopted from the previous run: the mode it was attached in.
        Ok(Attachment::Adopted) if link.xdp.driver != 0 => InterfaceMode::XdpNative,
        Ok(Attachment::Adopted) => InterfaceMode::XdpGeneric,
        Err(e) => return attach_failed(link, &e, scan),
    };
    if held.is_some() {
        let what = format!(
            "XDP on {name}: {}; attached again",
            found.unwrap_or_default()
        );
        tracing::warn!("{what}");
        scan.repairs.push(what.clone());
        last_repair = Some(Repair {
            at: SystemTime::now(),
            what,
        });
    }
    InterfaceStatus {
        last_repair,
        ..xdp_status(link, mode)
    }
}

/// Why the configuration leaves an interface out of XDP.
fn uncovered_reason(coverage: Coverage) -> &'static str {
    match coverage {
        Coverage::Excluded => "excluded by `exclude_interfaces`",
        Coverage::NotListed => "not in `interfaces`",
        Coverage::Loopback | Coverage::Covered => "loopback: carries only this host's own traffic",
    }
}

fn xdp_status(link: &Link, mode: InterfaceMode) -> InterfaceStatus {
    let reason = match mode {
        InterfaceMode::XdpGeneric => "driver has no native XDP; generic mode",
        _ => "",
    };
    status(link, mode, reason.into())
}

fn attach_failed(link: &Link, error: &str, scan: &mut Scan) -> InterfaceStatus {
    tracing::error!(
        "XDP cannot attach to {}; nftables enforces it: {error}",
        link.name
    );
    scan.needs_nftables = true;
    status(
        link,
        InterfaceMode::NftablesOnly,
        format!("XDP cannot attach: {error}"),
    )
}
