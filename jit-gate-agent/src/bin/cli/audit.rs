//! `audit verify | checkpoint | export`: the audit log checked by the agent
//! against its chain and the checkpoints an operator kept, signed
//! checkpoints to keep, and the log as CSV or JSON lines.

use std::path::Path;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use jit_gate_agent::proto::{
    AuditCheckpoint, AuditVerification, Event, ExportAuditRequest, GetAuditCheckpointRequest,
    VerifyAuditRequest,
};
use serde_json::{Value, json};

use crate::{
    args::{AuditCommand, ExportArgs, ExportFormat},
    commands::Outcome,
    connect::{CallError, Fleet},
    convert,
    output::{Render, printable, report},
};

pub(crate) async fn run(
    fleet: &Fleet,
    command: AuditCommand,
    json: bool,
) -> anyhow::Result<Outcome> {
    match command {
        AuditCommand::Verify { checkpoints } => {
            let mut kept = Vec::new();
            for file in &checkpoints {
                kept.extend(read_checkpoints(file)?);
            }
            let replies = fleet
                .call(
                    VerifyAuditRequest { checkpoints: kept },
                    |mut c, r| async move { c.verify_audit(r).await },
                )
                .await;
            let ok = report(&replies, json);
            let broken = replies
                .iter()
                .any(|r| r.result.as_ref().is_ok_and(|v| !v.intact));
            Ok(if broken {
                Outcome::AuditBroken
            } else {
                ok.into()
            })
        }
        AuditCommand::Checkpoint => {
            let replies = fleet
                .call(GetAuditCheckpointRequest {}, |mut c, r| async move {
                    c.get_audit_checkpoint(r).await
                })
                .await;
            if json || fleet.agents.len() > 1 {
                return Ok(report(&replies, json).into());
            }
            // One agent: the checkpoint alone, one line, ready to append to a file.
            Ok(report_lines(&replies))
        }
        AuditCommand::Export(args) => export(fleet, args).await,
    }
}

fn report_lines(replies: &[crate::connect::Reply<AuditCheckpoint>]) -> Outcome {
    let mut ok = true;
    for reply in replies {
        match &reply.result {
            Ok(checkpoint) => println!("{}", checkpoint.json()),
            Err(error) => {
                ok = false;
                eprintln!("error: {}: {error}", reply.agent);
            }
        }
    }
    ok.into()
}

/// Checkpoints from a file of JSON lines: bare checkpoints (as `audit
/// checkpoint` prints them) or `--json` rows holding one in "result".
fn read_checkpoints(path: &Path) -> anyhow::Result<Vec<AuditCheckpoint>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let here = || format!("{}:{}", path.display(), n + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", here()))?;
        let value = value.get("result").cloned().unwrap_or(value);
        let text = |key: &str| -> anyhow::Result<String> {
            value[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{}: no \"{key}\"", here()))
        };
        let sequence = value["sequence"]
            .as_u64()
            .with_context(|| format!("{}: no \"sequence\"", here()))?;
        let at = text("at")?
            .parse::<prost_types::Timestamp>()
            .map_err(|e| anyhow::anyhow!("{}: \"at\": {e}", here()))?;
        out.push(AuditCheckpoint {
            sequence,
            hash: text("hash")?,
            at: Some(at),
            signature: text("signature")?,
            public_key: text("public_key")?,
        });
    }
    Ok(out)
}

async fn export(fleet: &Fleet, args: ExportArgs) -> anyhow::Result<Outcome> {
    let [agent] = fleet.agents.as_slice() else {
        bail!("audit export reads one agent's log: give one --agent");
    };
    let request = ExportAuditRequest {
        since: args.since,
        until: args.until,
        port: args.port.map_or(0, u32::from),
        principal: args.principal.unwrap_or_default(),
        kinds: args.kinds.iter().map(|k| *k as i32).collect(),
    };
    let single = Fleet {
        agents: vec![agent.clone()],
        timeout: fleet.timeout,
    };
    let mut opened = single
        .call(request, |mut c, r| async move { c.export_audit(r).await })
        .await;
    let stream = match opened.remove(0).result {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("error: {agent}: {error}");
            return Ok(Outcome::Failure);
        }
    };
    let mut csv =
        (args.format == ExportFormat::Csv).then(|| csv::Writer::from_writer(std::io::stdout()));
    if let Some(writer) = csv.as_mut() {
        writer.write_record(CSV_HEADER)?;
    }
    let mut events = stream;
    while let Some(next) = events.next().await {
        let event = match next {
            Ok(event) => event,
            Err(status) => {
                eprintln!("error: {agent}: {}", CallError::from(status));
                return Ok(Outcome::Failure);
            }
        };
        match csv.as_mut() {
            Some(writer) => writer.write_record(csv_row(&event))?,
            None => println!("{}", export_json(&event)),
        }
    }
    if let Some(writer) = csv.as_mut() {
        writer.flush()?;
    }
    Ok(Outcome::Success)
}

const CSV_HEADER: [&str; 10] = [
    "sequence",
    "at",
    "kind",
    "principal",
    "grant_id",
    "message",
    "details",
    "payload_sha256",
    "hash",
    "pruned",
];

fn csv_row(e: &Event) -> [String; 10] {
    [
        e.sequence.to_string(),
        e.at.map(|t| t.to_string()).unwrap_or_default(),
        convert::event_kind(e.kind),
        e.principal.clone(),
        e.grant_id.to_string(),
        e.message.clone(),
        e.details_json.clone(),
        e.payload_sha256.clone(),
        e.hash.clone(),
        e.pruned.to_string(),
    ]
}

fn export_json(e: &Event) -> Value {
    let mut value = convert::event(e);
    value["details_json"] = json!(e.details_json);
    value
}

impl Render for AuditVerification {
    fn json(&self) -> Value {
        json!({
            "intact": self.intact,
            "broken_sequence": (!self.intact).then_some(self.broken_sequence),
            "problem": self.problem,
            "records": self.records,
            "pruned": self.pruned,
            "checkpoints_checked": self.checkpoints_checked,
            "head": self.head.as_ref().map(Render::json),
        })
    }

    fn summary(&self) -> String {
        if self.intact {
            format!(
                "intact: {} records ({} with pruned payloads), {} checkpoints checked",
                self.records, self.pruned, self.checkpoints_checked
            )
        } else {
            format!(
                "BROKEN at record {}: {} ({} records verified before it)",
                self.broken_sequence,
                printable(&self.problem),
                self.records
            )
        }
    }
}

impl Render for AuditCheckpoint {
    fn json(&self) -> Value {
        json!({
            "sequence": self.sequence,
            "hash": self.hash,
            "at": self.at.map(|t| t.to_string()),
            "signature": self.signature,
            "public_key": self.public_key,
        })
    }

    fn summary(&self) -> String {
        format!("record {} hash {}", self.sequence, self.hash)
    }
}
