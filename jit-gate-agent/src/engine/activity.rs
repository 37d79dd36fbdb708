//! Each port's recent history as `GetStatus` (and so every metrics scrape)
//! shows it: grants created in the last 7 days, counted by the minute, and
//! the latest grant. Read from the store once at start and kept up as
//! grants are created, so a status costs the engine nothing per grant:
//! asking the store each time read every grant ever written (0.7 s at
//! 1,000,000 grants, with every other call waiting).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use crate::{
    grants::Grant,
    net::Protocol,
    store::{ACTIVITY_MINUTE_MS, LastAccess, Store, StoreError},
    time::to_ms,
};

/// How far back a status counts grants.
const WINDOW: Duration = Duration::from_hours(168);

#[derive(Debug, Default)]
pub(super) struct PortActivity {
    ports: BTreeMap<(Protocol, u16), History>,
}

#[derive(Debug, Default)]
struct History {
    /// Grants created, by the minute since the epoch.
    by_minute: BTreeMap<i64, u32>,
    /// What a status shows of the latest grant (every grant noted is
    /// newer than all before it).
    latest: Option<LastAccess>,
}

/// The minute `at` falls in.
fn minute(at: SystemTime) -> i64 {
    to_ms(at).div_euclid(ACTIVITY_MINUTE_MS)
}

/// The first minute counted at `now`.
fn first_minute(now: SystemTime) -> i64 {
    minute(now.checked_sub(WINDOW).unwrap_or(SystemTime::UNIX_EPOCH))
}

impl PortActivity {
    /// Every port's history as the store has it at `now`.
    pub(super) fn load(store: &Store, now: SystemTime) -> Result<PortActivity, StoreError> {
        let mut ports = BTreeMap::new();
        for port in store.port_activity(now.checked_sub(WINDOW).unwrap_or(now))? {
            ports.insert(
                (port.protocol, port.port),
                History {
                    by_minute: port.by_minute.into_iter().collect(),
                    latest: Some(port.last),
                },
            );
        }
        Ok(PortActivity { ports })
    }

    /// Notes a grant just created (so the latest); forgets minutes past
    /// the window.
    pub(super) fn note(&mut self, grant: &Grant) {
        let history = self
            .ports
            .entry((grant.target.protocol, grant.target.port))
            .or_default();
        *history
            .by_minute
            .entry(minute(grant.created_at))
            .or_default() += 1;
        let first = first_minute(grant.created_at);
        if history
            .by_minute
            .first_key_value()
            .is_some_and(|(m, _)| *m < first)
        {
            history.by_minute = history.by_minute.split_off(&first);
        }
        history.latest = Some(LastAccess {
            at: grant.created_at,
            requester: grant.requester.clone(),
            principal: grant.principal.clone(),
        });
    }

    /// Grants on (`protocol`, `port`) created within `WINDOW` before `now`
    /// (its first minute counted whole), and the latest grant.
    pub(super) fn of(
        &self,
        protocol: Protocol,
        port: u16,
        now: SystemTime,
    ) -> (u32, Option<LastAccess>) {
        let Some(history) = self.ports.get(&(protocol, port)) else {
            return (0, None);
        };
        let recent = history
            .by_minute
            .range(first_minute(now)..)
            .map(|(_, count)| *count)
            .sum();
        (recent, history.latest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{grant, temp_db};

    fn created(id: u64, port: u16, requester: &str, at: SystemTime) -> Grant {
        let mut g = grant(&format!("r{id}"), "192.0.2.7/32");
        g.id = id;
        g.target.port = port;
        g.requester = requester.into();
        g.created_at = at;
        g
    }

    #[test]
    fn a_port_counts_the_grants_of_the_window_and_names_the_latest() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let (_dir, mut store) = temp_db();
        let mut batch = store.batch().unwrap();
        for (age_hours, requester) in [(200, "old"), (100, "stored")] {
            let g = created(0, 22, requester, now - Duration::from_hours(age_hours));
            batch.insert_grant(&g, "fp").unwrap();
        }
        batch.commit().unwrap();
        let mut activity = PortActivity::load(&store, now).unwrap();
        assert_eq!(
            activity.of(Protocol::Tcp, 22, now).0,
            1,
            "the stored one in the window"
        );
        assert_eq!(
            activity.of(Protocol::Tcp, 22, now).1.unwrap().requester,
            "stored"
        );
        assert_eq!(activity.of(Protocol::Tcp, 3389, now), (0, None));

        activity.note(&created(10, 22, "alice", now - Duration::from_mins(5)));
        activity.note(&created(11, 22, "bob", now));
        activity.note(&created(12, 3389, "carol", now));
        let (count, latest) = activity.of(Protocol::Tcp, 22, now);
        assert_eq!(count, 3);
        assert_eq!(latest.unwrap().requester, "bob");
        assert_eq!(activity.of(Protocol::Tcp, 3389, now).0, 1);
        assert_eq!(activity.of(Protocol::Udp, 22, now), (0, None));

        // 70 hours on, the stored grant (100 h old then) has left the window.
        let later = now + Duration::from_hours(70);
        assert_eq!(activity.of(Protocol::Tcp, 22, later).0, 2);
        activity.note(&created(13, 22, "dave", later));
        assert_eq!(activity.of(Protocol::Tcp, 22, later).0, 3);
        assert_eq!(
            activity.ports[&(Protocol::Tcp, 22)].by_minute.len(),
            3,
            "minutes past the window forgotten"
        );
    }
}
