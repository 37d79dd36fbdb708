//! The enforcers as the engine drives them: XDP on the configured
//! interfaces, nftables behind it (or instead of it where XDP cannot
//! attach). Both are programmed from the same active grants; `reconcile`
//! compares what the kernel holds with what it should hold and repairs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};

use crate::{
    clock::wall_to_boot_ns,
    config::{Config, Mode},
    enforce::{
        nft::{NftGate, NftState},
        xdp::{AttachMode, Attachment, XdpGate},
    },
    grants::ActiveGrants,
    net::{GrantTarget, Protocol},
};

/// How an interface is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceMode {
    XdpNative,
    XdpGeneric,
    NftablesOnly,
    Unsupported,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceStatus {
    pub name: String,
    pub mode: InterfaceMode,
    /// Why the mode is not XDP; empty otherwise.
    pub reason: String,
}

/// A kernel XDP entry may differ from the computed one by this much (two
/// conversions of the same wall-clock instant to boot time).
const XDP_EXPIRY_TOLERANCE: Duration = Duration::from_millis(100);
/// nftables keeps timeouts in milliseconds and counts them down on its own.
const NFT_EXPIRY_TOLERANCE: Duration = Duration::from_secs(2);

pub struct Enforcers {
    mode: Mode,
    xdp: Option<XdpGate>,
    /// Why XDP could not be loaded at all, if it could not.
    xdp_unavailable: Option<String>,
    /// The deny-event ring buffer, taken from the XDP gate once.
    deny_events: Option<RingBuf<MapData>>,
    nft: Option<NftGate>,
    nft_table: String,
    interfaces: Vec<InterfaceStatus>,
}

