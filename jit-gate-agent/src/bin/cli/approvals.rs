//! Access requests held for approval: `requests`, `approve`, `deny`, how a
//! held request is shown, and `request --wait`, which follows the request's
//! audit events (`WatchEvents`) until it is decided or expires.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use clap::Args;
use futures_util::StreamExt as _;
use jit_gate_agent::proto::{
    self, AccessRequest, AccessResponse, ApprovalRequest, ApproveRequestRequest,
    DenyRequestRequest, EventKind, ListRequestsRequest, ListRequestsResponse, RequestFilter,
    WatchEventsRequest, access_request::Lifetime,
};
use serde_json::{Value, json};

use crate::{
    commands::Outcome,
    connect::{Fleet, Reply},
    convert,
    output::{Render, grants_table, plural, port, print_line, printable, report, table, time},
};

#[derive(Debug, Args)]
pub(crate) struct RequestsArgs {
    /// Also requests already decided or expired (newest first).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ApproveArgs {
    /// The request's id, as `request` and `requests` show it.
    pub id: u64,
    /// Recorded with the approval.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct DenyArgs {
    /// The request's id, as `request` and `requests` show it.
    pub id: u64,
    /// Why (required; recorded and shown to the requester).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

/// How `request --wait` ended without a grant; each its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    Denied,
    Expired,
    /// Fully approved, but the policy refused it then.
    Refused,
    /// Still pending when --wait-timeout ran out.
    TimedOut,
}

impl WaitEnd {
    pub(crate) fn exit_status(self) -> u8 {
        match self {
            WaitEnd::Denied => 4,
            WaitEnd::Expired => 5,
            WaitEnd::Refused => 6,
            WaitEnd::TimedOut => 7,
        }
    }

    /// The end a request in `state` has reached (`None`: granted or still
    /// pending).
    fn of_state(state: &str) -> Option<Result<(), WaitEnd>> {
        match state {
            "approved" => Some(Ok(())),
            "denied" => Some(Err(WaitEnd::Denied)),
            "expired" => Some(Err(WaitEnd::Expired)),
            "refused" => Some(Err(WaitEnd::Refused)),
            _ => None,
        }
    }
}

pub(crate) async fn list(fleet: &Fleet, args: &RequestsArgs, json: bool) -> bool {
    let request = ListRequestsRequest {
        filter: if args.all {
            RequestFilter::All
        } else {
            RequestFilter::Pending
        } as i32,
        page_size: 0,
        page_token: String::new(),
    };
    report(&fleet.call(request, all_pages).await, json)
}

/// Every page of requests, one after the other.
async fn all_pages(
    mut client: crate::connect::Client,
    mut request: ListRequestsRequest,
) -> Result<tonic::Response<ListRequestsResponse>, tonic::Status> {
    let mut all = ListRequestsResponse::default();
    loop {
        let page = client.list_requests(request.clone()).await?.into_inner();
        all.requests.extend(page.requests);
        if page.next_page_token.is_empty() {
            return Ok(tonic::Response::new(all));
        }
        request.page_token = page.next_page_token;
    }
}

pub(crate) async fn approve(fleet: &Fleet, args: ApproveArgs, json: bool) -> bool {
    let request = ApproveRequestRequest {
        id: args.id,
        comment: args.comment.unwrap_or_default(),
    };
    report(
        &fleet
            .call(
                request,
                |mut c, r| async move { c.approve_request(r).await },
            )
            .await,
        json,
    )
}

pub(crate) async fn deny(fleet: &Fleet, args: DenyArgs, json: bool) -> bool {
    let request = DenyRequestRequest {
        id: args.id,
        reason: args.reason,
    };
    report(
        &fleet
            .call(request, |mut c, r| async move { c.deny_request(r).await })
            .await,
        json,
    )
}

