//! Requests held for approval: holding one (bounded per principal and in
//! all), approvers' decisions — the last approval grants through the same
//! path as an unheld request, the policy checked again then — and expiry of
//! requests nobody decided. Each is one store transaction with its audit
//! records, which also tell watchers (requesters and approvers).

use std::time::SystemTime;

use super::{
    Engine,
    lifecycle::{Approval, Caller, Now, Pending, audit_refusal, grant_request},
    now_ms,
};
use crate::{
    approvals::{ApprovalRequest, ApprovalState, Decision, approvals_needed},
    audit::{AGENT, Event, Kind},
    auth::Principal,
    clock::Deadline,
    config::Approvals,
    refusal::{Refusal, RefusalKind},
    store::Batch,
    validate,
};

/// The details every record about a held request carries, so that a
/// requester waiting for it can find them.
fn details(held: &ApprovalRequest, state: ApprovalState) -> serde_json::Value {
    serde_json::json!({
        "approval_request_id": held.id,
        "request_id": held.request.request_id,
        "requester": held.request.requester,
        "requested_by": held.principal,
        "approvals_needed": held.needed,
        "approvals": held.approvals(),
        "state": state.name(),
    })
}

/// Holds a validated request that needs `needed` approvals: stored
/// pending, audited for approvers. Refused when the caller, or the agent,
/// holds as many pending requests as allowed.
pub(super) fn hold(
    batch: &mut Batch<'_>,
    caller: Caller<'_>,
    now: SystemTime,
    needed: u8,
    limits: &Approvals,
) -> anyhow::Result<Pending> {
    let (mine, all) = batch.pending_counts(caller.principal)?;
    if mine >= limits.max_pending_per_principal || all >= limits.max_pending {
        return Ok(Pending::Refused(Refusal::new(
            RefusalKind::ResourceExhausted,
            format!(
                "too many requests wait for approval ({mine} of {} for {}, {all} of {} in all); \
                 wait for decisions",
                limits.max_pending_per_principal, caller.principal, limits.max_pending
            ),
        )));
    }
    let mut held = ApprovalRequest {
        id: 0,
        principal: caller.principal.to_owned(),
        request: caller.request.clone(),
        fingerprint: caller.fingerprint.to_owned(),
        needed,
        state: ApprovalState::Pending,
        created_at: now,
        expires_at: crate::time::truncate_ms(now + limits.pending_timeout),
        decided_at: None,
        reason: String::new(),
        decisions: Vec::new(),
        grants: Vec::new(),
    };
    held.id = batch.insert_approval_request(&held)?;
    batch.audit(
        Event::new(
            Kind::RequestPending,
            caller.principal,
            0,
            format!(
                "request {} (\"{}\") for {} waits for {needed} approvals, until {}",
                held.id,
                held.request.request_id,
                held.request.requester,
                humantime::format_rfc3339_seconds(held.expires_at)
            ),
        )
        .with_details(details(&held, ApprovalState::Pending)),
        now,
    )?;
    Ok(Pending::Held(Box::new(held), false))
}

impl Engine {
    /// An approver's approval or denial of request `id`. A refusal is
    /// audited and changes nothing.
    pub(super) fn decide(
        &mut self,
        caller: &Principal,
        id: u64,
        approve: bool,
        comment: &str,
    ) -> Result<ApprovalRequest, Refusal> {
        let decided = self.try_decide(caller, id, approve, comment);
        if let Err(refusal) = &decided {
            let verb = if approve { "approval" } else { "denial" };
            let refused = Event::new(
                Kind::DecisionRefused,
                &caller.name,
                0,
                format!(
                    "{verb} of request {id} by {} refused: {}",
                    caller.name, refusal.message
                ),
            )
            .with_details(serde_json::json!({
                "approval_request_id": id,
                "approve": approve,
                "code": format!("{:?}", refusal.kind),
            }));
            if let Err(e) = self.commit_events(vec![refused]) {
                tracing::error!("recording a refused decision: {e:#}");
            }
        }
        decided
    }

