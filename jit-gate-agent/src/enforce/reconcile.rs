//! Programming and repairing each layer from the active grants: XDP
//! entries carry the grant's boot-clock deadline as it is, nftables
//! elements the time left until it; reconciliation checks each layer's
//! structure here (protected ports, the nftables table) and its grant
//! entries in `snapshot`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::{
    nft::{NftGate, NftState},
    xdp::XdpGate,
};
use crate::{
    clock::Deadline,
    grants::ActiveGrants,
    net::{GrantTarget, Protocol},
};

/// nftables keeps timeouts in milliseconds and counts them down on its own
/// clock (jiffies, which stand still during suspend): an element may time
/// out this much later than its grant's deadline before it is rewritten...
pub(super) const NFT_LATER_TOLERANCE: Duration = Duration::from_millis(100);
/// ...and this much earlier (harmless to the gate, but a grant cut short).
pub(super) const NFT_EARLIER_TOLERANCE: Duration = Duration::from_secs(2);

/// Writes the XDP entries of `targets` and of the narrower prefixes
/// depending on them.
pub(super) fn apply_xdp(
    xdp: &mut XdpGate,
    targets: &BTreeSet<GrantTarget>,
    active: &ActiveGrants,
) -> anyhow::Result<()> {
    let mut done = BTreeSet::new();
    for target in targets {
        for dependent in active.dependents(target) {
            if done.insert(dependent) {
                write_xdp_entry(xdp, &dependent, active)?;
            }
        }
    }
    Ok(())
}

/// Adds, rewrites or removes the nftables elements of `targets`.
pub(super) fn apply_nft(
    nft: &NftGate,
    targets: &BTreeSet<GrantTarget>,
    active: &ActiveGrants,
) -> anyhow::Result<()> {
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
    Ok(())
}

pub(super) fn write_xdp_entry(
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

/// Protects again the ports the XDP program no longer protects.
pub(super) fn reconcile_xdp_ports(
    xdp: &mut XdpGate,
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
    Ok(())
}

/// Installs the nftables table again, elements and all, in one
/// transaction if anything in its structure differs; returns whether it
/// did (its elements are then right).
pub(super) fn reconcile_nft_structure(
    nft: &NftGate,
    active: &ActiveGrants,
    protected: &BTreeSet<(Protocol, u16)>,
    repairs: &mut Vec<String>,
) -> anyhow::Result<bool> {
    let Some(differences) = nft.check_structure()? else {
        return Ok(false);
    };
    let now = Deadline::now();
    let desired: BTreeMap<GrantTarget, Duration> = active
        .targets()
        .filter_map(|t| nft_entry(active, &t, now).map(|left| (t, left)))
        .collect();
    nft.install(&NftState {
        protected: protected.clone(),
        allowed: desired,
    })?;
    repairs.push(format!(
        "nftables: {differences}; table {} installed again",
        nft.table()
    ));
    Ok(true)
}
