//! Restoring grants at start, and the boot-clock record that lets a
//! restart after a reboot carry deadlines over: grants of an earlier boot
//! get what is left of them (never more), grants whose time passed while
//! the agent was down end (audited), and this boot's clock is recorded
//! every `WITNESS_EVERY` and when the engine stops.

use std::time::{Duration, Instant, SystemTime};

use super::{Engine, now_ms};
use crate::{
    audit::{AGENT, Event, Kind},
    clock::{BootWitness, Deadline, EarlierBoot, carry_across_reboot},
    grants::{Grant, GrantState},
    store::Store,
};

/// The last boot-clock reading recorded (`clock::BootWitness`, JSON).
const BOOT_WITNESS_KEY: &str = "boot_clock_witness";
/// How often the boot clock is recorded: what a reboot can cost a grant at
/// most, when the wall clock cannot be trusted to shorten it.
pub(super) const WITNESS_EVERY: Duration = Duration::from_secs(30);

impl Engine {
    /// Records how far this boot's clock has got, for a restart after a
    /// reboot (`clock::carry_across_reboot`).
    pub(super) fn witness_boot_clock(&mut self) -> anyhow::Result<()> {
        let witness = BootWitness::now(&self.boot_id);
        let mut batch = self.store.batch()?;
        batch.set_meta(BOOT_WITNESS_KEY, &serde_json::to_string(&witness)?)?;
        batch.commit()?;
        self.witnessed_at = Instant::now();
        Ok(())
    }

    /// Stores what restoring the grants found: deadlines carried to this
    /// boot, grants that ended while the agent was down (audited), and this
    /// boot's clock reading.
    pub(super) fn record_restored(&mut self, restored: &Restored) -> anyhow::Result<()> {
        let mut batch = self.store.batch()?;
        for grant in &restored.carried {
            batch.set_deadline(grant.id, &self.boot_id, grant.deadline, grant.expires_at)?;
        }
        for grant in &restored.ended {
            batch.end_grant(grant.id, GrantState::Expired, grant.expires_at)?;
            batch.audit(
                Event::new(
                    Kind::GrantExpired,
                    AGENT,
                    grant.id,
                    format!(
                        "grant {} for {} expired while the agent was down",
                        grant.id, grant.target
                    ),
                ),
                SystemTime::now(),
            )?;
        }
        let witness = BootWitness::now(&self.boot_id);
        batch.set_meta(BOOT_WITNESS_KEY, &serde_json::to_string(&witness)?)?;
        let records = batch.commit()?;
        self.witnessed_at = Instant::now();
        self.publish(records);
        Ok(())
    }
}

/// The stored active grants, sorted out at start.
pub(super) struct Restored {
    /// Still live, on this boot's clock.
    pub(super) live: Vec<Grant>,
    /// Set on an earlier boot and moved to this one (live or not).
    carried: Vec<Grant>,
    /// Ended while the agent was down; `expires_at` is the end.
    ended: Vec<Grant>,
}

