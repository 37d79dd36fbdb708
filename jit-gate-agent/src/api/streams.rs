//! Event streams with bounded memory: stored records are read a page at a
//! time from a read-only connection (never through the engine), and only
//! when the stream's small buffer has room, so a reader that stops reading
//! stops the reading; a reader that takes nothing for the stall timeout is
//! ended with a status that says where to resume; each principal may hold
//! a bounded number of streams open.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;

use crate::{
    audit::{AuditRecord, Kind},
    store::{AuditFilter, AuditReader},
    wire,
};

/// Events a stream holds ready for its reader.
const BUFFER: usize = 4;
/// Records read from the store at once per stream.
const PAGE: u32 = 8;
/// Page reads running at once, over all streams.
const CONCURRENT_READS: usize = 2;

pub(super) type EventStream =
    Pin<Box<dyn Stream<Item = Result<crate::proto::Event, Status>> + Send>>;

/// Open streams per principal, against a limit.
pub(super) struct StreamLimits {
    per_principal: u32,
    pub stall: Duration,
    open: Mutex<HashMap<String, u32>>,
    reads: Semaphore,
}

/// One open stream of a principal; closing it (drop) frees the slot.
pub(super) struct Slot {
    limits: Arc<StreamLimits>,
    principal: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("stream count lock");
        if let Some(n) = open.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.principal);
            }
        }
    }
}

impl StreamLimits {
    pub(super) fn new(per_principal: u32, stall: Duration) -> Arc<Self> {
        Arc::new(StreamLimits {
            per_principal,
            stall,
            open: Mutex::new(HashMap::new()),
            reads: Semaphore::new(CONCURRENT_READS),
        })
    }

    pub(super) fn acquire(self: &Arc<Self>, principal: &str) -> Result<Slot, Status> {
        let mut open = self.open.lock().expect("stream count lock");
        let n = open.entry(principal.to_owned()).or_insert(0);
        if *n >= self.per_principal {
            return Err(Status::resource_exhausted(format!(
                "{principal} already has {n} event streams open, the limit (api.max_streams_per_principal)"
            )));
        }
        *n += 1;
        Ok(Slot {
            limits: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

/// What a stream sends: stored records passing `filter` above `after`,
/// then, with `live`, records as they are committed.
pub(super) struct Plan {
    pub filter: AuditFilter,
    pub after: Option<u64>,
    pub live: Option<broadcast::Receiver<AuditRecord>>,
}

/// Why the producer stopped early: the status the reader gets last.
type Farewell = Arc<Mutex<Option<Status>>>;

/// Starts the producer of `plan` and returns the stream the reader sees.
pub(super) fn open(
    plan: Plan,
    reader: AuditReader,
    limits: Arc<StreamLimits>,
    slot: Slot,
    mut stopping: watch::Receiver<bool>,
) -> EventStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    let farewell: Farewell = Arc::default();
    let said = farewell.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let produce = produce(plan, reader, limits, tx);
        let ended = tokio::select! {
            ended = produce => ended,
            _ = stopping.wait_for(|stopping| *stopping) => Err(Status::unavailable(
                "the agent is stopping; watch again once it is back",
            )),
        };
        if let Err(status) = ended {
            *said.lock().expect("farewell lock") = Some(status);
        }
    });
    let last =
        futures_util::stream::once(async move { farewell.lock().expect("farewell lock").take() })
            .filter_map(|status| std::future::ready(status.map(Err)));
    Box::pin(ReceiverStream::new(rx).chain(last))
}

/// Sends what `plan` asks for; `Err` is the status to end with.
async fn produce(
    plan: Plan,
    reader: AuditReader,
    limits: Arc<StreamLimits>,
    tx: mpsc::Sender<Result<crate::proto::Event, Status>>,
) -> Result<(), Status> {
    let Plan {
        filter,
        after,
        mut live,
    } = plan;
    let send = async |record: &AuditRecord, last: u64| -> Result<(), Status> {
        match tokio::time::timeout(limits.stall, tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(Ok(wire::event(record)));
                Ok(())
            }
            // The reader went away.
            Ok(Err(_)) => Err(Status::cancelled("the reader closed the stream")),
            Err(_) => Err(Status::resource_exhausted(format!(
                "the reader took nothing for {}; resume with after_sequence = {last}",
                humantime::format_duration(limits.stall)
            ))),
        }
    };
    let mut last = after.unwrap_or(0);
    if after.is_some() {
        loop {
            let page = {
                let _turn = limits
                    .reads
                    .acquire()
                    .await
                    .expect("semaphore never closes");
                let reader = reader.clone();
                let filter = filter.clone();
                tokio::task::spawn_blocking(move || reader.page(&filter, last, PAGE))
                    .await
                    .map_err(|e| Status::internal(format!("reading the audit log: {e}")))?
                    .map_err(|e| Status::unavailable(format!("reading the audit log: {e}")))?
            };
            let Some(end) = page.last().map(|r| r.sequence) else {
                break;
            };
            for record in &page {
                send(record, last).await?;
                last = record.sequence;
            }
            last = end;
        }
    }
    let Some(live) = live.as_mut() else {
        return Ok(());
    };
    let wanted = |kind: Kind| filter.kinds.is_empty() || filter.kinds.contains(&kind);
    loop {
        // A reader that left frees its slot at once, even while nothing happens.
        let next = tokio::select! {
            next = live.recv() => next,
            () = tx.closed() => return Err(Status::cancelled("the reader closed the stream")),
        };
        match next {
            Ok(record) if record.sequence <= last => {}
            Ok(record) => {
                if wanted(record.kind) {
                    send(&record, last).await?;
                }
                last = record.sequence;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                return Err(Status::aborted(format!(
                    "watcher fell behind; resume with after_sequence = {last}"
                )));
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
