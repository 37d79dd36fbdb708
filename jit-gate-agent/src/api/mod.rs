//! The gRPC service: authenticates the caller, converts the wire types and
//! hands the call to the engine (reads of the audit log go to a read-only
//! store connection). It never touches kernel state itself.

mod gate;
pub mod server;
mod streams;

use std::sync::{Arc, RwLock};

use ed25519_dalek::VerifyingKey;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub use gate::{Gate, WireErrorsLayer};
use streams::{EventStream, Plan, StreamLimits};

use crate::{
    auth::{Role, UidRole},
    checkpoint::{Checkpoint, verify_log},
    config::Api as ApiConfig,
    engine::{Command, EngineHandle, PolicyChange},
    proto::{self, jit_gate_server::JitGate},
    reload::Reloader,
    store::{AuditFilter, AuditReader},
    wire::{self as convert, status},
};

/// A method's gRPC path, spelled out only when a refusal is recorded.
struct MethodPath<'a>(&'a str);

impl std::fmt::Display for MethodPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/jitgate.v1.JitGate/{}", self.0)
    }
}

/// Grants per `ListGrants` page unless the caller asks; at most `MAX_PAGE`.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Requests in one `RequestAccessBatch` at most.
const MAX_BATCH_REQUESTS: usize = 1000;
/// Records read at once when verifying the log.
const VERIFY_PAGE: u32 = 1000;

pub struct Service {
    engine: EngineHandle,
    gate: Arc<Gate>,
    reader: AuditReader,
    public_key: VerifyingKey,
    limits: Arc<StreamLimits>,
    reloader: Arc<Reloader>,
    /// Set when the server stops: event streams end, since a graceful
    /// shutdown waits for open calls and a watcher's never ends by itself.
    stopping: watch::Sender<bool>,
}

impl Service {
    pub fn new(
        engine: EngineHandle,
        principals: Arc<RwLock<Vec<UidRole>>>,
        reader: AuditReader,
        public_key: VerifyingKey,
        api: &ApiConfig,
        reloader: Arc<Reloader>,
    ) -> Self {
        Service {
            gate: Arc::new(Gate::new(principals, engine.clone())),
            engine,
            reader,
            public_key,
            limits: StreamLimits::new(api.max_streams_per_principal, api.stream_stall_timeout),
            reloader,
            stopping: watch::Sender::new(false),
        }
    }

    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    fn authorize<T>(
        &self,
        request: &Request<T>,
        method: &str,
        needed: Role,
    ) -> Result<crate::auth::Principal, Status> {
        self.gate
            .authorize(request.extensions(), &MethodPath(method), needed)
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(crate::engine::Reply<T>) -> Command,
    ) -> Result<T, Status> {
        self.engine.call(command).await.map_err(status)
    }

    /// `result` of a change `caller` asked for by `method`, its refusal
    /// recorded like every refused call (access requests are audited by the
    /// engine itself, with the request they refused).
    fn recorded<T>(
        &self,
        caller: &str,
        method: &str,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        result.inspect_err(|refusal| {
            self.gate
                .record_refusal(caller, &format!("/jitgate.v1.JitGate/{method}"), refusal);
        })
    }

    /// Opens an event stream for `principal`, within its stream limit.
    fn stream(
        &self,
        principal: &crate::auth::Principal,
        plan: Plan,
    ) -> Result<Response<EventStream>, Status> {
        let slot = self.limits.acquire(&principal.name)?;
        Ok(Response::new(streams::open(
            plan,
            self.reader.clone(),
            self.limits.clone(),
            slot,
            self.stopping.subscribe(),
        )))
    }

    /// An approval (`approve`) or denial of request `id`; the engine
    /// records refused ones itself.
    async fn decide(
        &self,
        principal: crate::auth::Principal,
        id: u64,
        approve: bool,
        comment: String,
    ) -> Result<Response<proto::ApprovalRequest>, Status> {
        let decided = self
            .call(|reply| Command::Decide {
                principal,
                id,
                approve,
                comment,
                reply,
            })
            .await?;
        Ok(Response::new(convert::approval_request(&decided)))
    }