/// `request --wait`: watches the agent's approval events first (so no
/// decision falls between the answer and the watch), sends the request,
/// then follows the events of the request it opened until it is decided,
/// it expires, or `timeout` runs out.
pub(crate) async fn request_and_wait(
    fleet: &Fleet,
    request: AccessRequest,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<Outcome> {
    let [agent] = fleet.agents.as_slice() else {
        anyhow::bail!("--wait follows one agent: give one --agent");
    };
    let started = Instant::now();
    let mut client = fleet
        .connect(agent)
        .await
        .map_err(|e| anyhow::anyhow!("{agent}: {e}"))?;
    let watch = WatchEventsRequest {
        after_sequence: None,
        kinds: [
            EventKind::RequestApproved,
            EventKind::RequestDenied,
            EventKind::RequestExpired,
        ]
        .iter()
        .map(|k| *k as i32)
        .collect(),
    };
    let mut events = client
        .watch_events(watch)
        .await
        .map_err(|e| anyhow::anyhow!("{agent}: watching events: {}", e.message()))?
        .into_inner();
    let answer = tokio::time::timeout(fleet.timeout, client.request_access(request))
        .await
        .map_err(|_| anyhow::anyhow!("{agent}: no answer within {:?}", fleet.timeout))?
        .map(tonic::Response::into_inner);
    let latency = started.elapsed();
    let response = match answer {
        Ok(response) => response,
        Err(status) => {
            report::<AccessResponse>(
                &[Reply {
                    agent: agent.clone(),
                    result: Err(status.into()),
                    latency,
                }],
                json,
            );
            return Ok(Outcome::Failure);
        }
    };
    report(
        &[Reply {
            agent: agent.clone(),
            result: Ok(response.clone()),
            latency,
        }],
        json,
    );
    let Some(held) = response.approval else {
        return Ok(Outcome::Success);
    };
    if let Some(end) = WaitEnd::of_state(&convert::approval_state(held.state)) {
        return Ok(outcome(end));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(next) = next else {
            eprintln!(
                "request {} is still pending after {}",
                held.id,
                humantime::format_duration(timeout)
            );
            return Ok(Outcome::NotGranted(WaitEnd::TimedOut));
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(status)) => anyhow::bail!("{agent}: the event stream ended: {status}"),
            None => anyhow::bail!("{agent}: the event stream ended"),
        };
        let details: Value = serde_json::from_str(&event.details_json).unwrap_or_default();
        if details["approval_request_id"] != json!(held.id) {
            continue;
        }
        print_line(
            agent,
            &Ok::<_, crate::connect::CallError>(event),
            json,
            false,
        );
        if let Some(end) = details["state"].as_str().and_then(WaitEnd::of_state) {
            return Ok(outcome(end));
        }
    }
}

fn outcome(end: Result<(), WaitEnd>) -> Outcome {
    match end {
        Ok(()) => Outcome::Success,
        Err(end) => Outcome::NotGranted(end),
    }
}

/// A held request as JSON.
pub(crate) fn json(r: &ApprovalRequest) -> Value {
    let request = r.request.clone().unwrap_or_default();
    let (duration, until) = match &request.lifetime {
        Some(Lifetime::Duration(d)) => (convert::duration(Some(d)), Value::Null),
        Some(Lifetime::EndTime(t)) => (Value::Null, convert::timestamp(Some(t))),
        None => (Value::Null, Value::Null),
    };
    json!({
        "id": r.id,
        "state": convert::approval_state(r.state),
        "principal": r.principal,
        "request_id": request.request_id,
        "requester": request.requester,
        "justification": request.justification,
        "ticket": request.ticket,
        "ports": request.ports.iter().map(|p| json!({
            "port": p.port,
            "protocol": convert::protocol(p.protocol),
            "source": p.source,
        })).collect::<Vec<_>>(),
        "duration": duration,
        "until": until,
        "max_connections": request.max_connections,
        "approvals_needed": r.approvals_needed,
        "decisions": r.decisions.iter().map(|d| json!({
            "principal": d.principal,
            "approved": d.approved,
            "comment": d.comment,
            "at": convert::timestamp(d.at.as_ref()),
        })).collect::<Vec<_>>(),
        "created_at": convert::timestamp(r.created_at.as_ref()),
        "expires_at": convert::timestamp(r.expires_at.as_ref()),
        "decided_at": convert::timestamp(r.decided_at.as_ref()),
        "reason": r.reason,
        "grants": convert::grants(&r.grants),
    })
}

