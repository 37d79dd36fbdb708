//! The reader's side of a streamed reconciliation: on a thread of its own,
//! a `KernelReader` (the grant maps' duplicated descriptors, or a netlink
//! socket of its own) reads one layer's grant entries and sends them to
//! the engine's comparison (`compare::Pass`) in chunks, each once the
//! comparison has returned a credit, so that a few chunks at most wait in
//! memory however many grants there are.

use std::{collections::BTreeSet, sync::mpsc, time::Duration};

use super::{
    nft::{ElementRead, NftGate, StrayElement},
    xdp::{GrantEntry, GrantReader},
};
use crate::{
    clock::Deadline,
    net::{GrantTarget, Protocol},
};

/// Entries per chunk (about a megabyte of them).
pub(super) const CHUNK: usize = 16_384;

/// Chunks the reader may send ahead of the comparison.
pub(super) const CREDITS: usize = 2;

/// What the comparison tells the reader.
pub(super) enum Go {
    /// Room for one more chunk.
    Chunk,
    /// nftables: the first dump missed targets; dump again the sets
    /// that should hold them.
    SecondDump(BTreeSet<String>),
}

/// What a reader sends, in order: chunks, then `End`; for nftables, after
/// a `SecondDump`, the second dump's chunks and `End`.
pub enum KernelRead {
    /// XDP grant entries, in the maps' order.
    Xdp(Vec<GrantEntry>),
    Nft(NftChunk),
    /// The read (a dump, for nftables: with the protected set it saw) is
    /// complete.
    End(Option<BTreeSet<(Protocol, u16)>>),
}

/// nftables elements, each with the time it had left, read between `from`
/// and `until` on the boot clock.
pub struct NftChunk {
    pub(super) allowed: Vec<(GrantTarget, Duration)>,
    pub(super) strays: Vec<StrayElement>,
    pub(super) from: Deadline,
    pub(super) until: Deadline,
}

impl NftChunk {
    fn new(from: Deadline) -> NftChunk {
        NftChunk {
            allowed: Vec::new(),
            strays: Vec::new(),
            from,
            until: from,
        }
    }

    fn len(&self) -> usize {
        self.allowed.len() + self.strays.len()
    }
}

/// Reads one layer's grant entries, on any thread.
pub struct KernelReader {
    layer: Source,
    credits: mpsc::Receiver<Go>,
}

#[expect(
    clippy::large_enum_variant,
    reason = "one reader a cycle, moved once to its thread"
)]
enum Source {
    Xdp(GrantReader),
    Nft(NftGate),
}

impl KernelReader {
    pub(super) fn xdp(reader: GrantReader, credits: mpsc::Receiver<Go>) -> KernelReader {
        KernelReader {
            layer: Source::Xdp(reader),
            credits,
        }
    }

    pub(super) fn nft(gate: NftGate, credits: mpsc::Receiver<Go>) -> KernelReader {
        KernelReader {
            layer: Source::Nft(gate),
            credits,
        }
    }

    /// Reads the layer, giving `send` each part in turn, until the read
    /// is complete, fails (one `Err`, the last), or the comparison is gone
    /// (`send` returns false, or the credits end).
    pub fn read(self, send: impl FnMut(anyhow::Result<KernelRead>) -> bool) {
        let mut outlet = Outlet::new(send, self.credits);
        match &self.layer {
            Source::Xdp(reader) => read_xdp(reader, &mut outlet),
            Source::Nft(gate) => read_nft(gate, &mut outlet),
        }
    }
}

fn read_xdp<S: FnMut(anyhow::Result<KernelRead>) -> bool>(
    reader: &GrantReader,
    outlet: &mut Outlet<S>,
) {
    let mut chunk = Vec::with_capacity(CHUNK);
    let read = reader.for_each_entry(|entry| {
        if outlet.open {
            chunk.push(entry);
            if chunk.len() == CHUNK {
                outlet.chunk(KernelRead::Xdp(std::mem::replace(
                    &mut chunk,
                    Vec::with_capacity(CHUNK),
                )));
            }
        }
    });
    match read {
        Ok(()) => {
            if !chunk.is_empty() {
                outlet.chunk(KernelRead::Xdp(chunk));
            }
            outlet.end(KernelRead::End(None));
        }
        Err(e) => outlet.fail(e.into()),
    }
}

