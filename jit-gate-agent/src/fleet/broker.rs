//! The broker's side of fleet mode, for `jit-gate fleet`: resolve labels
//! against the inventory, write one copy of a grant per host under a lease
//! covering its lifetime, revoke it, read and wait for per-host outcomes.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use super::layout::{
    self, FleetGrant, FleetPort, GrantRecord, Inventory, Outcome, Revocation, StatusValue,
    VALUE_VERSION,
};
use crate::time::to_ms;

/// Longer than the grant, so that a host applying it at the last moment
/// still finds it; hosts end it on their own clock anyway.
const LEASE_GRACE: Duration = Duration::from_secs(30);
/// Puts per etcd transaction (etcd 3.4 allows 128 by default).
const PUTS_PER_TXN: usize = 100;

/// What a broker asks for.
#[derive(Clone, Debug)]
pub struct GrantAsk {
    pub id: String,
    pub broker: String,
    pub hosts: Vec<String>,
    pub labels: Vec<String>,
    pub source: String,
    pub ports: Vec<FleetPort>,
    pub duration: Duration,
    pub requester: String,
    pub justification: String,
    pub ticket: String,
}

/// A fleet grant written: its record, the revision of its first write
/// (every host's answer comes later), and when each host's copy was
/// committed (the answer to the transaction holding it).
pub struct Written {
    pub record: GrantRecord,
    pub revision: i64,
    pub committed: BTreeMap<String, Instant>,
}

