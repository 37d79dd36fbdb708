//! The enforcers as the engine drives them: XDP on the configured
//! interfaces, nftables behind it (or instead of it where XDP cannot
//! attach). Both are programmed from the same active grants; `reconcile`
//! compares what the kernel holds with what it should hold and repairs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};

use super::interfaces::{InterfaceMode, InterfaceStatus, Interfaces, Repair};
use crate::{
    clock::Deadline,
    config::{Config, Mode},
    enforce::{
        nft::{NftGate, NftState},
        xdp::XdpGate,
    },
    grants::ActiveGrants,
    net::{GrantTarget, Protocol},
};

/// The health of one enforcement layer: what is wrong now, and the last
/// repair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerHealth {
    pub problem: Option<String>,
    pub last_repair: Option<Repair>,
}

impl LayerHealth {
    fn repaired(&mut self, what: &[String]) {
        if !what.is_empty() {
            self.last_repair = Some(Repair {
                at: SystemTime::now(),
                what: what.join("; "),
            });
        }
    }
}

/// Enforcement as it stands: per interface, and per layer.
#[derive(Clone, Debug)]
pub struct EnforcementStatus {
    pub interfaces: Vec<InterfaceStatus>,
    pub xdp: LayerHealth,
    pub nftables: LayerHealth,
}

impl EnforcementStatus {
    /// Nothing wrong in any layer, and no path into the host ungated.
    pub fn healthy(&self) -> bool {
        self.xdp.problem.is_none()
            && self.nftables.problem.is_none()
            && self.interfaces.iter().all(InterfaceStatus::is_sound)
    }
}

/// nftables keeps timeouts in milliseconds and counts them down on its own
/// clock (jiffies, which stand still during suspend): an element may time
/// out this much later than its grant's deadline before it is rewritten...
const NFT_LATER_TOLERANCE: Duration = Duration::from_millis(100);
/// ...and this much earlier (harmless to the gate, but a grant cut short).
const NFT_EARLIER_TOLERANCE: Duration = Duration::from_secs(2);

pub(super) struct Enforcers {
    /// The configuration (mode, interfaces) enforcement follows.
    config: Config,
    mode: Mode,
    xdp: Option<XdpGate>,
    /// Why XDP could not be loaded at all, if it could not.
    xdp_unavailable: Option<String>,
    /// The deny-event ring buffer, taken from the XDP gate once.
    deny_events: Option<RingBuf<MapData>>,
    nft: Option<NftGate>,
    nft_table: String,
    interfaces: Interfaces,
    /// Some covered interface can only be gated by nftables.
    nft_wanted: bool,
    xdp_health: LayerHealth,
    nft_health: LayerHealth,
}

impl Enforcers {
    /// Loads the XDP program (not yet attached) if the mode uses it. A
    /// failure to load is not fatal: nftables takes over, reported.
    pub(super) fn open(config: &Config) -> Enforcers {
        let (mut xdp, xdp_unavailable) = if config.mode.uses_xdp() {
            match XdpGate::open_with(&config.pin_dir, config.flows.gate_options()) {
                Ok(gate) => (Some(gate), None),
                Err(e) => {
                    tracing::error!("XDP unavailable, nftables only: {e}");
                    (None, Some(e.to_string()))
                }
            }
        } else {
            (None, None)
        };
        let deny_events = xdp.as_mut().and_then(XdpGate::take_deny_events);
        Enforcers {
            config: config.clone(),
            mode: config.mode,
            deny_events,
            xdp,
            xdp_unavailable,
            nft: None,
            nft_table: config.nft_table.clone(),
            interfaces: Interfaces::default(),
            nft_wanted: false,
            xdp_health: LayerHealth::default(),
            nft_health: LayerHealth::default(),
        }
    }

    pub(super) fn xdp(&self) -> Option<&XdpGate> {
        self.xdp.as_ref()
    }

    pub(super) fn xdp_mut(&mut self) -> Option<&mut XdpGate> {
        self.xdp.as_mut()
    }

    pub(super) fn deny_events(&mut self) -> Option<&mut RingBuf<MapData>> {
        self.deny_events.as_mut()
    }

    pub(super) fn nftables_active(&self) -> bool {
        self.nft.is_some()
    }

    /// Why a limit on the connections a grant opens cannot be enforced
    /// now, if it cannot. Only the XDP program counts the connections of a
    /// grant; nftables cannot, so no interface may be gated by nftables
    /// alone, loopback aside (where XDP gates, the agent takes a used-up
    /// grant's nftables element away: README "Single-use grants").
    pub(super) fn connection_limits_unenforceable(&self) -> Option<String> {
        if self.xdp.is_none() {
            return Some(match &self.xdp_unavailable {
                Some(why) => format!("the XDP gate is unavailable ({why})"),
                None => format!("mode {} does not use the XDP gate", self.mode.name()),
            });
        }
        let nft_alone: Vec<String> = self
            .interfaces
            .statuses(self.nft.is_some())
            .into_iter()
            // Loopback carries this host's own traffic only.
            .filter(|i| {
                !i.loopback
                    && matches!(
                        i.mode,
                        InterfaceMode::NftablesOnly | InterfaceMode::Unsupported
                    )
            })
            .map(|i| i.name)
            .collect();
        (!nft_alone.is_empty())
            .then(|| format!("interfaces {} are not gated by XDP", nft_alone.join(", ")))
    }

