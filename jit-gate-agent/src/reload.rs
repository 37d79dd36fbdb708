//! Reloading the configuration file while running: read and validate it
//! again, and the TLS files it names; anything bad changes nothing. One
//! path for SIGHUP and the `ReloadConfiguration` call (which `systemctl
//! reload` makes, so a refused reload fails the reload job).

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use tokio::sync::Mutex;

use crate::{
    auth::UidRole,
    config::Config,
    engine::{Command, EngineHandle},
    tls::server::TlsServer,
};

/// What a reload needs: the file, the engine, and the parts of the
/// configuration held outside the engine (the callers' roles, the TLS
/// listener's certificates).
pub struct Reloader {
    path: PathBuf,
    engine: EngineHandle,
    principals: Arc<RwLock<Vec<UidRole>>>,
    tls: Option<Arc<TlsServer>>,
    /// One reload at a time: two racing reloads could install principals
    /// and certificates from different files.
    running: Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        engine: EngineHandle,
        principals: Arc<RwLock<Vec<UidRole>>>,
        tls: Option<Arc<TlsServer>>,
    ) -> Self {
        Reloader {
            path,
            engine,
            principals,
            tls,
            running: Mutex::new(()),
        }
    }

    /// Reloads the file; on refusal returns why, with the running
    /// configuration kept. Logs the outcome either way.
    pub async fn reload(&self) -> Result<(), String> {
        let _one_at_a_time = self.running.lock().await;
        let outcome = self.try_reload().await;
        match &outcome {
            Ok(()) => tracing::info!("configuration reloaded from {}", self.path.display()),
            Err(e) => tracing::error!("reload refused, running configuration kept: {e}"),
        }
        outcome
    }

    async fn try_reload(&self) -> Result<(), String> {
        let config = Config::load(&self.path).map_err(|e| e.to_string())?;
        let new_principals = config.api.principals.clone();
        // The listener's addresses cannot change (the engine refuses that);
        // its files are read again, and must be good, before anything changes.
        let tls_set = match (&self.tls, &config.api.tls) {
            (Some(server), Some(tls_config)) => Some(
                server
                    .prepare(tls_config)
                    .map_err(|e| format!("api.tls: {e}"))?,
            ),
            _ => None,
        };
        self.engine
            .call(|reply| Command::Reload {
                config: Box::new(config),
                reply,
            })
            .await
            .map_err(|e| e.message)?;
        *self.principals.write().expect("principals lock") = new_principals;
        if let (Some(server), Some(prepared)) = (&self.tls, tls_set) {
            server.install(prepared);
        }
        Ok(())
    }
}