/// The hosts registered in the inventory, with their labels.
pub async fn inventory(client: &mut Client) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let read = client
        .get(
            layout::inventory_prefix(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .context("reading the inventory")?;
    let mut hosts = BTreeMap::new();
    for kv in read.kvs() {
        match layout::parse_bounded::<Inventory>(kv.value()) {
            Ok(entry) if layout::name("host", &entry.host).is_ok() => {
                hosts.insert(entry.host, entry.labels);
            }
            Ok(_) | Err(_) => {
                tracing::warn!(
                    "skipping inventory entry {:?}",
                    String::from_utf8_lossy(kv.key())
                );
            }
        }
    }
    Ok(hosts)
}

/// Hosts whose presence lease is alive.
pub async fn live_hosts(client: &mut Client) -> anyhow::Result<BTreeSet<String>> {
    let prefix = layout::presence_prefix();
    let read = client
        .get(
            prefix.clone(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .context("reading presence")?;
    Ok(read
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// A fleet grant resolved and ready to write: the same plan written twice
/// (a retry) writes the same values.
#[derive(Clone, Debug)]
pub struct Planned {
    pub record: GrantRecord,
    /// Every host's copy (one value).
    value: Vec<u8>,
    /// The lease's time to live, seconds.
    ttl: i64,
}

/// Checks `ask`, resolves its labels against the inventory and fixes the
/// grant's end; refuses an id already used.
pub async fn plan(client: &mut Client, ask: &GrantAsk) -> anyhow::Result<Planned> {
    layout::name("grant id", &ask.id).map_err(anyhow::Error::msg)?;
    layout::name("broker", &ask.broker).map_err(anyhow::Error::msg)?;
    layout::labels("label", &ask.labels).map_err(anyhow::Error::msg)?;
    for host in &ask.hosts {
        layout::name("host", host).map_err(anyhow::Error::msg)?;
    }
    if ask.hosts.is_empty() && ask.labels.is_empty() {
        bail!("name hosts (--host) or labels (--label) to address");
    }
    let mut targeted: BTreeSet<String> = ask.hosts.iter().cloned().collect();
    if !ask.labels.is_empty() {
        for (host, labels) in inventory(client).await? {
            if ask.labels.iter().all(|l| labels.contains(l)) {
                targeted.insert(host);
            }
        }
    }
    if targeted.is_empty() {
        bail!("no registered host carries every label of {:?}", ask.labels);
    }
    if targeted.len() > layout::MAX_HOSTS_PER_GRANT {
        bail!(
            "{} hosts targeted, at most {}",
            targeted.len(),
            layout::MAX_HOSTS_PER_GRANT
        );
    }
    let until_ms = to_ms(SystemTime::now() + ask.duration);
    let grant = FleetGrant {
        version: VALUE_VERSION,
        id: ask.id.clone(),
        broker: ask.broker.clone(),
        source: ask.source.clone(),
        ports: ask.ports.clone(),
        until_ms,
        requester: ask.requester.clone(),
        justification: ask.justification.clone(),
        ticket: ask.ticket.clone(),
        revoked: None,
    };
    let value = serde_json::to_vec(&grant)?;
    if value.len() > layout::MAX_VALUE_BYTES {
        bail!(
            "the grant is {} bytes, at most {}",
            value.len(),
            layout::MAX_VALUE_BYTES
        );
    }
    let planned = Planned {
        record: GrantRecord {
            version: VALUE_VERSION,
            id: ask.id.clone(),
            broker: ask.broker.clone(),
            hosts: ask.hosts.clone(),
            labels: ask.labels.clone(),
            targeted: targeted.into_iter().collect(),
            until_ms,
        },
        value,
        ttl: (ask.duration + LEASE_GRACE).as_secs().max(1) as i64,
    };
    let record_bytes = serde_json::to_vec(&planned.record)?.len();
    if record_bytes > layout::MAX_RECORD_BYTES {
        bail!(
            "the grant's record (every targeted host by name) is {record_bytes} bytes, at most {}: \
             split the grant",
            layout::MAX_RECORD_BYTES
        );
    }
    if existing_record(client, &ask.id).await?.is_some() {
        bail!("fleet grant {} exists already; choose another id", ask.id);
    }
    Ok(planned)
}

/// The record stored under `id` and its lease, if any.
async fn existing_record(
    client: &mut Client,
    id: &str,
) -> anyhow::Result<Option<(GrantRecord, i64)>> {
    let read = client
        .get(layout::grant_record_key(id), None)
        .await
        .context("reading the grant's record")?;
    read.kvs()
        .first()
        .map(|kv| {
            GrantRecord::parse(kv.value())
                .map(|record| (record, kv.lease()))
                .map_err(anyhow::Error::msg)
        })
        .transpose()
}

/// Writes the record and one copy per targeted host, all under one lease,
/// in transactions of `PUTS_PER_TXN`. The first transaction writes only
/// if the record does not exist; if it does and is this very plan (an
/// earlier attempt whose answer was lost, or that stopped part way), every
/// copy is written again under that record's lease — hosts apply a grant
/// id once, so a repeated write creates no second grant.
pub async fn write(client: &mut Client, planned: &Planned) -> anyhow::Result<Written> {
    let id = &planned.record.id;
    let record_key = layout::grant_record_key(id);
    let mut lease = client
        .lease_grant(planned.ttl, None)
        .await
        .context("granting the lease")?
        .id();
    let copies = |lease: i64| -> Vec<TxnOp> {
        planned
            .record
            .targeted
            .iter()
            .map(|host| {
                TxnOp::put(
                    layout::host_grant_key(host, id),
                    planned.value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect()
    };
    let mut puts = vec![TxnOp::put(
        record_key.clone(),
        serde_json::to_vec(&planned.record)?,
        Some(PutOptions::new().with_lease(lease)),
    )];
    puts.extend(copies(lease));
    let first_chunk = puts.len().min(PUTS_PER_TXN);
    let created = client
        .txn(
            Txn::new()
                .when([Compare::create_revision(
                    record_key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(puts[..first_chunk].to_vec()),
        )
        .await
        .context("writing the grant")?;
    let mut committed = BTreeMap::new();
    let mut revision = created.header().map(etcd_client::ResponseHeader::revision);
    let rest = if created.succeeded() {
        let now = Instant::now();
        committed.extend(
            planned.record.targeted[..first_chunk - 1]
                .iter()
                .map(|h| (h.clone(), now)),
        );
        puts.split_off(first_chunk)
    } else {
        match existing_record(client, id).await? {
            Some((record, own)) if record == planned.record => {
                tracing::info!("fleet grant {id}: an earlier attempt wrote it; writing every copy");
                let _ = client.lease_revoke(lease).await;
                lease = own;
                revision = None;
                copies(lease)
            }
            Some(_) => bail!("fleet grant {id} exists already; choose another id"),
            None => bail!("fleet grant {id}: its record vanished while writing; try again"),
        }
    };
    let mut hosts = planned.record.targeted[planned.record.targeted.len() - rest.len()..].iter();
    for chunk in rest.chunks(PUTS_PER_TXN) {
        let done = client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("writing the grant")?;
        let now = Instant::now();
        revision = revision.or(done.header().map(etcd_client::ResponseHeader::revision));
        committed.extend(hosts.by_ref().take(chunk.len()).map(|h| (h.clone(), now)));
    }
    Ok(Written {
        record: planned.record.clone(),
        revision: revision.unwrap_or_default(),
        committed,
    })
}

/// Plans and writes the grant for every host named or carrying all of
/// `labels`.
pub async fn request(client: &mut Client, ask: &GrantAsk) -> anyhow::Result<Written> {
    let planned = plan(client, ask).await?;
    write(client, &planned).await
}

/// The broker's record of fleet grant `id`.
pub async fn record(client: &mut Client, id: &str) -> anyhow::Result<GrantRecord> {
    layout::name("grant id", id).map_err(anyhow::Error::msg)?;
    let read = client
        .get(layout::grant_record_key(id), None)
        .await
        .context("reading the grant")?;
    let kv = read
        .kvs()
        .first()
        .with_context(|| format!("no fleet grant {id} (never written, or its lease ran out)"))?;
    GrantRecord::parse(kv.value()).map_err(anyhow::Error::msg)
}

/// A revocation written: the grant's record, the hosts whose copy was
/// still there and is now marked, and the revision of the first write.
pub struct Revoked {
    pub record: GrantRecord,
    pub hosts: Vec<String>,
    pub revision: i64,
}

/// Marks every host's remaining copy revoked (keeping its lease).
pub async fn revoke(
    client: &mut Client,
    id: &str,
    terminate: bool,
    reason: &str,
) -> anyhow::Result<Revoked> {
    crate::validate::text("reason", reason, crate::validate::MAX_REASON_LEN)
        .map_err(anyhow::Error::msg)?;
    let record = record(client, id).await?;
    let mut first = None;
    let mut hosts = Vec::new();
    for host in &record.targeted {
        let key = layout::host_grant_key(host, id);
        let read = client.get(key.clone(), None).await?;
        let Some(kv) = read.kvs().first() else {
            continue;
        };
        let mut grant = FleetGrant::parse(kv.value()).map_err(anyhow::Error::msg)?;
        grant.revoked = Some(Revocation {
            terminate,
            reason: reason.to_owned(),
        });
        let put = client
            .put(
                key,
                serde_json::to_vec(&grant)?,
                Some(PutOptions::new().with_ignore_lease()),
            )
            .await
            .context("writing the revocation")?;
        first = first.or(put.header().map(etcd_client::ResponseHeader::revision));
        hosts.push(host.clone());
    }
    Ok(Revoked {
        record,
        hosts,
        revision: first.unwrap_or_default(),
    })
}

/// One targeted host's answer, if any.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostOutcome {
    pub host: String,
    pub live: bool,
    pub status: Option<StatusValue>,
}

/// Every targeted host's current answer.
pub async fn status(
    client: &mut Client,
    id: &str,
) -> anyhow::Result<(GrantRecord, Vec<HostOutcome>)> {
    let record = record(client, id).await?;
    let live = live_hosts(client).await?;
    let mut outcomes = Vec::new();
    for host in &record.targeted {
        let read = client.get(layout::status_key(host, id), None).await?;
        let status = read
            .kvs()
            .first()
            .and_then(|kv| layout::parse_bounded(kv.value()).ok());
        outcomes.push(HostOutcome {
            host: host.clone(),
            live: live.contains(host),
            status,
        });
    }
    Ok((record, outcomes))
}

/// Waits until every live host of `hosts` answered `id` with an outcome
/// in `wanted`, written from `revision` on, or `timeout` passes; calls
/// `seen` with each answer as it arrives. Returns the hosts that did not
/// answer.
pub async fn wait(
    client: &mut Client,
    id: &str,
    hosts: &[String],
    revision: i64,
    wanted: &[Outcome],
    timeout: Duration,
    mut seen: impl FnMut(&StatusValue),
) -> anyhow::Result<BTreeSet<String>> {
    let live = live_hosts(client).await?;
    let mut waiting: BTreeSet<String> = hosts
        .iter()
        .filter(|h| live.contains(*h))
        .cloned()
        .collect();
    let mut watch = client
        .watch(
            format!("{}status/", layout::ROOT),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            ),
        )
        .await
        .context("watching outcomes")?;
    let deadline = tokio::time::Instant::now() + timeout;
    while !waiting.is_empty() {
        let Ok(message) = tokio::time::timeout_at(deadline, watch.message()).await else {
            break;
        };
        let Some(response) = message.context("watching outcomes")? else {
            bail!("etcd ended the watch of outcomes");
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(status) = layout::parse_bounded::<StatusValue>(kv.value()) else {
                continue;
            };
            if status.id == id && hosts.contains(&status.host) && wanted.contains(&status.outcome) {
                seen(&status);
                waiting.remove(&status.host);
            }
        }
    }
    Ok(waiting)
}
