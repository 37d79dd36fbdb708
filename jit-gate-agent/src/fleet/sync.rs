//! The agent's fleet loop: register this host, read a snapshot of the
//! grants addressed to it (or resume from the revision it last answered),
//! then watch; apply each grant through the engine exactly like an API
//! request, and answer under the host's status key. Any failure ends the
//! session; the next one resumes from the persisted revision, so an event
//! is answered at least once and applied at most once (the grant id is the
//! request's idempotency key in the engine).

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use etcd_client::{Client, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};

use super::{
    FleetConfig,
    client::EtcdOptions,
    layout::{self, FleetGrant, Inventory, Outcome, StatusValue, VALUE_VERSION},
    link::Link,
};
use crate::{
    audit::Kind,
    auth::{Principal, Role},
    engine::{Command, EngineHandle, FleetCommand},
    store::FleetCursor,
    time::to_ms,
};

/// The presence key's lease: a host that stops renewing it for this long
/// counts as not live for brokers' `--wait`.
const PRESENCE_TTL_SECS: i64 = 10;
/// How long a host's answers stay readable after the grant's end.
const STATUS_RETENTION: Duration = Duration::from_hours(1);
/// Longest status lease (the longest grant a policy allows, and retention).
const MAX_STATUS_TTL: Duration = Duration::from_hours(25);
/// Waits between sessions, doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// Runs fleet mode for as long as the agent runs.
async fn run(config: FleetConfig, options: EtcdOptions, engine: EngineHandle) {
    let mut link = Link::new(config.host.clone(), engine);
    if let Err(e) = link.report(None).await {
        tracing::error!("fleet: reporting to the engine: {}", e.message);
    }
    let mut retry = RETRY_FIRST;
    loop {
        let mut session = Session {
            config: &config,
            options: &options,
            link: &mut link,
            reached: false,
        };
        let ended = session.run().await;
        if session.reached {
            retry = RETRY_FIRST;
        }
        let error = match ended {
            Ok(()) => "the watch ended".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        link.disconnected(error).await;
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

struct Session<'a> {
    config: &'a FleetConfig,
    options: &'a EtcdOptions,
    link: &'a mut Link,
    /// Whether etcd answered in this session.
    reached: bool,
}

impl Session<'_> {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut client = self.options.connect().await?;
        let host = self.config.host.clone();
        let inventory = Inventory {
            version: VALUE_VERSION,
            host: host.clone(),
            labels: self.config.labels.clone(),
        };
        client
            .put(
                layout::inventory_key(&host),
                serde_json::to_vec(&inventory)?,
                None,
            )
            .await
            .context("registering in the inventory")?;
        let presence = client
            .lease_grant(PRESENCE_TTL_SECS, None)
            .await
            .context("granting the presence lease")?
            .id();
        client
            .put(
                layout::presence_key(&host),
                b"{\"version\":1}".to_vec(),
                Some(PutOptions::new().with_lease(presence)),
            )
            .await
            .context("writing presence")?;
        let (mut keeper, mut kept) = client
            .lease_keep_alive(presence)
            .await
            .context("keeping presence alive")?;
        self.reached = true;
        self.link
            .connected(&self.options.endpoints.join(","))
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;

        let prefix = layout::host_grants_prefix(&host);
        let cluster_id = client
            .get(prefix.clone(), Some(GetOptions::new().with_count_only()))
            .await?
            .header()
            .map(etcd_client::ResponseHeader::cluster_id)
            .context("etcd sent no header")?;
        let mut revision = match self
            .link
            .cursor()
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?
        {
            Some(cursor) if cursor.cluster_id == cluster_id => cursor.revision,
            _ => self.snapshot(&mut client, cluster_id, "first read").await?,
        };
        let mut renew = tokio::time::interval(Duration::from_secs(PRESENCE_TTL_SECS as u64 / 3));
        'watch: loop {
            let mut watch = client
                .watch(
                    prefix.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1)
                            .with_progress_notify(),
                    ),
                )
                .await
                .context("watching")?;
            loop {
                tokio::select! {
                    message = watch.message() => {
                        let Some(response) = message.context("watching")? else {
                            bail!("etcd ended the watch");
                        };
                        if response.compact_revision() > 0 {
                            revision = self
                                .snapshot(&mut client, cluster_id, "revision compacted")
                                .await?;
                            continue 'watch;
                        }
                        if response.canceled() {
                            bail!("etcd cancelled the watch: {}", response.cancel_reason());
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            match event.event_type() {
                                EventType::Put => self.put(&mut client, kv).await?,
                                EventType::Delete => self.deleted(&mut client, kv).await?,
                            }
                            revision = revision.max(kv.mod_revision());
                        }
                        if !response.events().is_empty() {
                            self.progress(cluster_id, revision).await?;
                        }
                    }
                    _ = renew.tick() => {
                        keeper.keep_alive().await.context("renewing presence")?;
                        let renewed = tokio::time::timeout(self.options.timeout(), kept.message())
                            .await
                            .context("renewing presence: no answer")?
                            .context("renewing presence")?;
                        if renewed.is_none_or(|r| r.ttl() <= 0) {
                            bail!("the presence lease is gone");
                        }
                    }
                }
            }
        }
    }

    async fn progress(&mut self, cluster_id: u64, revision: i64) -> anyhow::Result<()> {
        self.link
            .report(Some(FleetCursor {
                cluster_id,
                revision,
            }))
            .await
            .map_err(|e| anyhow::anyhow!("recording fleet progress: {}", e.message))
    }

    /// Reads every grant addressed to this host, applies them, ends the
    /// live fleet grants whose key is gone, and returns the revision read.
    async fn snapshot(
        &mut self,
        client: &mut Client,
        cluster_id: u64,
        why: &str,
    ) -> anyhow::Result<i64> {
        let prefix = layout::host_grants_prefix(self.link.host());
        let max = self.config.max_grants;
        let read = client
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_limit(max as i64)),
            )
            .await
            .context("reading the grants addressed to this host")?;
        let revision = read.header().context("etcd sent no header")?.revision();
        if read.more() {
            tracing::warn!(
                "fleet: more than {max} grants are addressed to this host; only the first {max} (by key) are read"
            );
        }
        let mut present = BTreeSet::new();
        for kv in read.kvs() {
            if let Ok(key) = kv.key_str() {
                present.insert(key.rsplit('/').next().unwrap_or_default().to_owned());
            }
            self.put(client, kv).await?;
        }
        let live = self.link.live().await?;
        let mut gone = 0;
        for (principal, request_id) in live {
            if !present.contains(&request_id) {
                gone += 1;
                self.end(
                    client,
                    &principal,
                    &request_id,
                    false,
                    "its grant key is gone from etcd",
                    0,
                )
                .await?;
            }
        }
        self.progress(cluster_id, revision).await?;
        self.link
            .audit(
                Kind::FleetResynchronized,
                format!(
                    "fleet: read {} grants addressed to this host at revision {revision} ({why}); {gone} ended whose key was gone",
                    read.kvs().len()
                ),
                serde_json::json!({ "revision": revision, "grants": read.kvs().len(), "ended": gone, "why": why }),
            )
            .await;
        Ok(revision)
    }

    /// The grant id a key under this host's grant prefix names, if it
    /// names one.
    fn grant_id(&self, kv: &KeyValue) -> Option<String> {
        let prefix = layout::host_grants_prefix(self.link.host());
        kv.key_str()
            .ok()
            .and_then(|key| layout::id_below(&prefix, key))
            .map(str::to_owned)
    }

    /// A grant key was written: apply it, or end it if it says revoked.
    async fn put(&mut self, client: &mut Client, kv: &KeyValue) -> anyhow::Result<()> {
        let Some(id) = self.grant_id(kv) else {
            tracing::warn!(
                "fleet: ignoring key {:?}: not a grant id",
                String::from_utf8_lossy(kv.key())
            );
            return Ok(());
        };
        let revision = kv.mod_revision();
        let grant = match FleetGrant::parse(kv.value()) {
            Ok(grant) if grant.id == id => grant,
            Ok(grant) => {
                let reason = format!("the value's id {:?} is not its key's {id:?}", grant.id);
                return self.answer(client, &id, revision, Err(reason), 0).await;
            }
            Err(reason) => return self.answer(client, &id, revision, Err(reason), 0).await,
        };
        if let Some(revocation) = &grant.revoked {
            return self
                .end(
                    client,
                    &grant.principal(),
                    &id,
                    revocation.terminate,
                    &revocation.reason,
                    revision,
                )
                .await;
        }
        let principal = Principal {
            name: grant.principal(),
            role: Role::Broker,
        };
        let request = grant.request();
        let live = self.link.live().await?;
        let held = live.iter().any(|(_, r)| *r == id);
        if !held && live.len() >= self.config.max_grants {
            let reason = format!(
                "this host holds {} fleet grants, at most {} (fleet.max_grants)",
                live.len(),
                self.config.max_grants
            );
            return self
                .answer(client, &id, revision, Err(reason), grant.until_ms)
                .await;
        }
        let outcome = self
            .link
            .engine
            .call(|reply| Command::RequestAccess {
                principal,
                request,
                reply,
            })
            .await;
        let answer = match outcome {
            Ok(outcome) => {
                if !outcome.replayed {
                    self.link.applied();
                }
                Ok(outcome.grants)
            }
            Err(refusal) => {
                self.link.refused(&id);
                Err(refusal.message)
            }
        };
        self.answer(client, &id, revision, answer, grant.until_ms)
            .await
    }

    /// A grant key was deleted (its lease ran out, or a broker deleted
    /// it): its live grants end, connections kept.
    async fn deleted(&mut self, client: &mut Client, kv: &KeyValue) -> anyhow::Result<()> {
        let Some(id) = self.grant_id(kv) else {
            return Ok(());
        };
        let live = self.link.live().await?;
        for (principal, request_id) in live {
            if request_id == id {
                self.end(
                    client,
                    &principal,
                    &id,
                    false,
                    "its grant key was deleted",
                    kv.mod_revision(),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Ends the live grants of fleet grant `id` and answers `revoked`.
    async fn end(
        &mut self,
        client: &mut Client,
        principal: &str,
        id: &str,
        terminate: bool,
        reason: &str,
        revision: i64,
    ) -> anyhow::Result<()> {
        let principal = Principal {
            name: principal.to_owned(),
            role: Role::Broker,
        };
        let request_id = id.to_owned();
        let reason = reason.to_owned();
        let ended = self
            .link
            .engine
            .call(|reply| {
                FleetCommand::Revoke {
                    principal,
                    request_id,
                    terminate,
                    reason: reason.clone(),
                    reply,
                }
                .into()
            })
            .await;
        let status = StatusValue {
            version: VALUE_VERSION,
            host: self.link.host().to_owned(),
            id: id.to_owned(),
            outcome: Outcome::Revoked,
            reason: match &ended {
                Ok(outcomes) => format!(
                    "{reason}; {} grants ended, {} connections terminated",
                    outcomes.len(),
                    outcomes
                        .iter()
                        .map(|o| o.connections_terminated)
                        .sum::<usize>()
                ),
                Err(refusal) => format!("{reason}; ending it failed: {}", refusal.message),
            },
            grant_ids: ended.iter().flatten().map(|o| o.grant.id).collect(),
            enforced_until_ms: 0,
            at_ms: to_ms(SystemTime::now()),
            grant_revision: revision,
        };
        self.write_status(client, &status, Duration::ZERO).await
    }

    /// Writes the outcome of applying grant `id` (its grants, or why not).
    async fn answer(
        &mut self,
        client: &mut Client,
        id: &str,
        revision: i64,
        answer: Result<Vec<crate::grants::Grant>, String>,
        until_ms: i64,
    ) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let (outcome, reason, grant_ids, enforced_until_ms) = match answer {
            Ok(grants) => (
                Outcome::Applied,
                String::new(),
                grants.iter().map(|g| g.id).collect(),
                grants
                    .iter()
                    .map(|g| to_ms(g.expires_at))
                    .max()
                    .unwrap_or(0),
            ),
            Err(reason) => {
                tracing::warn!("fleet: grant {id} refused: {reason}");
                (Outcome::Refused, reason, Vec::new(), 0)
            }
        };
        let lasts = Duration::from_millis(
            u64::try_from(enforced_until_ms.max(until_ms) - to_ms(now)).unwrap_or(0),
        );
        let status = StatusValue {
            version: VALUE_VERSION,
            host: self.link.host().to_owned(),
            id: id.to_owned(),
            outcome,
            reason,
            grant_ids,
            enforced_until_ms,
            at_ms: to_ms(now),
            grant_revision: revision,
        };
        self.write_status(client, &status, lasts).await
    }

    /// Puts a status value under a lease that outlives the grant by
    /// `STATUS_RETENTION`.
    async fn write_status(
        &mut self,
        client: &mut Client,
        status: &StatusValue,
        lasts: Duration,
    ) -> anyhow::Result<()> {
        let ttl = (lasts + STATUS_RETENTION).min(MAX_STATUS_TTL).as_secs() as i64;
        let lease = client
            .lease_grant(ttl, None)
            .await
            .context("granting a status lease")?
            .id();
        client
            .put(
                layout::status_key(self.link.host(), &status.id),
                serde_json::to_vec(status)?,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .context("writing the grant's status")?;
        Ok(())
    }
}

/// Starts fleet mode on the current runtime (config already validated,
/// TLS files already read).
pub fn spawn(config: FleetConfig, options: EtcdOptions, engine: EngineHandle) {
    tokio::spawn(run(config, options, engine));
}
