//! How grants begin and end: requests, revokes, expiry, and policy changes
//! that end the grants of removed ports. Each is one store transaction
//! (grant rows and their audit records together), then enforcement.

use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use super::{AccessOutcome, Engine, PolicyChange, Reply, RevokeOutcome, now_ms};
use crate::{
    approvals::{ApprovalRequest, approvals_needed},
    audit::{AGENT, Event, Kind},
    auth::Principal,
    clock::Deadline,
    grants::{ActiveGrant, Grant, GrantState},
    net::GrantTarget,
    policy::Policy,
    refusal::{Refusal, RefusalKind},
    request::AccessRequest,
    store::Batch,
    validate,
};

/// One request's outcome before the transaction commits.
pub(super) enum Pending {
    Refused(Refusal),
    Replayed(Vec<Grant>),
    Granted(Vec<Grant>),
    /// Held for approval (true: a retry of a request already held).
    Held(Box<ApprovalRequest>, bool),
}

impl Pending {
    /// This outcome as a retry of it within the same batch sees it.
    fn replayed(&self) -> Pending {
        match self {
            Pending::Granted(g) | Pending::Replayed(g) => Pending::Replayed(g.clone()),
            Pending::Held(held, _) => Pending::Held(held.clone(), true),
            Pending::Refused(_) => Pending::Replayed(Vec::new()),
        }
    }
}

/// Whether a request that needs approvals is held, or was approved now.
#[derive(Clone, Copy)]
pub(super) enum Approval<'a> {
    Hold(&'a crate::config::Approvals),
    Approved,
}