    fn public_hex(&self) -> String {
        hex::encode(self.public_key.as_bytes())
    }

    async fn signed_head(&self) -> Result<proto::AuditCheckpoint, Status> {
        let checkpoint = self.call(Command::Checkpoint).await?;
        Ok(convert::checkpoint(&checkpoint, &self.public_hex()))
    }
}

/// A page size asked for: 0 is the default, over `MAX_PAGE` is refused.
fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "page_size {n} is over the maximum of {MAX_PAGE}; page with page_token"
        ))),
    }
}

/// The id a page starts below (`None`: the first page).
fn page_token(token: &str) -> Result<Option<u64>, Status> {
    match token {
        "" => Ok(None),
        token => token.parse::<u64>().map(Some).map_err(|_| {
            Status::invalid_argument("page_token is not one this agent gave (next_page_token)")
        }),
    }
}

/// Cuts `items` (newest first, one more than a page asked for) to the page
/// and returns the token of the next page, empty when none follows.
fn next_page<T>(items: &mut Vec<T>, page_size: u32, id: impl Fn(&T) -> u64) -> String {
    let more = items.len() > page_size as usize;
    items.truncate(page_size as usize);
    match items.last() {
        Some(last) if more => id(last).to_string(),
        _ => String::new(),
    }
}

/// Kinds named on the wire; UNSPECIFIED and unknown values are refused.
fn kinds(wire: &[i32]) -> Result<Vec<crate::audit::Kind>, Status> {
    wire.iter()
        .map(|k| {
            convert::kind_from_wire(*k)
                .ok_or_else(|| Status::invalid_argument(format!("unknown event kind {k}")))
        })
        .collect()
}

fn ms(at: Option<prost_types::Timestamp>, field: &str) -> Result<Option<i64>, Status> {
    at.map(|t| {
        std::time::SystemTime::try_from(t)
            .map(crate::time::to_ms)
            .map_err(|_| Status::invalid_argument(format!("{field} is not a valid time")))
    })
    .transpose()
}

