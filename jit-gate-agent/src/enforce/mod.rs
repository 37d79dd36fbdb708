//! Enforcement: the one door to the kernel. [`Enforcement`] owns the XDP
//! gate (program, maps, links, the flow map and the deny ring) and the
//! nftables gate; it is given domain state (the active grants with their
//! boot-clock deadlines, the protected ports) and offers a few operations:
//! attach, apply, reconcile, observe, terminate. Each layer converts time
//! itself from a grant's one deadline. The layers never decide policy; they
//! are told what to open and until when.

mod compare;
mod connections;
mod interfaces;
mod kernel_read;
pub mod links;
pub mod nft;
mod reconcile;
mod seen;
pub mod xdp;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use jit_gate_common::verdict::Reason;

pub use compare::{Pass, Reading};
pub use connections::ConnectionInfo;
pub use connections::FlowSnapshot;
use connections::FlowWatch;
use interfaces::Interfaces;
pub use interfaces::{InterfaceMode, InterfaceStatus, Repair};
pub use kernel_read::{KernelRead, KernelReader};
pub use xdp::{Counters, DeniedPacket, GrantFlowCounts};

use crate::{
    config::{Config, Mode},
    flows::Connection,
    grants::{ActiveGrant, ActiveGrants},
    net::{GrantTarget, Protocol},
};
use nft::NftGate;
use xdp::XdpGate;

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

/// The XDP flow table.
pub struct FlowTableReport {
    pub capacity: u32,
    pub tracked: usize,
    pub per_grant_quota: u32,
    /// New connections refused since the gate's state was created, by why.
    pub refused_quota: u64,
    pub refused_opens_exhausted: u64,
    pub refused_table_full: u64,
}

/// Flows opened under a grant since the last audit.
pub struct NewFlows {
    /// Each connection with the grant it was opened under.
    pub opened: Vec<(Connection, u64)>,
    /// To pass to [`Enforcement::flows_audited`] once their records are
    /// stored; until then they are reported again.
    pub snapshot: FlowSnapshot,
}

/// What attaching found and did.
pub struct Attached {
    /// Drift repaired while programming the layers (at start: what the
    /// kernel held from before, brought in line with the store).
    pub repairs: Vec<String>,
    /// Why the kernel state was created anew rather than re-adopted, if it
    /// was.
    pub rebuilt: Option<String>,
}

pub struct Enforcement {
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
    /// The flows already audited.
    flow_watch: FlowWatch,
    /// Per layer, what was written since its reconciliation's read began.
    touched: [Option<Touched>; 2],
}

/// What a reconciliation cycle covers: `Xdp` the ports, pins, interfaces
/// and XDP grant entries; `Nftables` the table's structure and elements.
/// Each runs on its own, so that a slow nftables read never delays the
/// XDP check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Xdp = 0,
    Nftables = 1,
}

impl Layer {
    pub const BOTH: [Layer; 2] = [Layer::Xdp, Layer::Nftables];
}

/// Written since a reconciliation's read began: its comparison skips it.
#[derive(Default)]
struct Touched {
    targets: HashSet<GrantTarget>,
    protected: bool,
}

impl Enforcement {
    /// Loads the XDP program (not yet attached) if the mode uses it. A
    /// failure to load is not fatal: nftables takes over, reported.
    pub fn open(config: &Config) -> Enforcement {
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
        Enforcement {
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
            flow_watch: FlowWatch::default(),
            touched: [None, None],
        }
    }

    /// Programs every layer from `active` and `protected` and attaches to
    /// the interfaces. Connections established before the gate are kept
    /// open; flows opened before `flows_audited_until` are not audited
    /// again. Grants go into the maps before the program attaches (in the
    /// same reconciliation), so granted sources are never dropped during
    /// start-up; nftables goes in after, where an interface needs it.
    pub fn attach(
        &mut self,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
        flows_audited_until: Option<SystemTime>,
    ) -> anyhow::Result<Attached> {
        let mut rebuilt = None;
        if let Some(xdp) = self.xdp.as_mut() {
            if let Some(why) = xdp.rebuilt() {
                tracing::warn!("kernel state rebuilt from the store: {why}");
                rebuilt = Some(why.to_owned());
            }
            xdp.set_protected_ports(protected)?;
            let seeded = connections::seed(xdp, protected)?;
            tracing::info!("{seeded} established connections kept open");
            self.flow_watch = FlowWatch::resume(xdp, flows_audited_until)?;
        }
        let repairs = self.reconcile(active, protected)?;
        if rebuilt.is_some()
            && let Some(xdp) = self.xdp.as_mut()
        {
            // Connections opened under the previous program, into its maps,
            // while the new maps were being filled.
            connections::seed(xdp, protected)?;
        }
        Ok(Attached { repairs, rebuilt })
    }