    fn try_decide(
        &mut self,
        caller: &Principal,
        id: u64,
        approve: bool,
        comment: &str,
    ) -> Result<ApprovalRequest, Refusal> {
        let field = if approve { "comment" } else { "reason" };
        validate::text(field, comment, validate::MAX_REASON_LEN).map_err(Refusal::invalid)?;
        if !approve && comment.trim().is_empty() {
            return Err(Refusal::invalid("a denial needs a reason"));
        }
        let held = self
            .store
            .approval_request(id)
            .map_err(|e| Refusal::unavailable("reading the request", e))?
            .ok_or_else(|| Refusal::new(RefusalKind::NotFound, format!("no request {id}")))?;
        held.check_decider(caller)?;
        let now = now_ms();
        // A rule made stricter since the request was held counts: never
        // fewer approvals than asked for then, more if the policy now
        // wants more. (A request the policy now refuses is refused at its
        // last approval, below.)
        let needed = held
            .request
            .validate(&self.policy, now)
            .map_or(held.needed, |specs| {
                held.needed.max(approvals_needed(&self.policy, &specs))
            });
        let decision = Decision {
            principal: caller.name.clone(),
            approved: approve,
            comment: comment.to_owned(),
            at: now,
        };
        let boot_now = Deadline::now();
        let limits_unenforceable = self.enforcement.connection_limits_unenforceable();
        let stored = (|| -> anyhow::Result<_> {
            let mut batch = self.store.batch()?;
            batch.add_decision(id, &decision)?;
            let mut after = held.clone();
            after.decisions.push(decision.clone());
            if needed > held.needed {
                batch.raise_approvals_needed(id, needed)?;
                after.needed = needed;
            }
            let mut granted = Vec::new();
            if !approve {
                batch.decide_request(id, ApprovalState::Denied, now, comment)?;
                batch.audit(
                    Event::new(
                        Kind::RequestDenied,
                        &caller.name,
                        0,
                        format!("request {id} denied by {}: {comment}", caller.name),
                    )
                    .with_details(details(&after, ApprovalState::Denied)),
                    now,
                )?;
            } else if after.approvals() < usize::from(needed) {
                batch.audit(
                    approved_event(caller, &after, ApprovalState::Pending, comment),
                    now,
                )?;
            } else {
                // The last approval: granted now, through the path every
                // request takes, against the policy as it is now.
                let outcome = grant_request(
                    &mut batch,
                    &self.policy,
                    Caller {
                        principal: &held.principal,
                        request: &held.request,
                        fingerprint: &held.fingerprint,
                    },
                    Now {
                        wall: now,
                        boot: boot_now,
                        boot_id: &self.boot_id,
                    },
                    limits_unenforceable.as_deref(),
                    Approval::Approved,
                )?;
                match outcome {
                    Pending::Granted(grants) => {
                        batch.decide_request(id, ApprovalState::Approved, now, "")?;
                        let mut event =
                            approved_event(caller, &after, ApprovalState::Approved, comment);
                        event.details["grants"] = grants.iter().map(|g| g.id).collect();
                        batch.audit(event, now)?;
                        granted = grants;
                    }
                    Pending::Refused(refusal) => {
                        let reason = format!("refused when approved: {}", refusal.message);
                        batch.decide_request(id, ApprovalState::Refused, now, &reason)?;
                        batch.audit(
                            approved_event(caller, &after, ApprovalState::Refused, comment),
                            now,
                        )?;
                        audit_refusal(&mut batch, &held.principal, &held.request, &refusal, now)?;
                    }
                    Pending::Replayed(_) | Pending::Held(..) => {
                        anyhow::bail!("an approved request was held or replayed")
                    }
                }
            }
            let decided = batch
                .approval_request(id)?
                .ok_or_else(|| anyhow::anyhow!("request {id} vanished"))?;
            Ok((batch.commit()?, granted, decided))
        })();
        let (records, granted, decided) =
            stored.map_err(|e| Refusal::unavailable("recording the decision", format!("{e:#}")))?;
        self.activate(&granted);
        self.publish(records);
        Ok(decided)
    }

    /// Closes the pending requests nobody decided in time, and audits it
    /// (the requester, watching, learns it).
    pub(super) fn expire_pending(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        let due = self.store.pending_due(now)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut batch = self.store.batch()?;
        for held in &due {
            let reason = format!(
                "not decided by {}",
                humantime::format_rfc3339_seconds(held.expires_at)
            );
            if batch.decide_request(held.id, ApprovalState::Expired, now, &reason)? {
                batch.audit(
                    Event::new(
                        Kind::RequestExpired,
                        AGENT,
                        0,
                        format!(
                            "request {} (\"{}\") of {} expired: {reason}, {} of {} approvals",
                            held.id,
                            held.request.request_id,
                            held.principal,
                            held.approvals(),
                            held.needed
                        ),
                    )
                    .with_details(details(held, ApprovalState::Expired)),
                    now,
                )?;
            }
        }
        let records = batch.commit()?;
        self.publish(records);
        Ok(())
    }
}

/// The record of one approval; `state` is the request's after it.
fn approved_event(
    caller: &Principal,
    after: &ApprovalRequest,
    state: ApprovalState,
    comment: &str,
) -> Event {
    let mut details = details(after, state);
    details["comment"] = comment.into();
    Event::new(
        Kind::RequestApproved,
        &caller.name,
        0,
        format!(
            "request {} approved by {} ({} of {}){}",
            after.id,
            caller.name,
            after.approvals(),
            after.needed,
            match state {
                ApprovalState::Approved => ": granted",
                ApprovalState::Refused => ": refused by the policy now",
                _ => "",
            }
        ),
    )
    .with_details(details)
}
