//! SIGINT and SIGTERM for the benchmarks: a flag the run checks between
//! steps, so that it returns an error and its namespaces, pins and programs
//! are dropped (removed) on the way out instead of left behind.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, ensure};
use signal_hook::consts::{SIGINT, SIGTERM};

#[derive(Clone)]
pub struct Interruption(Arc<AtomicBool>);

impl Interruption {
    /// Handles SIGINT and SIGTERM from now on.
    pub fn register() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&flag))
                .context("handle SIGINT and SIGTERM")?;
        }
        Ok(Interruption(flag))
    }

    /// Waits until a signal comes, then gives the error `check` gives: for
    /// racing async work that has no step boundary to check at.
    pub async fn signalled(&self) -> anyhow::Error {
        loop {
            if let Err(e) = self.check() {
                return e;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// An error once a signal came.
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.0.load(Ordering::Relaxed),
            "interrupted; namespaces, pins and programs removed"
        );
        Ok(())
    }
}