    /// Enforcement as last checked and repaired.
    pub(super) fn status(&self) -> EnforcementStatus {
        EnforcementStatus {
            interfaces: self.interfaces.statuses(self.nft.is_some()),
            xdp: self.xdp_health.clone(),
            nftables: self.nft_health.clone(),
        }
    }

    /// Enforcement as the kernel holds it now: what is missing since the
    /// last check shows at once (the next reconciliation repairs it).
    /// A kernel that cannot be read shows as the problem of its layer.
    pub(super) fn check(&self) -> EnforcementStatus {
        let mut status = self.status();
        match self
            .interfaces
            .check(&self.config, self.xdp.as_ref(), self.nft.is_some())
        {
            Ok(interfaces) => status.interfaces = interfaces,
            Err(e) => status.xdp.problem = Some(format!("cannot read the interfaces: {e:#}")),
        }
        if let Some(xdp) = &self.xdp {
            let missing = xdp.missing_pins();
            if !missing.is_empty() {
                status.xdp.problem = Some(format!("pins missing: {}", missing.join(", ")));
            }
        }
        if let Some(nft) = &self.nft {
            status.nftables.problem = nft
                .check_structure()
                .unwrap_or_else(|e| Some(format!("cannot read the table: {e}")));
        } else if self.nft_needed() {
            status.nftables.problem = Some("needed but not installed yet".into());
        }
        status
    }

    /// Follows a changed configuration (interfaces covered).
    pub(super) fn set_config(&mut self, config: &Config) {
        self.config = config.clone();
    }

    /// Attaches XDP wherever the configuration covers an interface and it
    /// does not run, lets go of interfaces gone or no longer covered; where
    /// XDP cannot gate a covered interface, nftables becomes its enforcer.
    /// Returns the repairs (drift found on interfaces the gate held).
    pub(super) fn scan_interfaces(&mut self) -> anyhow::Result<Vec<String>> {
        let scan = self.interfaces.scan(
            &self.config,
            self.xdp.as_mut(),
            self.xdp_unavailable.as_deref(),
        )?;
        self.nft_wanted = scan.needs_nftables;
        Ok(scan.repairs)
    }

    /// nftables runs if the mode asks for it or some interface needs it.
    fn nft_needed(&self) -> bool {
        self.mode.uses_nftables() || self.nft_wanted || self.xdp.is_none()
    }

