//! The engine's side of fleet mode: the fleet link's state (for status and
//! metrics), its progress persisted in the store, ending a fleet grant by
//! its id, and the fleet grants still live (to reconcile a snapshot).

use std::time::SystemTime;

use super::{Command, Engine, Reply, RevokeOutcome};
use crate::{auth::Principal, refusal::Refusal, store::FleetCursor};

/// Principals of fleet grants start with this (`fleet:<broker>`).
pub const FLEET_PRINCIPAL_PREFIX: &str = "fleet:";

/// The fleet link as last reported by the fleet task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetReport {
    pub host: String,
    pub connected: bool,
    /// Since when `connected` holds.
    pub since: SystemTime,
    /// Why the last connection or call failed (empty if none did).
    pub last_error: String,
    /// The last revision whose events were applied and answered.
    pub applied_revision: i64,
    pub grants_applied: u64,
    pub grants_refused: u64,
}

/// The fleet's engine commands.
pub enum FleetCommand {
    /// Where `host`'s watch resumes.
    Cursor {
        host: String,
        reply: Reply<Option<FleetCursor>>,
    },
    /// The link's state, and the progress to persist if any.
    Progress {
        report: FleetReport,
        cursor: Option<FleetCursor>,
        reply: Reply<()>,
    },
    /// Ends the live grants a fleet grant created (its request id).
    Revoke {
        principal: Principal,
        request_id: String,
        terminate: bool,
        reason: String,
        reply: Reply<Vec<RevokeOutcome>>,
    },
    /// (principal, request id) of every live fleet grant.
    Live(Reply<Vec<(String, String)>>),
}

impl From<FleetCommand> for Command {
    fn from(command: FleetCommand) -> Command {
        Command::Fleet(command)
    }
}

impl Engine {
    pub(super) fn fleet(&mut self, command: FleetCommand) {
        match command {
            FleetCommand::Cursor { host, reply } => {
                let read = self
                    .store
                    .fleet_cursor(&host)
                    .map_err(|e| Refusal::unavailable("reading fleet progress", e));
                let _ = reply.send(read);
            }
            FleetCommand::Progress {
                report,
                cursor,
                reply,
            } => {
                let saved = match cursor {
                    Some(cursor) => self.save_fleet_cursor(&report.host, cursor),
                    None => Ok(()),
                };
                self.fleet_report = Some(report);
                let _ = reply.send(saved);
            }
            FleetCommand::Revoke {
                principal,
                request_id,
                terminate,
                reason,
                reply,
            } => {
                let _ =
                    reply.send(self.revoke_request(&principal, &request_id, terminate, &reason));
            }
            FleetCommand::Live(reply) => {
                let live = self
                    .store
                    .active_grants()
                    .map(|grants| {
                        grants
                            .into_iter()
                            .filter(|g| g.principal.starts_with(FLEET_PRINCIPAL_PREFIX))
                            .map(|g| (g.principal, g.request_id))
                            .collect()
                    })
                    .map_err(|e| Refusal::unavailable("listing fleet grants", e));
                let _ = reply.send(live);
            }
        }
    }

    fn save_fleet_cursor(&mut self, host: &str, cursor: FleetCursor) -> Result<(), Refusal> {
        let unavailable = |e| Refusal::unavailable("recording fleet progress", e);
        let mut batch = self.store.batch().map_err(unavailable)?;
        batch
            .set_fleet_cursor(host, cursor, crate::time::to_ms(SystemTime::now()))
            .map_err(unavailable)?;
        batch.commit().map_err(unavailable)?;
        Ok(())
    }

    /// Revokes every live grant of `principal`'s request `request_id`
    /// (none live: nothing to do).
    fn revoke_request(
        &mut self,
        principal: &Principal,
        request_id: &str,
        terminate: bool,
        reason: &str,
    ) -> Result<Vec<RevokeOutcome>, Refusal> {
        let grants = self
            .store
            .request(&principal.name, request_id)
            .map_err(|e| Refusal::unavailable("reading the request's grants", e))?
            .map(|(_, grants)| grants)
            .unwrap_or_default();
        grants
            .iter()
            .filter(|grant| self.active.get(grant.id).is_some())
            .map(|grant| grant.id)
            .collect::<Vec<_>>()
            .into_iter()
            .map(|id| self.revoke(principal, id, terminate, reason))
            .collect()
    }
}