fn read_nft<S: FnMut(anyhow::Result<KernelRead>) -> bool>(gate: &NftGate, outlet: &mut Outlet<S>) {
    let mut only = None;
    for dump in 1..=2 {
        if dump == 2 {
            match outlet.second_dump_wanted() {
                Some(sets) => only = Some(sets),
                None => return,
            }
        }
        let from = Deadline::now();
        let mut chunk = NftChunk::new(from);
        let mut protected = BTreeSet::new();
        let read = gate.stream(only.as_ref(), |element| {
            if !outlet.open {
                return;
            }
            match element {
                ElementRead::Protected(service) => {
                    protected.insert(service);
                }
                ElementRead::Allowed(target, left) => chunk.allowed.push((target, left)),
                ElementRead::Stray(stray) => chunk.strays.push(stray),
            }
            if chunk.len() == CHUNK {
                chunk.until = Deadline::now();
                outlet.chunk(KernelRead::Nft(std::mem::replace(
                    &mut chunk,
                    NftChunk::new(from),
                )));
            }
        });
        match read {
            Ok(true) => {
                if chunk.len() > 0 {
                    chunk.until = Deadline::now();
                    outlet.chunk(KernelRead::Nft(chunk));
                }
                outlet.end(KernelRead::End(Some(protected)));
            }
            Ok(false) => {
                return outlet.fail(anyhow::anyhow!(
                    "table {} vanished while read",
                    gate.table()
                ));
            }
            Err(e) => return outlet.fail(e.into()),
        }
    }
}

/// Where the reader's parts go, and whether the comparison still wants them.
struct Outlet<S: FnMut(anyhow::Result<KernelRead>) -> bool> {
    send: S,
    credits: mpsc::Receiver<Go>,
    open: bool,
    /// The last `End` the comparison waits for was sent.
    complete: bool,
}

impl<S: FnMut(anyhow::Result<KernelRead>) -> bool> Outlet<S> {
    fn new(send: S, credits: mpsc::Receiver<Go>) -> Self {
        Outlet {
            send,
            credits,
            open: true,
            complete: false,
        }
    }

    /// Sends a chunk once the comparison has room for it.
    fn chunk(&mut self, read: KernelRead) {
        self.open =
            self.open && matches!(self.credits.recv(), Ok(Go::Chunk)) && (self.send)(Ok(read));
    }

    fn end(&mut self, read: KernelRead) {
        self.open = self.open && (self.send)(Ok(read));
        self.complete = true;
    }

    fn fail(&mut self, error: anyhow::Error) {
        if self.open {
            (self.send)(Err(error));
        }
        self.open = false;
    }

    /// Waits for the comparison's word after a dump: the sets to dump
    /// again, or stop (it dropped its side).
    fn second_dump_wanted(&mut self) -> Option<BTreeSet<String>> {
        while self.open {
            match self.credits.recv() {
                Ok(Go::Chunk) => {}
                Ok(Go::SecondDump(sets)) => {
                    self.complete = false;
                    return Some(sets);
                }
                Err(_) => self.open = false,
            }
        }
        None
    }
}

/// A reader that stops before its read is complete (a panic unwinding
/// through it) says so: the comparison would otherwise wait for its end,
/// and the layer would never be reconciled again.
impl<S: FnMut(anyhow::Result<KernelRead>) -> bool> Drop for Outlet<S> {
    fn drop(&mut self) {
        if !self.complete {
            self.fail(anyhow::anyhow!(
                "the kernel reader stopped before the end of its read"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type SendPart = Box<dyn FnMut(anyhow::Result<KernelRead>) -> bool>;
    type Parts = mpsc::Receiver<anyhow::Result<KernelRead>>;

    /// An outlet whose parts go to the returned channel, with `credits`.
    fn outlet(credits: usize) -> (Outlet<SendPart>, Parts) {
        let (parts, received) = mpsc::channel();
        let (give, take) = mpsc::channel();
        for _ in 0..credits {
            give.send(Go::Chunk).unwrap();
        }
        let send: SendPart = Box::new(move |part| parts.send(part).is_ok());
        (Outlet::new(send, take), received)
    }

    #[test]
    fn a_reader_dropped_before_its_end_reports_it() {
        let (mut out, received) = outlet(1);
        out.chunk(KernelRead::Xdp(Vec::new()));
        drop(out);
        assert!(matches!(received.recv(), Ok(Ok(KernelRead::Xdp(_)))));
        let error = received.recv().unwrap().err().expect("an error at the end");
        assert!(
            error.to_string().contains("stopped before the end"),
            "{error}"
        );
    }

    #[test]
    fn a_complete_read_ends_with_its_end_alone() {
        let (mut out, received) = outlet(1);
        out.end(KernelRead::End(None));
        drop(out);
        assert!(matches!(received.recv(), Ok(Ok(KernelRead::End(None)))));
        assert!(received.recv().is_err(), "nothing after the end");
    }

    #[test]
    fn a_reader_the_comparison_let_go_sends_nothing_more() {
        let (mut out, received) = outlet(0);
        // No credit, and the comparison's side gone: the chunk is dropped.
        out.credits = mpsc::channel().1;
        out.chunk(KernelRead::Xdp(Vec::new()));
        drop(out);
        assert!(received.recv().is_err());
    }
}