impl Restored {
    pub(super) fn carried_summary(&self) -> Vec<serde_json::Value> {
        self.carried
            .iter()
            .map(|g| {
                serde_json::json!({
                    "grant_id": g.id,
                    "remaining_ms": u64::try_from(g.remaining().as_millis()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }
}

/// Sorts the stored active grants: a deadline set on an earlier boot (or
/// on an unknown one: databases from before boot-time deadlines) is carried
/// to this boot, never later than it could be; what has passed has ended.
pub(super) fn restore_grants(store: &Store, boot_id: &str) -> anyhow::Result<Restored> {
    let witness: Option<BootWitness> = store
        .meta(BOOT_WITNESS_KEY)?
        .and_then(|json| serde_json::from_str(&json).ok());
    let wall_now = now_ms();
    let mut restored = Restored {
        live: Vec::new(),
        carried: Vec::new(),
        ended: Vec::new(),
    };
    for mut grant in store.active_grants()? {
        if grant.boot_id != boot_id {
            let earlier = EarlierBoot {
                deadline: grant.deadline,
                granted: grant.granted,
                witnessed_ns: witness
                    .as_ref()
                    .filter(|w| !grant.boot_id.is_empty() && w.boot_id == grant.boot_id)
                    .map(|w| w.boot_ns),
                wall_deadline: grant.expires_at,
            };
            let left = carry_across_reboot(&earlier, wall_now);
            grant.deadline = Deadline::after(left);
            boot_id.clone_into(&mut grant.boot_id);
            grant.expires_at = grant.expires_at.min(wall_now + left);
            restored.carried.push(grant.clone());
            if left.is_zero() {
                restored.ended.push(grant);
                continue;
            }
        }
        if grant.deadline.has_passed() {
            let end = grant.deadline.to_wall_near(grant.expires_at);
            grant.expires_at = crate::time::truncate_ms(end);
            restored.ended.push(grant);
        } else {
            restored.live.push(grant);
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::net::{GrantTarget, Protocol};

    fn stored(
        store: &mut Store,
        source: &str,
        boot_id: &str,
        deadline_s: u64,
        wall_left: Duration,
    ) -> u64 {
        let now = now_ms();
        let grant = Grant {
            id: 0,
            request_id: source.into(),
            target: GrantTarget {
                source: format!("{source}/32").parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 22,
            },
            requester: "alice".into(),
            justification: String::new(),
            ticket: String::new(),
            principal: "uid:0".into(),
            created_at: now,
            granted: Duration::from_mins(10),
            deadline: Deadline::from_boot_ns(deadline_s * 1_000_000_000),
            boot_id: boot_id.into(),
            expires_at: now + wall_left,
            state: GrantState::Active,
            ended_at: None,
            max_connections: 0,
            used_up: false,
        };
        let mut batch = store.batch().unwrap();
        let id = batch.insert_grant(&grant, "fp").unwrap();
        batch.commit().unwrap();
        id
    }

    #[test]
    fn grants_of_an_earlier_boot_are_carried_over_never_lengthened() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("agent.db")).unwrap();
        let boot_id = crate::clock::boot_id().unwrap();
        let minute = Duration::from_mins(1);
        // The old boot's clock was last seen at 70 s.
        let mut batch = store.batch().unwrap();
        let witness = BootWitness {
            boot_id: "earlier".into(),
            boot_ns: 70_000_000_000,
        };
        batch
            .set_meta(BOOT_WITNESS_KEY, &serde_json::to_string(&witness).unwrap())
            .unwrap();
        batch.commit().unwrap();
        // 30 s were left on the old clock; the wall clock (stepped back
        // while down) claims 20 minutes.
        let carried = stored(&mut store, "192.0.2.1", "earlier", 100, 20 * minute);
        // Past on the old clock already.
        let gone = stored(&mut store, "192.0.2.2", "earlier", 50, 20 * minute);
        // This boot's: kept as it is.
        let deadline_here = Deadline::after(minute).boot_ns() / 1_000_000_000 + 1;
        let here = stored(&mut store, "192.0.2.3", &boot_id, deadline_here, minute);
        // Unknown boot (older database): at most what the wall clock says.
        let legacy = stored(&mut store, "192.0.2.4", "", 0, Duration::from_secs(40));

        let restored = restore_grants(&store, &boot_id).unwrap();
        let live: BTreeSet<u64> = restored.live.iter().map(|g| g.id).collect();
        assert_eq!(live, BTreeSet::from([carried, here, legacy]));
        assert_eq!(
            restored.ended.iter().map(|g| g.id).collect::<Vec<_>>(),
            [gone]
        );
        let left = |id| {
            restored
                .live
                .iter()
                .find(|g| g.id == id)
                .unwrap()
                .deadline
                .remaining()
        };
        assert!(
            left(carried) <= Duration::from_secs(30) && left(carried) > Duration::from_secs(29)
        );
        assert!(left(legacy) <= Duration::from_secs(40) && left(legacy) > Duration::from_secs(39));
        assert!(restored.live.iter().all(|g| g.boot_id == boot_id));
        assert_eq!(restored.carried.len(), 3, "carried, gone and legacy");
    }
}