    pub fn xdp_active(&self) -> bool {
        self.xdp.is_some()
    }

    pub fn nftables_active(&self) -> bool {
        self.nft.is_some()
    }

    /// Packets and bytes the nftables gate dropped since its table was
    /// installed; `None` while nftables is not in use.
    pub fn nftables_dropped(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let Some(nft) = &self.nft else {
            return Ok(None);
        };
        Ok(nft.dropped()?)
    }

    /// Why a limit on the connections a grant opens cannot be enforced
    /// now, if it cannot. Only the XDP program counts the connections of a
    /// grant; nftables cannot, so no interface may be gated by nftables
    /// alone, loopback aside (where XDP gates, the agent takes a used-up
    /// grant's nftables element away: README "Single-use grants").
    pub fn connection_limits_unenforceable(&self) -> Option<String> {
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

    /// Connections opened under each grant since the kernel state was
    /// created (grants without any are absent; empty without XDP).
    pub fn connections_opened(&self) -> anyhow::Result<BTreeMap<u64, u64>> {
        let Some(xdp) = &self.xdp else {
            return Ok(BTreeMap::new());
        };
        Ok(xdp
            .grant_flow_counts()?
            .into_iter()
            .map(|(id, counts)| (id, counts.opened))
            .collect())
    }

    /// Enforcement as last checked and repaired.
    pub fn status(&self) -> EnforcementStatus {
        EnforcementStatus {
            interfaces: self.interfaces.statuses(self.nft.is_some()),
            xdp: self.xdp_health.clone(),
            nftables: self.nft_health.clone(),
        }
    }

    /// Enforcement as the kernel holds it now: what is missing since the
    /// last check shows at once (the next reconciliation repairs it).
    /// A kernel that cannot be read shows as the problem of its layer.
    pub fn check(&self) -> EnforcementStatus {
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

    /// The kernel's counters and its flow table (`None` without XDP).
    pub fn flow_table(
        &self,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<Option<(Counters, FlowTableReport)>> {
        let Some(xdp) = &self.xdp else {
            return Ok(None);
        };
        let counters = xdp.counters(protected)?;
        let refused = |reason| counters.by_reason.get(&reason).copied().unwrap_or(0);
        let flows = FlowTableReport {
            capacity: xdp.flow_capacity(),
            tracked: xdp.flows()?.len(),
            per_grant_quota: xdp.options().flow_quota,
            refused_quota: refused(Reason::DropFlowQuota),
            refused_opens_exhausted: refused(Reason::DropOpensExhausted),
            refused_table_full: refused(Reason::DropFlowTableFull),
        };
        Ok(Some((counters, flows)))
    }

    /// The kernel's drop counters and the per-grant flow counters (`None`
    /// without XDP).
    pub fn drop_counters(
        &self,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<Option<(Counters, BTreeMap<u64, GrantFlowCounts>)>> {
        let Some(xdp) = &self.xdp else {
            return Ok(None);
        };
        Ok(Some((xdp.counters(protected)?, xdp.grant_flow_counts()?)))
    }

    /// Hands every deny event the kernel queued since the last call to
    /// `each`.
    pub fn drain_denied(&mut self, mut each: impl FnMut(&DeniedPacket)) {
        if let Some(ring) = self.deny_events.as_mut() {
            while let Some(item) = ring.next() {
                if let Some(denied) = xdp::parse_deny_event(&item) {
                    each(&denied);
                }
            }
        }
    }

    /// Flows opened under a grant and not yet audited; `None` without XDP.
    pub fn new_flows(&self) -> anyhow::Result<Option<NewFlows>> {
        let Some(xdp) = &self.xdp else {
            return Ok(None);
        };
        let (opened, snapshot) = self.flow_watch.new_flows(xdp)?;
        Ok(Some(NewFlows { opened, snapshot }))
    }

    /// The flows of `snapshot` have been audited.
    pub fn flows_audited(&mut self, snapshot: FlowSnapshot) {
        self.flow_watch.mark_audited(snapshot);
    }

    /// Removes the flows of ended connections and half-open handshakes,
    /// and the flow counters of ended grants; returns how many flows went.
    pub fn forget_dead_flows(
        &mut self,
        protected: &BTreeSet<(Protocol, u16)>,
        active: &ActiveGrants,
    ) -> anyhow::Result<usize> {
        match self.xdp.as_mut() {
            Some(xdp) => connections::forget_dead_flows(xdp, protected, active),
            None => Ok(0),
        }
    }

    /// Connections to `protected` ports, with the grant each was opened
    /// under.
    pub fn connections(
        &self,
        protected: &BTreeSet<(Protocol, u16)>,
        active: &ActiveGrants,
    ) -> anyhow::Result<Vec<ConnectionInfo>> {
        connections::list(self.xdp.as_ref(), protected, active)
    }

    /// Ends the connections of `revoked` (already removed from `active`)
    /// that no other live grant accounts for; returns them.
    pub fn terminate(
        &mut self,
        revoked: &ActiveGrant,
        active: &ActiveGrants,
    ) -> anyhow::Result<Vec<Connection>> {
        connections::terminate(self.xdp.as_mut(), revoked, active)
    }

    /// Follows a changed configuration (interfaces covered).
    pub fn set_config(&mut self, config: &Config) {
        self.config = config.clone();
    }

    /// Attaches XDP wherever the configuration covers an interface and it
    /// does not run, lets go of interfaces gone or no longer covered; where
    /// XDP cannot gate a covered interface, nftables becomes its enforcer.
    /// Returns the repairs (drift found on interfaces the gate held).
    pub fn scan_interfaces(&mut self) -> anyhow::Result<Vec<String>> {
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

    /// Makes exactly `protected` protected in every active layer; the
    /// established connections to `newly` protected ports are kept open
    /// (failures to keep them are logged).
    pub fn set_protected(
        &mut self,
        protected: &BTreeSet<(Protocol, u16)>,
        newly: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<()> {
        for touched in self.touched.iter_mut().flatten() {
            touched.protected = true;
        }
        if let Some(xdp) = self.xdp.as_mut() {
            if !newly.is_empty()
                && let Err(e) = connections::seed(xdp, newly)
            {
                tracing::error!("keeping connections to newly protected ports: {e:#}");
            }
            xdp.set_protected_ports(protected)?;
        }
        if let Some(nft) = &self.nft {
            nft.set_protected(protected)?;
        }
        Ok(())
    }

    /// Brings the entries for `targets` (and, in XDP, the narrower prefixes
    /// depending on them) in line with `active`.
    pub fn apply(
        &mut self,
        targets: &BTreeSet<GrantTarget>,
        active: &ActiveGrants,
    ) -> anyhow::Result<()> {
        for touched in self.touched.iter_mut().flatten() {
            for target in targets {
                touched.targets.extend(active.dependents(target));
            }
        }
        if let Some(xdp) = self.xdp.as_mut() {
            reconcile::apply_xdp(xdp, targets, active)?;
        }
        if let Some(nft) = &self.nft {
            reconcile::apply_nft(nft, targets, active)?;
        }
        Ok(())
    }

    /// Compares every layer with `active` and `protected`, repairs what
    /// differs, and describes each repair (empty: nothing had drifted), all
    /// at once: what the engine does in steps (`begin_reconcile`, the
    /// reader on another thread, `reconcile_step`), for the start.
    pub fn reconcile(
        &mut self,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<Vec<String>> {
        let mut repairs = Vec::new();
        for layer in Layer::BOTH {
            let (begun, reading) = self.begin_reconcile(layer, active, protected)?;
            repairs.extend(begun);
            let compared = reading.map_or(Ok(()), |(reader, pass)| {
                std::thread::scope(|scope| {
                    let (parts, received) = std::sync::mpsc::channel();
                    scope.spawn(move || reader.read(|part| parts.send(part).is_ok()));
                    // The pass ends (and lets its reader go) before the
                    // scope waits for the reader.
                    let mut pass = pass;
                    loop {
                        if !pass.has_work() {
                            let part = received
                                .recv()
                                .map_err(|_| anyhow::anyhow!("the kernel reader stopped"))?;
                            pass.receive(part?);
                        }
                        if let Some(done) =
                            self.reconcile_step(layer, &mut pass, active, protected, Duration::MAX)?
                        {
                            repairs.extend(done);
                            return anyhow::Ok(());
                        }
                    }
                })
            });
            self.end_reconcile(layer);
            compared?;
        }
        Ok(repairs)
    }

    /// The first part of a layer's reconciliation, done at once: for XDP
    /// the ports, pins and interfaces, for nftables the table's structure
    /// (repaired, and described). Returns the reader of the layer's grant
    /// entries and the pass it feeds (none if the layer is not in use or
    /// was just installed whole); the reader runs on any thread. From now
    /// on the targets written are noted, and skipped by the comparison.
    pub fn begin_reconcile(
        &mut self,
        layer: Layer,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<(Vec<String>, Option<Reading>)> {
        let mut repairs = Vec::new();
        let reading = match layer {
            Layer::Xdp => {
                if let Some(xdp) = self.xdp.as_mut() {
                    reconcile::reconcile_xdp_ports(xdp, protected, &mut repairs)?;
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
                match &self.xdp {
                    Some(xdp) => {
                        let maps = xdp.grant_reader()?;
                        Some(Pass::new(layer, active, |credits| {
                            KernelReader::xdp(maps, credits)
                        }))
                    }
                    None => None,
                }
            }
            Layer::Nftables => {
                if self.nft.is_none() && self.nft_needed() {
                    // Before the table's `ct state` rule first applies.
                    let seeded = connections::seed_conntrack(protected);
                    tracing::info!("{seeded} established connections recorded in conntrack");
                    self.nft = Some(NftGate::new(self.nft_table.clone()));
                }
                let mut nft_installed = false;
                if let Some(nft) = &self.nft {
                    nft_installed =
                        reconcile::reconcile_nft_structure(nft, active, protected, &mut repairs)?;
                }
                self.nft_health.repaired(&repairs);
                self.nft.as_ref().filter(|_| !nft_installed).map(|nft| {
                    let gate = nft.clone();
                    Pass::new(layer, active, |credits| KernelReader::nft(gate, credits))
                })
            }
        };
        self.touched[layer as usize] = Some(Touched::default());
        Ok((repairs, reading))
    }

    /// Compares what `pass` has of its reader's parts with `active` and
    /// repairs it, for about `budget`; once the pass is done, returns its
    /// repairs. `end_reconcile` follows.
    pub fn reconcile_step(
        &mut self,
        layer: Layer,
        pass: &mut Pass,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
        budget: Duration,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let touched = self.touched[layer as usize].get_or_insert_default();
        pass.step(
            self.xdp.as_mut(),
            self.nft.as_ref(),
            active,
            &touched.targets,
            budget,
        )?;
        if !pass.is_done() {
            return Ok(None);
        }
        let touched = self.touched[layer as usize].as_ref();
        let (xdp_repairs, nft_elements) = pass.repairs();
        let mut nft_repairs: Vec<String> = nft_elements.into_iter().collect();
        if let (Some(nft), Some(read)) = (&self.nft, pass.nft_protected())
            && !touched.is_some_and(|t| t.protected)
            && read != protected
        {
            nft.set_protected(protected)?;
            nft_repairs.push("nftables: protected ports differed".into());
        }
        self.xdp_health.repaired(&xdp_repairs);
        self.nft_health.repaired(&nft_repairs);
        Ok(Some(xdp_repairs.into_iter().chain(nft_repairs).collect()))
    }

    /// Ends a layer's reconciliation (done, or its read failed): writes
    /// are no longer noted for it.
    pub fn end_reconcile(&mut self, layer: Layer) {
        self.touched[layer as usize] = None;
    }
}

/// Watches the namespace's interfaces and calls `changed` on every change
/// until it returns false (see [`links::watch`]).
pub fn watch_links(changed: impl FnMut() -> bool) -> anyhow::Result<()> {
    Ok(links::watch(changed)?)
}