    /// Makes exactly `protected` protected in every active enforcer.
    pub(super) fn set_protected(
        &mut self,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<()> {
        if let Some(xdp) = self.xdp.as_mut() {
            xdp.set_protected_ports(protected)?;
        }
        if let Some(nft) = &self.nft {
            nft.set_protected(protected)?;
        }
        Ok(())
    }

    /// Brings the entries for `targets` (and, in XDP, the narrower prefixes
    /// depending on them) in line with `active`.
    pub(super) fn apply(
        &mut self,
        targets: &BTreeSet<GrantTarget>,
        active: &ActiveGrants,
    ) -> anyhow::Result<()> {
        if let Some(xdp) = self.xdp.as_mut() {
            let mut done = BTreeSet::new();
            for target in targets {
                for dependent in active.dependents(target) {
                    if done.insert(dependent) {
                        write_xdp_entry(xdp, &dependent, active)?;
                    }
                }
            }
        }
        if let Some(nft) = &self.nft {
            let now = Deadline::now();
            let (mut add, mut remove) = (Vec::new(), Vec::new());
            for target in targets {
                match nft_entry(active, target, now) {
                    Some(left) => add.push((*target, left)),
                    None => remove.push(*target),
                }
            }
            if !remove.is_empty() {
                nft.remove_allowed(&remove)?;
            }
            if !add.is_empty() {
                nft.add_allowed(&add)?;
            }
        }
        Ok(())
    }

    /// Compares every enforcer with `active` and `protected`, repairs what
    /// differs, and describes each repair (empty: nothing had drifted).
    pub(super) fn reconcile(
        &mut self,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<Vec<String>> {
        let mut repairs = Vec::new();
        if let Some(xdp) = self.xdp.as_mut() {
            reconcile_xdp(xdp, active, protected, &mut repairs)?;
            let missing = xdp.repin()?;
            if !missing.is_empty() {
                repairs.push(format!(
                    "XDP: pins missing ({}); pinned again from the agent's handles",
                    missing.join(", ")
                ));
            }
        }
        repairs.extend(self.scan_interfaces()?);
        self.xdp_health.repaired(&repairs);
        let xdp_repairs = repairs.len();
        if self.nft.is_none() && self.nft_needed() {
            // Before the table's `ct state` rule first applies.
            let seeded = super::connections::seed_conntrack(protected);
            tracing::info!("{seeded} established connections recorded in conntrack");
            self.nft = Some(NftGate::new(self.nft_table.clone()));
        }
        if let Some(nft) = &self.nft {
            reconcile_nft(nft, active, protected, &mut repairs)?;
        }
        self.nft_health.repaired(&repairs[xdp_repairs..]);
        Ok(repairs)
    }
}

fn write_xdp_entry(
    xdp: &mut XdpGate,
    target: &GrantTarget,
    active: &ActiveGrants,
) -> anyhow::Result<()> {
    match active.xdp_entry(target) {
        Some(entry) => xdp.upsert_grant_opening_at_most(
            target,
            entry.deadline.boot_ns(),
            entry.grant_id,
            entry.max_connections,
        )?,
        None => {
            xdp.remove_grant(target)?;
        }
    }
    Ok(())
}

/// Time left for the nftables element of `target` at boot-clock `now`,
/// if it should exist: the element times out at the grant's deadline.
fn nft_entry(active: &ActiveGrants, target: &GrantTarget, now: Deadline) -> Option<Duration> {
    active
        .own_entry(target)
        .map(|e| Duration::from_nanos(e.deadline.boot_ns().saturating_sub(now.boot_ns())))
        .filter(|left| !left.is_zero())
}

fn reconcile_xdp(
    xdp: &mut XdpGate,
    active: &ActiveGrants,
    protected: &BTreeSet<(Protocol, u16)>,
    repairs: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut unprotected = Vec::new();
    for (protocol, port) in protected {
        if !xdp.is_protected(*protocol, *port)? {
            unprotected.push(format!("{port}/{protocol}"));
        }
    }
    if !unprotected.is_empty() {
        xdp.set_protected_ports(protected)?;
        repairs.push(format!(
            "XDP: ports {} were not protected",
            unprotected.join(", ")
        ));
    }
    let kernel: BTreeMap<GrantTarget, (u64, u64, u32)> = xdp
        .grants()?
        .into_iter()
        .map(|e| {
            let limit = e.limits.max_opens;
            (e.target, (e.expires_at_boot_ns, e.grant_id, limit))
        })
        .collect();
    let (mut written, mut removed) = (0usize, 0usize);
    for target in active.targets() {
        let Some(entry) = active.xdp_entry(target) else {
            continue;
        };
        let expires = entry.deadline.boot_ns();
        let ok = kernel.get(target).is_some_and(|(at, id, limit)| {
            *id == entry.grant_id && *at == expires && *limit == entry.max_connections
        });
        if !ok {
            write_xdp_entry(xdp, target, active)?;
            written += 1;
        }
    }
    for target in kernel.keys() {
        if active.xdp_entry(target).is_none() {
            xdp.remove_grant(target)?;
            removed += 1;
        }
    }
    if written + removed > 0 {
        repairs.push(format!(
            "XDP: {written} grant entries missing or wrong, {removed} without a grant"
        ));
    }
    Ok(())
}

fn reconcile_nft(
    nft: &NftGate,
    active: &ActiveGrants,
    protected: &BTreeSet<(Protocol, u16)>,
    repairs: &mut Vec<String>,
) -> anyhow::Result<()> {
    let now = Deadline::now();
    let desired: BTreeMap<GrantTarget, Duration> = active
        .targets()
        .filter_map(|t| nft_entry(active, t, now).map(|left| (*t, left)))
        .collect();
    // Anything wrong in the table's structure: the whole table is
    // installed again, elements and all, in one transaction.
    if let Some(differences) = nft.check_structure()? {
        nft.install(&NftState {
            protected: protected.clone(),
            allowed: desired,
        })?;
        repairs.push(format!(
            "nftables: {differences}; table {} installed again",
            nft.table()
        ));
        return Ok(());
    }
    let Some(current) = nft.read()? else {
        return Err(anyhow::anyhow!(
            "table {} vanished while reconciling",
            nft.table()
        ));
    };
    if current.protected != *protected {
        nft.set_protected(protected)?;
        repairs.push("nftables: protected ports differed".into());
    }
    let stale: Vec<(GrantTarget, Duration)> = desired
        .iter()
        .filter(|(t, left)| {
            current.allowed.get(t).is_none_or(|have| {
                *have > **left + NFT_LATER_TOLERANCE || *have + NFT_EARLIER_TOLERANCE < **left
            })
        })
        .map(|(t, left)| (*t, *left))
        .collect();
    let extra: Vec<GrantTarget> = current
        .allowed
        .keys()
        .filter(|t| !desired.contains_key(t))
        .copied()
        .collect();
    if !stale.is_empty() {
        nft.add_allowed(&stale)?;
    }
    if !extra.is_empty() {
        nft.remove_allowed(&extra)?;
    }
    if stale.len() + extra.len() > 0 {
        repairs.push(format!(
            "nftables: {} elements missing or wrong, {} without a grant",
            stale.len(),
            extra.len()
        ));
    }
    Ok(())
}
