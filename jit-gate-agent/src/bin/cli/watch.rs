//! `watch`: the event streams of every agent, merged and printed as the
//! events arrive, until interrupted or every stream has ended.

use futures_util::{StreamExt as _, stream};
use jit_gate_agent::proto::WatchEventsRequest;

use crate::{
    args::WatchArgs,
    connect::{Fleet, Reply},
    output::print_line,
};

/// True if no stream failed (an interrupt is a normal end).
pub(crate) async fn run(fleet: &Fleet, args: WatchArgs, json: bool) -> bool {
    let request = WatchEventsRequest {
        after_sequence: args.after,
        kinds: args.kinds.iter().map(|k| *k as i32).collect(),
    };
    let opened = fleet
        .call(request, |mut c, r| async move { c.watch_events(r).await })
        .await;
    // One agent: plain lines; several: each line says whose it is.
    let tagged = fleet.agents.len() > 1;
    let mut ok = true;
    let mut streams = Vec::new();
    for reply in opened {
        match reply.result {
            Ok(events) => {
                let agent = reply.agent;
                streams.push(events.map(move |item| Reply {
                    agent: agent.clone(),
                    result: item.map_err(Into::into),
                }));
            }
            // Could not open this one; the others go on.
            Err(error) => {
                ok = false;
                print_line(
                    &Reply::<jit_gate_agent::proto::Event> {
                        agent: reply.agent,
                        result: Err(error),
                    },
                    json,
                    tagged,
                );
            }
        }
    }
    let mut merged = stream::select_all(streams);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            next = merged.next() => match next {
                None => break,
                Some(reply) => {
                    ok &= reply.result.is_ok();
                    print_line(&reply, json, tagged);
                }
            }
        }
    }
    ok
}