#[tonic::async_trait]
impl JitGate for Service {
    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::Status>, Status> {
        self.authorize(&request, "GetStatus", Role::Auditor)?;
        let report = self.call(Command::Status).await?;
        Ok(Response::new(convert::status_report(&report)))
    }

    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        self.authorize(&request, "GetPolicy", Role::Auditor)?;
        let policy = self.call(Command::Policy).await?;
        Ok(Response::new(convert::policy_to_wire(&policy)))
    }

    async fn update_policy(
        &self,
        request: Request<proto::UpdatePolicyRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        let principal = self.authorize(&request, "UpdatePolicy", Role::Admin)?;
        let caller = principal.name.clone();
        let update = request.into_inner();
        let policy = async {
            let change = match update.change {
                None => return Err(Status::invalid_argument("no change given")),
                Some(proto::update_policy_request::Change::Replace(policy)) => {
                    PolicyChange::Replace(convert::rules_from_wire(&policy)?)
                }
                Some(proto::update_policy_request::Change::UpsertRule(rule)) => {
                    PolicyChange::Upsert(convert::rule_from_wire(&rule, "upsert_rule")?)
                }
                Some(proto::update_policy_request::Change::RemoveRule(key)) => {
                    let (port, protocol) = convert::rule_key(&key)?;
                    PolicyChange::Remove { port, protocol }
                }
            };
            self.call(|reply| Command::UpdatePolicy {
                principal,
                change,
                expected_revision: update.expected_revision,
                reply,
            })
            .await
        }
        .await;
        let policy = self.recorded(&caller, "UpdatePolicy", policy)?;
        Ok(Response::new(convert::policy_to_wire(&policy)))
    }

    async fn request_access(
        &self,
        request: Request<proto::AccessRequest>,
    ) -> Result<Response<proto::AccessResponse>, Status> {
        let principal = self.authorize(&request, "RequestAccess", Role::Broker)?;
        let access = convert::access_request(request.into_inner());
        let outcome = self
            .call(|reply| Command::RequestAccess {
                principal,
                request: access,
                reply,
            })
            .await?;
        Ok(Response::new(convert::access_response(&outcome)))
    }

    async fn request_access_batch(
        &self,
        request: Request<proto::AccessBatchRequest>,
    ) -> Result<Response<proto::AccessBatchResponse>, Status> {
        let principal = self.authorize(&request, "RequestAccessBatch", Role::Broker)?;
        let requests = request.into_inner().requests;
        if requests.is_empty() || requests.len() > MAX_BATCH_REQUESTS {
            let refusal = Status::invalid_argument(format!(
                "the batch holds {} requests, 1 to {MAX_BATCH_REQUESTS}",
                requests.len()
            ));
            return self.recorded(&principal.name, "RequestAccessBatch", Err(refusal));
        }
        // All sent before any is awaited, so the engine records those
        // waiting together in one transaction, as it does concurrent calls.
        let answers = requests.into_iter().map(|access| {
            self.engine.call(|reply| Command::RequestAccess {
                principal: principal.clone(),
                request: convert::access_request(access),
                reply,
            })
        });
        let results = futures_util::future::join_all(answers).await;
        Ok(Response::new(proto::AccessBatchResponse {
            results: results.into_iter().map(convert::access_result).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<proto::RevokeGrantRequest>,
    ) -> Result<Response<proto::RevokeGrantResponse>, Status> {
        let principal = self.authorize(&request, "RevokeGrant", Role::Broker)?;
        let caller = principal.name.clone();
        let revoke = request.into_inner();
        let outcome = self
            .call(|reply| Command::Revoke {
                principal,
                grant_id: revoke.grant_id,
                terminate: revoke.terminate_connections,
                reason: revoke.reason,
                reply,
            })
            .await;
        let outcome = self.recorded(&caller, "RevokeGrant", outcome)?;
        Ok(Response::new(proto::RevokeGrantResponse {
            grant: Some(convert::grant(&outcome.grant)),
            connections_terminated: u32::try_from(outcome.connections_terminated)
                .unwrap_or(u32::MAX),
        }))
    }

    async fn list_grants(
        &self,
        request: Request<proto::ListGrantsRequest>,
    ) -> Result<Response<proto::ListGrantsResponse>, Status> {
        self.authorize(&request, "ListGrants", Role::Auditor)?;
        let list = request.into_inner();
        let port = match list.port {
            0 => None,
            p => Some(convert::port(p, "port")?),
        };
        let page_size = match (list.page_size, list.limit) {
            // The deprecated `limit` asked for up to 10,000 at once: the
            // largest page, with a next_page_token when more follow.
            (0, limit) if limit != 0 => limit.min(MAX_PAGE),
            (n, _) => page_size(n)?,
        };
        let before = page_token(&list.page_token)?;
        // One more than asked for tells whether another page follows.
        let mut grants = self
            .call(|reply| Command::ListGrants {
                include_ended: list.include_ended,
                port,
                before,
                limit: page_size + 1,
                reply,
            })
            .await?;
        let next_page_token = next_page(&mut grants, page_size, |g| g.id);
        Ok(Response::new(proto::ListGrantsResponse {
            grants: grants.iter().map(convert::grant).collect(),
            next_page_token,
        }))
    }

    async fn list_connections(
        &self,
        request: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        self.authorize(&request, "ListConnections", Role::Auditor)?;
        let connections = self.call(Command::ListConnections).await?;
        Ok(Response::new(proto::ListConnectionsResponse {
            connections: connections.iter().map(convert::connection).collect(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let principal = self.authorize(&request, "WatchEvents", Role::Auditor)?;
        let watch = request.into_inner();
        let filter = AuditFilter {
            kinds: kinds(&watch.kinds)?,
            ..AuditFilter::default()
        };
        // Subscribe before replaying so nothing falls between the two.
        self.stream(
            &principal,
            Plan {
                filter,
                after: watch.after_sequence,
                live: Some(self.engine.subscribe()),
            },
        )
    }

    type ExportAuditStream = EventStream;

    async fn export_audit(
        &self,
        request: Request<proto::ExportAuditRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let principal = self.authorize(&request, "ExportAudit", Role::Auditor)?;
        let export = request.into_inner();
        let filter = AuditFilter {
            kinds: kinds(&export.kinds)?,
            since_ms: ms(export.since, "since")?,
            until_ms: ms(export.until, "until")?,
            principal: Some(export.principal).filter(|p| !p.is_empty()),
            port: match export.port {
                0 => None,
                p => Some(convert::port(p, "port")?),
            },
        };
        self.stream(
            &principal,
            Plan {
                filter,
                after: Some(0),
                live: None,
            },
        )
    }

    async fn verify_audit(
        &self,
        request: Request<proto::VerifyAuditRequest>,
    ) -> Result<Response<proto::AuditVerification>, Status> {
        self.authorize(&request, "VerifyAudit", Role::Auditor)?;
        let kept = request
            .into_inner()
            .checkpoints
            .iter()
            .map(Checkpoint::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let reader = self.reader.clone();
        let key = self.public_key;
        let report = tokio::task::spawn_blocking(move || {
            let mut checkpoints = reader.checkpoints()?;
            checkpoints.extend(kept);
            verify_log(
                |after| reader.page(&AuditFilter::default(), after, VERIFY_PAGE),
                &checkpoints,
                &key,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("verifying the audit log: {e}")))?
        .map_err(|e| Status::unavailable(format!("reading the audit log: {e}")))?;
        Ok(Response::new(proto::AuditVerification {
            intact: report.broken.is_none(),
            broken_sequence: report.broken.as_ref().map_or(0, |b| b.sequence),
            problem: report.broken.map(|b| b.problem).unwrap_or_default(),
            records: report.records,
            pruned: report.pruned,
            checkpoints_checked: report.checkpoints_checked,
            head: Some(self.signed_head().await?),
        }))
    }

    async fn get_audit_checkpoint(
        &self,
        request: Request<proto::GetAuditCheckpointRequest>,
    ) -> Result<Response<proto::AuditCheckpoint>, Status> {
        self.authorize(&request, "GetAuditCheckpoint", Role::Auditor)?;
        Ok(Response::new(self.signed_head().await?))
    }

    async fn approve_request(
        &self,
        request: Request<proto::ApproveRequestRequest>,
    ) -> Result<Response<proto::ApprovalRequest>, Status> {
        let principal = self.authorize(&request, "ApproveRequest", Role::Approver)?;
        let approve = request.into_inner();
        self.decide(principal, approve.id, true, approve.comment)
            .await
    }

    async fn deny_request(
        &self,
        request: Request<proto::DenyRequestRequest>,
    ) -> Result<Response<proto::ApprovalRequest>, Status> {
        let principal = self.authorize(&request, "DenyRequest", Role::Approver)?;
        let deny = request.into_inner();
        self.decide(principal, deny.id, false, deny.reason).await
    }

    async fn list_requests(
        &self,
        request: Request<proto::ListRequestsRequest>,
    ) -> Result<Response<proto::ListRequestsResponse>, Status> {
        self.authorize(&request, "ListRequests", Role::Auditor)?;
        let list = request.into_inner();
        let filter = convert::request_filter(list.filter)?;
        let page_size = page_size(list.page_size)?;
        let before = page_token(&list.page_token)?;
        let mut requests = self
            .call(|reply| Command::ListRequests {
                filter,
                before,
                limit: page_size + 1,
                reply,
            })
            .await?;
        let next_page_token = next_page(&mut requests, page_size, |r| r.id);
        Ok(Response::new(proto::ListRequestsResponse {
            requests: requests.iter().map(convert::approval_request).collect(),
            next_page_token,
        }))
    }

    async fn reload_configuration(
        &self,
        request: Request<proto::ReloadConfigurationRequest>,
    ) -> Result<Response<proto::ReloadConfigurationResponse>, Status> {
        self.authorize(&request, "ReloadConfiguration", Role::Admin)?;
        self.reloader
            .reload()
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(proto::ReloadConfigurationResponse {}))
    }
}
