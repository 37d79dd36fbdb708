//! Programming and repairing each layer from the active grants: XDP
//! entries carry the grant's boot-clock deadline as it is, nftables
//! elements the time left until it; reconciliation reads each layer back,
//! compares it with what it should hold, and repairs the difference.

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
const NFT_LATER_TOLERANCE: Duration = Duration::from_millis(100);
/// ...and this much earlier (harmless to the gate, but a grant cut short).
const NFT_EARLIER_TOLERANCE: Duration = Duration::from_secs(2);

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

pub(super) fn reconcile_xdp(
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
    // After the entries: writing one sets its source's bit.
    let missing = xdp.repair_source_filter()?;
    if missing > 0 {
        repairs.push(format!(
            "XDP: source filter missing {missing} granted sources' bits; set again"
        ));
    }
    Ok(())
}

pub(super) fn reconcile_nft(
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
