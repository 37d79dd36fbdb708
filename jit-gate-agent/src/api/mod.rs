//! The gRPC service: authenticates the caller, converts the wire types and
//! hands the call to the engine. It never touches kernel state itself.

mod convert;
pub mod server;

use std::{
    pin::Pin,
    sync::{Arc, RwLock},
};

use tokio::sync::watch;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use crate::{
    audit::AuditRecord,
    auth::{Principal, Role},
    config::Principal as ConfiguredPrincipal,
    engine::{Command, EngineHandle, PolicyChange},
    proto::{self, jit_gate_server::JitGate},
};
use convert::status;

/// Most grants one `ListGrants` returns.
const MAX_LIST: u32 = 10_000;
/// Stored events read per page when replaying to a watcher.
const REPLAY_PAGE: u32 = 1000;
/// Events queued per watcher before it is cut off as too slow.
const WATCH_QUEUE: usize = 1024;

pub struct Service {
    engine: EngineHandle,
    /// Non-root principals, replaced on configuration reload.
    principals: Arc<RwLock<Vec<ConfiguredPrincipal>>>,
    /// Set when the server stops: event streams end, since a graceful
    /// shutdown waits for open calls and a watcher's never ends by itself.
    stopping: watch::Sender<bool>,
}

impl Service {
    pub fn new(engine: EngineHandle, principals: Arc<RwLock<Vec<ConfiguredPrincipal>>>) -> Self {
        Service {
            engine,
            principals,
            stopping: watch::Sender::new(false),
        }
    }

    /// The caller, from the Unix socket's peer credentials, if its role
    /// is at least `needed`.
    fn authorize<T>(&self, request: &Request<T>, needed: Role) -> Result<Principal, Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        let principals = self.principals.read().expect("principals lock");
        let principal = Principal::from_uid(uid, &principals).map_err(status)?;
        principal.require(needed).map_err(status)?;
        Ok(principal)
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(crate::engine::Reply<T>) -> Command,
    ) -> Result<T, Status> {
        self.engine.call(command).await.map_err(status)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl JitGate for Service {
    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::Status>, Status> {
        self.authorize(&request, Role::Auditor)?;
        let report = self.call(Command::Status).await?;
        Ok(Response::new(convert::status_report(&report)))
    }

    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        self.authorize(&request, Role::Auditor)?;
        let policy = self.call(Command::Policy).await?;
        Ok(Response::new(convert::policy_to_wire(&policy)))
    }

    async fn update_policy(
        &self,
        request: Request<proto::UpdatePolicyRequest>,
    ) -> Result<Response<proto::Policy>, Status> {
        let principal = self.authorize(&request, Role::Admin)?;
        let update = request.into_inner();
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
        let policy = self
            .call(|reply| Command::UpdatePolicy {
                principal,
                change,
                expected_revision: update.expected_revision,
                reply,
            })
            .await?;
        Ok(Response::new(convert::policy_to_wire(&policy)))
    }

    async fn request_access(
        &self,
        request: Request<proto::AccessRequest>,
    ) -> Result<Response<proto::AccessResponse>, Status> {
        let principal = self.authorize(&request, Role::Broker)?;
        let access = convert::access_request(request.into_inner());
        let outcome = self
            .call(|reply| Command::RequestAccess {
                principal,
                request: access,
                reply,
            })
            .await?;
        Ok(Response::new(proto::AccessResponse {
            grants: outcome.grants.iter().map(convert::grant).collect(),
            replayed: outcome.replayed,
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<proto::RevokeGrantRequest>,
    ) -> Result<Response<proto::RevokeGrantResponse>, Status> {
        let principal = self.authorize(&request, Role::Broker)?;
        let revoke = request.into_inner();
        let outcome = self
            .call(|reply| Command::Revoke {
                principal,
                grant_id: revoke.grant_id,
                terminate: revoke.terminate_connections,
                reason: revoke.reason,
                reply,
            })
            .await?;
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
        self.authorize(&request, Role::Auditor)?;
        let list = request.into_inner();
        let port = match list.port {
            0 => None,
            p => Some(convert::port(p, "port")?),
        };
        let limit = match list.limit {
            0 => 1000,
            n => n.min(MAX_LIST),
        };
        let grants = self
            .call(|reply| Command::ListGrants {
                include_ended: list.include_ended,
                port,
                limit,
                reply,
            })
            .await?;
        Ok(Response::new(proto::ListGrantsResponse {
            grants: grants.iter().map(convert::grant).collect(),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        self.authorize(&request, Role::Auditor)?;
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
        self.authorize(&request, Role::Auditor)?;
        let watch = request.into_inner();
        let mut kinds = Vec::new();
        for k in &watch.kinds {
            match proto::EventKind::try_from(*k) {
                Ok(kind) if kind != proto::EventKind::Unspecified => kinds.push(kind),
                _ => return Err(Status::invalid_argument(format!("unknown event kind {k}"))),
            }
        }
        // Subscribe before replaying so nothing falls between the two.
        let mut live = self.engine.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let engine = self.engine.clone();
        let wanted = move |record: &AuditRecord| {
            kinds.is_empty() || kinds.contains(&convert::event_kind(record.event.kind))
        };
        let mut stopping = self.stopping.subscribe();
        let farewell = tx.clone();
        let forward = async move {
            let mut last = 0;
            if let Some(mut after) = watch.after_sequence {
                loop {
                    let page = match engine
                        .call(|reply| Command::AuditAfter {
                            after,
                            limit: REPLAY_PAGE,
                            reply,
                        })
                        .await
                    {
                        Ok(page) => page,
                        Err(refusal) => {
                            let _ = tx.send(Err(status(refusal))).await;
                            return;
                        }
                    };
                    let Some(end) = page.last().map(|r| r.sequence) else {
                        break;
                    };
                    for record in page.iter().filter(|r| wanted(r)) {
                        if tx.send(Ok(convert::event(record))).await.is_err() {
                            return;
                        }
                    }
                    after = end;
                    last = end;
                }
            }
            loop {
                match live.recv().await {
                    Ok(record) => {
                        if record.sequence <= last {
                            continue;
                        }
                        last = record.sequence;
                        if wanted(&record) && tx.send(Ok(convert::event(&record))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "watcher fell behind; resume with after_sequence = {last}"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = forward => {}
                _ = stopping.wait_for(|stopping| *stopping) => {
                    // Never waits: a watcher that stopped reading must not hold up the stop.
                    let _ = farewell.try_send(Err(Status::unavailable(
                        "the agent is stopping; watch again once it is back",
                    )));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