impl Engine {
    /// Makes newly created grants active and enforces them.
    pub(super) fn activate<'g>(&mut self, grants: impl IntoIterator<Item = &'g Grant>) {
        let mut touched = BTreeSet::new();
        for grant in grants {
            self.active.insert(grant.active());
            self.activity.note(grant);
            touched.insert(grant.target);
        }
        self.enforce(&touched);
    }

    /// Brings enforcement of `targets` in line after their grants changed.
    fn enforce(&mut self, targets: &BTreeSet<GrantTarget>) {
        if let Err(e) = self.enforcement.apply(targets, &self.active) {
            // The store is the truth; the next reconciliation retries.
            tracing::error!("programming enforcement (reconciliation will retry): {e:#}");
        }
    }

    /// Validates and records a batch of requests in one transaction, then
    /// programs enforcement and answers each.
    pub(super) fn request_access(
        &mut self,
        requests: Vec<(Principal, AccessRequest, Reply<AccessOutcome>)>,
    ) {
        if requests.is_empty() {
            return;
        }
        let now = now_ms();
        // The instant deadlines count from, read together with `now`.
        let boot_now = Deadline::now();
        let limits_unenforceable = self.enforcement.connection_limits_unenforceable();
        let mut outcomes: Vec<Pending> = Vec::with_capacity(requests.len());
        let result = (|| -> anyhow::Result<Vec<crate::audit::AuditRecord>> {
            let mut batch = self.store.batch()?;
            // (principal, id) first seen in this batch: (fingerprint, index
            // in outcomes). Idempotency keys are per principal.
            let mut in_batch: HashMap<(&str, &str), (String, usize)> = HashMap::new();
            for (principal, request, _) in &requests {
                let fingerprint = request.fingerprint();
                let key = (principal.name.as_str(), request.request_id.as_str());
                let outcome = match in_batch.get(&key) {
                    Some((seen, index)) => replay(seen, &fingerprint, &request.request_id, || {
                        outcomes[*index].replayed()
                    }),
                    None => {
                        if let Some(held) =
                            batch.approval_request_by_key(&principal.name, &request.request_id)?
                        {
                            let seen = held.fingerprint.clone();
                            replay(&seen, &fingerprint, &request.request_id, || {
                                Pending::Held(Box::new(held), true)
                            })
                        } else if let Some((seen, grants)) =
                            batch.request(&principal.name, &request.request_id)?
                        {
                            replay(&seen, &fingerprint, &request.request_id, || {
                                Pending::Replayed(grants)
                            })
                        } else {
                            let outcome = grant_request(
                                &mut batch,
                                &self.policy,
                                Caller {
                                    principal: &principal.name,
                                    request,
                                    fingerprint: &fingerprint,
                                },
                                Now {
                                    wall: now,
                                    boot: boot_now,
                                    boot_id: &self.boot_id,
                                },
                                limits_unenforceable.as_deref(),
                                Approval::Hold(&self.config.approvals),
                            )?;
                            if !matches!(outcome, Pending::Refused(_)) {
                                in_batch.insert(key, (fingerprint, outcomes.len()));
                            }
                            outcome
                        }
                    }
                };
                if let Pending::Refused(refusal) = &outcome {
                    audit_refusal(&mut batch, &principal.name, request, refusal, now)?;
                }
                outcomes.push(outcome);
            }
            Ok(batch.commit()?)
        })();
        let records = match result {
            Ok(records) => records,
            Err(e) => {
                let refusal = Refusal::unavailable("recording the request", format!("{e:#}"));
                for (_, _, reply) in requests {
                    let _ = reply.send(Err(refusal.clone()));
                }
                return;
            }
        };
        self.activate(outcomes.iter().flat_map(|outcome| match outcome {
            Pending::Granted(grants) => grants.as_slice(),
            _ => &[],
        }));
        self.publish(records);
        for ((_, _, reply), outcome) in requests.into_iter().zip(outcomes) {
            let _ = reply.send(match outcome {
                Pending::Refused(refusal) => Err(refusal),
                Pending::Replayed(grants) => Ok(AccessOutcome {
                    grants,
                    replayed: true,
                    approval: None,
                }),
                Pending::Granted(grants) => Ok(AccessOutcome {
                    grants,
                    replayed: false,
                    approval: None,
                }),
                Pending::Held(held, replayed) => Ok(AccessOutcome {
                    grants: held.grants.clone(),
                    replayed,
                    approval: Some(*held),
                }),
            });
        }
    }

    pub(super) fn revoke(
        &mut self,
        caller: &Principal,
        grant_id: u64,
        terminate: bool,
        reason: &str,
    ) -> Result<RevokeOutcome, Refusal> {
        validate::text("reason", reason, validate::MAX_REASON_LEN).map_err(Refusal::invalid)?;
        let principal = caller.name.as_str();
        if let Some(grant) = self.active.get(grant_id) {
            let owner = self
                .store
                .grant(grant.id)
                .map_err(|e| Refusal::unavailable("reading the grant", e))?
                .map(|g| g.principal)
                .unwrap_or_default();
            caller.require_owner_or_admin(&owner, grant_id)?;
        }
        let Some(revoked) = self.active.get(grant_id) else {
            return Err(match self.store.grant(grant_id) {
                Ok(Some(grant)) => Refusal::new(
                    RefusalKind::FailedPrecondition,
                    format!("grant {grant_id} already ended ({})", grant.state),
                ),
                Ok(None) => Refusal::new(RefusalKind::NotFound, format!("no grant {grant_id}")),
                Err(e) => Refusal::unavailable("reading the grant", e),
            });
        };
        let now = now_ms();
        let reason = if reason.trim().is_empty() {
            "no reason given"
        } else {
            reason
        };
        self.end_grants(
            &[revoked],
            GrantState::Revoked,
            |_| now,
            principal,
            &format!("revoked by {principal}: {reason}"),
        )
        .map_err(|e| Refusal::unavailable("recording the revoke", format!("{e:#}")))?;
        let mut ended = Vec::new();
        if terminate {
            ended = self
                .enforcement
                .terminate(&revoked, &self.active)
                .map_err(|e| Refusal::internal("terminating connections", format!("{e:#}")))?;
            let listed: Vec<String> = ended.iter().map(ToString::to_string).collect();
            self.commit_events(vec![
                Event::new(
                    Kind::ConnectionsTerminated,
                    principal,
                    grant_id,
                    format!(
                        "{} connections terminated with grant {grant_id} (opened under it, or from its source and under no other live grant)",
                        ended.len()
                    ),
                )
                .with_details(serde_json::json!({ "connections": listed })),
            ])
            .map_err(|e| Refusal::internal("recording the termination", format!("{e:#}")))?;
        }
        let grant = self
            .store
            .grant(grant_id)
            .map_err(|e| Refusal::internal("reading the grant", e))?
            .ok_or_else(|| Refusal::internal("reading the grant", "vanished"))?;
        Ok(RevokeOutcome {
            grant,
            connections_terminated: ended.len(),
        })
    }

    /// Ends grants whose deadline has passed on the boot clock, then their
    /// enforcer entries. The end recorded is the deadline as the wall clock
    /// shows it now.
    pub(super) fn expire_due(&mut self) -> anyhow::Result<()> {
        let due: Vec<ActiveGrant> = self
            .active
            .due(Deadline::now())
            .into_iter()
            .filter_map(|id| self.active.get(id))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let shown = self.store.expiry_shown(due.iter().map(|g| g.id))?;
        self.end_grants(
            &due,
            GrantState::Expired,
            |g| {
                let recorded = shown.get(&g.id).copied().unwrap_or_else(SystemTime::now);
                crate::time::truncate_ms(g.deadline.to_wall_near(recorded))
            },
            AGENT,
            "expired",
        )
    }

    /// Notes the limited grants the kernel reports used up (every
    /// connection they may open, opened): their entries are recomputed, so
    /// that the nftables element goes and another grant for the target, if
    /// any, takes the kernel entry; and it is audited.
    pub(super) fn note_used_up(&mut self) -> anyhow::Result<()> {
        let limited: Vec<(u64, u32)> = self.active.limited_in_use().collect();
        if limited.is_empty() {
            return Ok(());
        }
        let opened = self.enforcement.connections_opened()?;
        let mut touched = BTreeSet::new();
        let mut events = Vec::new();
        for (id, max) in limited {
            let opened = opened.get(&id).copied().unwrap_or(0);
            if opened < u64::from(max) {
                continue;
            }
            if let Some(target) = self.active.mark_used_up(id) {
                touched.insert(target);
                events.push(
                    Event::new(
                        Kind::GrantUsedUp,
                        AGENT,
                        id,
                        format!(
                            "grant {id} for {target} opened its {max} connections: no new ones"
                        ),
                    )
                    .with_details(serde_json::json!({
                        "max_connections": max,
                        "opened": opened,
                    })),
                );
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        self.enforce(&touched);
        self.commit_events(events)
    }

    /// Records `grants` as ended in `state`, removes them from the active
    /// set and updates enforcement.
    fn end_grants(
        &mut self,
        grants: &[ActiveGrant],
        state: GrantState,
        ended_at: impl Fn(&ActiveGrant) -> SystemTime,
        principal: &str,
        why: &str,
    ) -> anyhow::Result<()> {
        let kind = match state {
            GrantState::Expired => Kind::GrantExpired,
            GrantState::Revoked => Kind::GrantRevoked,
            GrantState::EndedByPolicy | GrantState::Active => Kind::GrantEndedByPolicy,
        };
        let mut batch = self.store.batch()?;
        for grant in grants {
            batch.end_grant(grant.id, state, ended_at(grant))?;
            batch.audit(
                Event::new(
                    kind,
                    principal,
                    grant.id,
                    format!("grant {} for {}: {why}", grant.id, grant.target),
                ),
                SystemTime::now(),
            )?;
        }
        let records = batch.commit()?;
        let mut touched = BTreeSet::new();
        for grant in grants {
            self.active.remove(grant.id);
            touched.insert(grant.target);
        }
        self.enforce(&touched);
        self.publish(records);
        Ok(())
    }

    /// Applies a policy change: validated whole, stored with the end of the
    /// grants on ports it no longer protects, then enforced. Connections
    /// already established to newly protected ports are kept open.
    pub(super) fn update_policy(
        &mut self,
        principal: &str,
        change: PolicyChange,
        expected_revision: u64,
    ) -> Result<Policy, Refusal> {
        if expected_revision != 0 && expected_revision != self.policy.revision {
            return Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!(
                    "policy is at revision {}, not {expected_revision}",
                    self.policy.revision
                ),
            ));
        }
        let rules = match change {
            PolicyChange::Replace(rules) => rules,
            PolicyChange::Upsert(rule) => self.policy.with_rule(rule),
            PolicyChange::Remove { port, protocol } => self.policy.without_rule(port, protocol)?,
        };
        Policy::validate_rules(&rules)?;
        if let Some(tls) = &self.config.api.tls {
            tls.check_policy(&rules)?;
        }
        if rules == self.policy.rules {
            return Ok(self.policy.clone());
        }
        let revision = self.policy.revision + 1;
        let old = std::mem::replace(&mut self.policy, Policy { rules, revision });
        let new_protected = self.policy.protected();
        let orphaned: Vec<ActiveGrant> = self
            .active
            .iter()
            .filter(|g| !new_protected.contains(&(g.target.protocol, g.target.port)))
            .collect();
        let stored = (|| -> anyhow::Result<Vec<crate::audit::AuditRecord>> {
            let mut batch = self.store.batch()?;
            batch.save_policy(&self.policy)?;
            batch.audit(
                Event::new(
                    Kind::PolicyChanged,
                    principal,
                    0,
                    format!("policy revision {} by {principal}", self.policy.revision),
                )
                .with_details(serde_json::json!({ "before": old, "after": self.policy })),
                SystemTime::now(),
            )?;
            Ok(batch.commit()?)
        })();
        match stored {
            Ok(records) => self.publish(records),
            Err(e) => {
                self.policy = old;
                return Err(Refusal::unavailable("storing the policy", format!("{e:#}")));
            }
        }
        let newly: BTreeSet<_> = new_protected
            .difference(&old.protected())
            .copied()
            .collect();
        if let Err(e) = self.enforcement.set_protected(&new_protected, &newly) {
            tracing::error!("protecting ports (reconciliation will retry): {e:#}");
        }
        if !orphaned.is_empty() {
            let now = now_ms();
            self.end_grants(
                &orphaned,
                GrantState::EndedByPolicy,
                |_| now,
                principal,
                "its port left the policy",
            )
            .map_err(|e| Refusal::internal("ending grants of removed ports", format!("{e:#}")))?;
        }
        Ok(self.policy.clone())
    }
}