fn approvals(r: &ApprovalRequest) -> usize {
    r.decisions.iter().filter(|d| d.approved).count()
}

/// `22/tcp from 192.0.2.7, 3389 from 192.0.2.7`.
fn ports(request: &AccessRequest) -> String {
    let ports: Vec<String> = request
        .ports
        .iter()
        .map(|p| format!("{} from {}", port(p.port, p.protocol), printable(&p.source)))
        .collect();
    ports.join(", ")
}

impl Render for ApprovalRequest {
    fn json(&self) -> Value {
        json(self)
    }

    fn summary(&self) -> String {
        let request = self.request.clone().unwrap_or_default();
        format!(
            "request #{} {} ({} of {} approvals): {} for {}, asked by {}",
            self.id,
            convert::approval_state(self.state),
            approvals(self),
            self.approvals_needed,
            ports(&request),
            printable(&request.requester),
            printable(&self.principal),
        )
    }

    fn detail(&self) -> String {
        let mut out = format!("{}\n", self.summary());
        if self.state == proto::ApprovalState::Pending as i32 {
            let _ = writeln!(
                out,
                "waits for approval until {}",
                time(self.expires_at.as_ref())
            );
        }
        if !self.reason.is_empty() {
            let _ = writeln!(out, "reason: {}", printable(&self.reason));
        }
        for d in &self.decisions {
            let _ = writeln!(
                out,
                "  {} by {} at {}{}",
                if d.approved { "approved" } else { "denied" },
                printable(&d.principal),
                time(d.at.as_ref()),
                match d.comment.as_str() {
                    "" => String::new(),
                    comment => format!(": {}", printable(comment)),
                }
            );
        }
        if !self.grants.is_empty() {
            let _ = write!(out, "\n{}\n", grants_table(&self.grants));
        }
        out
    }
}

impl Render for ListRequestsResponse {
    fn json(&self) -> Value {
        json!({ "requests": self.requests.iter().map(json).collect::<Vec<_>>() })
    }

    fn summary(&self) -> String {
        let pending = self
            .requests
            .iter()
            .filter(|r| r.state == proto::ApprovalState::Pending as i32)
            .count();
        format!(
            "{} ({pending} pending)",
            plural(self.requests.len(), "request", "requests")
        )
    }

    fn detail(&self) -> String {
        let mut rows = table(&[
            "ID",
            "STATE",
            "APPROVALS",
            "PORTS",
            "REQUESTER",
            "ASKED BY",
            "CREATED",
            "EXPIRES",
        ]);
        for r in &self.requests {
            let request = r.request.clone().unwrap_or_default();
            rows.add_row(vec![
                r.id.to_string(),
                convert::approval_state(r.state),
                format!("{}/{}", approvals(r), r.approvals_needed),
                ports(&request),
                printable(&request.requester),
                printable(&r.principal),
                time(r.created_at.as_ref()),
                time(r.expires_at.as_ref()),
            ]);
        }
        format!("{rows}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_ends_have_distinct_exit_statuses() {
        let ends = [
            WaitEnd::Denied,
            WaitEnd::Expired,
            WaitEnd::Refused,
            WaitEnd::TimedOut,
        ];
        let mut statuses: Vec<u8> = ends.iter().map(|e| e.exit_status()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), ends.len());
        // 1 (a failed call), 2 (usage) and 3 (audit broken) are taken.
        assert!(statuses.iter().all(|s| *s > 3));
        assert_eq!(WaitEnd::of_state("approved"), Some(Ok(())));
        assert_eq!(WaitEnd::of_state("denied"), Some(Err(WaitEnd::Denied)));
        assert_eq!(WaitEnd::of_state("pending"), None);
    }
}