impl Enforcers {
    /// Loads the XDP program (not yet attached) if the mode uses it. A
    /// failure to load is not fatal: nftables takes over, reported.
    pub fn open(config: &Config) -> Enforcers {
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
            mode: config.mode,
            deny_events,
            xdp,
            xdp_unavailable,
            nft: None,
            nft_table: config.nft_table.clone(),
            interfaces: Vec::new(),
        }
    }

    pub fn xdp(&self) -> Option<&XdpGate> {
        self.xdp.as_ref()
    }

    pub fn xdp_mut(&mut self) -> Option<&mut XdpGate> {
        self.xdp.as_mut()
    }

    pub fn deny_events(&mut self) -> Option<&mut RingBuf<MapData>> {
        self.deny_events.as_mut()
    }

    pub fn nftables_active(&self) -> bool {
        self.nft.is_some()
    }

    pub fn interfaces(&self) -> &[InterfaceStatus] {
        &self.interfaces
    }

    /// Attaches XDP to `names` (and detaches from interfaces no longer
    /// listed); where it cannot, nftables becomes the enforcer.
    pub fn set_interfaces(&mut self, names: &[String]) {
        if let Some(xdp) = self.xdp.as_mut() {
            for old in &self.interfaces {
                let keep = names.contains(&old.name);
                if !keep
                    && matches!(
                        old.mode,
                        InterfaceMode::XdpNative | InterfaceMode::XdpGeneric
                    )
                    && let Err(e) = xdp.detach(&old.name)
                {
                    tracing::warn!("detaching from {}: {e}", old.name);
                }
            }
        }
        self.interfaces = names.iter().map(|name| self.attach(name)).collect();
    }

    fn attach(&mut self, name: &str) -> InterfaceStatus {
        let status = |mode, reason: String| InterfaceStatus {
            name: name.to_owned(),
            mode,
            reason,
        };
        if !self.mode.uses_xdp() {
            return status(
                InterfaceMode::NftablesOnly,
                "configured mode is nftables".into(),
            );
        }
        let Some(xdp) = self.xdp.as_mut() else {
            let why = self.xdp_unavailable.clone().unwrap_or_default();
            return status(
                InterfaceMode::NftablesOnly,
                format!("XDP unavailable: {why}"),
            );
        };
        match xdp.attach(name) {
            Ok(Attachment::Attached(AttachMode::Native)) => {
                status(InterfaceMode::XdpNative, String::new())
            }
            Ok(Attachment::Attached(AttachMode::Generic)) => status(
                InterfaceMode::XdpGeneric,
                "driver has no native XDP; generic mode".into(),
            ),
            Ok(Attachment::Adopted) => {
                // The link from the previous run; the kernel does not say
                // which mode it was attached in. It is reported as native,
                // with the reason saying it was adopted.
                status(
                    InterfaceMode::XdpNative,
                    "adopted from the previous run".into(),
                )
            }
            Err(e) => {
                tracing::error!("XDP cannot attach to {name}; nftables enforces it: {e}");
                status(
                    InterfaceMode::NftablesOnly,
                    format!("XDP cannot attach: {e}"),
                )
            }
        }
    }

    /// Whether nftables is needed (some interface fell back to it) but not
    /// yet running.
    pub fn nft_pending(&self) -> bool {
        self.nft.is_none() && self.nft_needed()
    }

    /// nftables runs if the mode asks for it or some interface needs it.
    fn nft_needed(&self) -> bool {
        self.mode.uses_nftables()
            || self
                .interfaces
                .iter()
                .any(|i| i.mode != InterfaceMode::XdpNative && i.mode != InterfaceMode::XdpGeneric)
    }

    /// Makes exactly `protected` protected in every active enforcer.
    pub fn set_protected(&mut self, protected: &BTreeSet<(Protocol, u16)>) -> anyhow::Result<()> {
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
    pub fn apply(
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
            let now = SystemTime::now();
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
    pub fn reconcile(
        &mut self,
        active: &ActiveGrants,
        protected: &BTreeSet<(Protocol, u16)>,
    ) -> anyhow::Result<Vec<String>> {
        let mut repairs = Vec::new();
        if let Some(xdp) = self.xdp.as_mut() {
            reconcile_xdp(xdp, active, protected, &mut repairs)?;
        }
        if self.nft.is_none() && self.nft_needed() {
            // Before the table's `ct state` rule first applies.
            let seeded = super::connections::seed_conntrack(protected);
            tracing::info!("{seeded} established connections recorded in conntrack");
            self.nft = Some(NftGate::new(self.nft_table.clone()));
        }
        if let Some(nft) = &self.nft {
            reconcile_nft(nft, active, protected, &mut repairs)?;
        }
        Ok(repairs)
    }
}

fn write_xdp_entry(
    xdp: &mut XdpGate,
    target: &GrantTarget,
    active: &ActiveGrants,
) -> anyhow::Result<()> {
    match active.xdp_entry(target) {
        Some(entry) => {
            xdp.upsert_grant(target, wall_to_boot_ns(entry.expires_at), entry.grant_id)?
        }
        None => {
            xdp.remove_grant(target)?;
        }
    }
    Ok(())
}

/// Time left for the nftables element of `target`, if it should exist.
fn nft_entry(active: &ActiveGrants, target: &GrantTarget, now: SystemTime) -> Option<Duration> {
    active
        .own_entry(target)
        .and_then(|e| e.expires_at.duration_since(now).ok())
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
    let kernel: BTreeMap<GrantTarget, (u64, u64)> = xdp
        .grants()?
        .into_iter()
        .map(|e| (e.target, (e.expires_at_boot_ns, e.grant_id)))
        .collect();
    let tolerance = XDP_EXPIRY_TOLERANCE.as_nanos() as u64;
    let (mut written, mut removed) = (0usize, 0usize);
    for target in active.targets() {
        let Some(entry) = active.xdp_entry(target) else {
            continue;
        };
        let expires = wall_to_boot_ns(entry.expires_at);
        let ok = kernel
            .get(target)
            .is_some_and(|(at, id)| *id == entry.grant_id && at.abs_diff(expires) <= tolerance);
        if !ok {
            xdp.upsert_grant(target, expires, entry.grant_id)?;
            written += 1;
        }
    }
    for target in kernel.keys() {
        if active.own_entry(target).is_none() {
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
    let now = SystemTime::now();
    let desired: BTreeMap<GrantTarget, Duration> = active
        .targets()
        .filter_map(|t| nft_entry(active, t, now).map(|left| (*t, left)))
        .collect();
    let Some(current) = nft.read()? else {
        nft.install(&NftState {
            protected: protected.clone(),
            allowed: desired,
        })?;
        repairs.push(format!("nftables: table {} was missing", nft.table()));
        return Ok(());
    };
    if current.protected != *protected {
        nft.set_protected(protected)?;
        repairs.push("nftables: protected ports differed".into());
    }
    let stale: Vec<(GrantTarget, Duration)> = desired
        .iter()
        .filter(|(t, left)| {
            current
                .allowed
                .get(t)
                .is_none_or(|have| have.abs_diff(**left) > NFT_EXPIRY_TOLERANCE)
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