/// A retry returns the first call's outcome; a different request under the
/// same id is refused.
fn replay(
    seen: &str,
    fingerprint: &str,
    request_id: &str,
    first: impl FnOnce() -> Pending,
) -> Pending {
    if seen == fingerprint {
        first()
    } else {
        Pending::Refused(Refusal::new(
            RefusalKind::AlreadyExists,
            format!("request_id {request_id:?} was already used for a different request"),
        ))
    }
}

/// Audits the refusal of `request`, whatever refused it (validation or a
/// reused request id).
pub(super) fn audit_refusal(
    batch: &mut Batch<'_>,
    principal: &str,
    request: &AccessRequest,
    refusal: &Refusal,
    now: SystemTime,
) -> anyhow::Result<()> {
    // What the caller sent is kept as a bounded, escaped excerpt: a refused
    // request may carry anything.
    let request_id = validate::excerpt(&request.request_id);
    batch.audit(
        Event::new(
            Kind::RequestRefused,
            principal,
            0,
            format!("request \"{request_id}\" refused: {}", refusal.message),
        )
        .with_details(serde_json::json!({
            "request_id": request_id,
            "requester": validate::excerpt(&request.requester),
            "code": format!("{:?}", refusal.kind),
        })),
        now,
    )?;
    Ok(())
}

/// Who asks for what.
#[derive(Clone, Copy)]
pub(super) struct Caller<'a> {
    pub principal: &'a str,
    pub request: &'a AccessRequest,
    pub fingerprint: &'a str,
}

/// The instant a batch of requests is granted at, on both clocks.
#[derive(Clone, Copy)]
pub(super) struct Now<'a> {
    pub wall: SystemTime,
    pub boot: Deadline,
    pub boot_id: &'a str,
}

/// Validates the caller's request and, if acceptable, inserts its grants
/// and audit records into `batch`. Each grant's deadline is fixed here, on
/// the boot clock: the duration from `now`. A limit on connections is
/// refused while `limits_unenforceable` says why it could not be kept. A
/// request whose ports need approvals is held (`Approval::Hold`) instead,
/// unless it was just approved.
pub(super) fn grant_request(
    batch: &mut Batch<'_>,
    policy: &Policy,
    caller: Caller<'_>,
    now: Now<'_>,
    limits_unenforceable: Option<&str>,
    approval: Approval<'_>,
) -> anyhow::Result<Pending> {
    let Caller {
        principal,
        request,
        fingerprint,
    } = caller;
    let specs = match request.validate(policy, now.wall) {
        Ok(specs) => specs,
        Err(refusal) => return Ok(Pending::Refused(refusal)),
    };
    if request.max_connections != 0
        && let Some(why) = limits_unenforceable
    {
        return Ok(Pending::Refused(Refusal::new(
            RefusalKind::FailedPrecondition,
            format!(
                "max_connections needs the XDP gate, which alone counts a grant's connections: {why}"
            ),
        )));
    }
    if let Approval::Hold(limits) = approval {
        let needed = approvals_needed(policy, &specs);
        if needed > 0 {
            return super::approvals::hold(batch, caller, now.wall, needed, limits);
        }
    }
    let mut grants = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut grant = Grant {
            id: 0,
            request_id: request.request_id.clone(),
            target: spec.target,
            requester: request.requester.clone(),
            justification: request.justification.clone(),
            ticket: request.ticket.clone(),
            principal: principal.to_owned(),
            created_at: now.wall,
            granted: spec.duration,
            deadline: now.boot.plus(spec.duration),
            boot_id: now.boot_id.to_owned(),
            expires_at: crate::time::truncate_ms(now.wall + spec.duration),
            state: GrantState::Active,
            ended_at: None,
            max_connections: request.max_connections,
            used_up: false,
        };
        grant.id = batch.insert_grant(&grant, fingerprint)?;
        batch.audit_grant_created(&grant, principal, now.wall)?;
        grants.push(grant);
    }
    Ok(Pending::Granted(grants))
}
