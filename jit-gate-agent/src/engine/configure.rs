//! Configuration applied at run time: a reload (only fields that can
//! change without a restart), and the configuration file's policy applied
//! when it changed since it was last applied.

use std::time::SystemTime;

use super::{Engine, PolicyChange};
use crate::{
    audit::{AGENT, Event, Kind},
    config::Config,
    policy::{Policy, PortRule},
    refusal::{Refusal, RefusalKind},
    store::Store,
};

const CONFIG_POLICY_KEY: &str = "config_policy_digest";

fn policy_digest(rules: &[PortRule]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(rules).expect("rules serialise"),
    ))
}

/// The first policy of a new database: the configuration's, else the default.
pub(super) fn initial_policy(store: &mut Store, config: &Config) -> anyhow::Result<Policy> {
    let policy = match &config.policy {
        Some(rules) => Policy {
            rules: rules.clone(),
            revision: 1,
        },
        None => Policy::default(),
    };
    let mut batch = store.batch()?;
    batch.save_policy(&policy)?;
    if let Some(rules) = &config.policy {
        batch.set_meta(CONFIG_POLICY_KEY, &policy_digest(rules))?;
    }
    batch.audit(
        Event::new(Kind::PolicyChanged, AGENT, 0, "initial policy")
            .with_details(serde_json::json!({ "policy": policy })),
        SystemTime::now(),
    )?;
    batch.commit()?;
    Ok(policy)
}

impl Engine {
    pub(super) fn reload(&mut self, config: Config) -> Result<(), Refusal> {
        for (field, same) in [
            ("mode", config.mode == self.config.mode),
            ("database", config.database == self.config.database),
            ("pin_dir", config.pin_dir == self.config.pin_dir),
            ("nft_table", config.nft_table == self.config.nft_table),
            ("flows", config.flows == self.config.flows),
            ("denials", config.denials == self.config.denials),
            ("metrics", config.metrics == self.config.metrics),
            (
                "api.unix_socket",
                config.api.unix_socket == self.config.api.unix_socket,
            ),
            (
                "api.tls.listen",
                config.api.tls.as_ref().map(|t| &t.listen)
                    == self.config.api.tls.as_ref().map(|t| &t.listen),
            ),
            (
                "api.max_streams_per_principal",
                config.api.max_streams_per_principal == self.config.api.max_streams_per_principal,
            ),
            (
                "api.stream_stall_timeout",
                config.api.stream_stall_timeout == self.config.api.stream_stall_timeout,
            ),
            (
                "audit.signing_key",
                config.audit.signing_key == self.config.audit.signing_key,
            ),
            ("fleet", config.fleet == self.config.fleet),
        ] {
            if !same {
                return Err(Refusal::new(
                    RefusalKind::FailedPrecondition,
                    format!("field `{field}` cannot change without a restart; configuration kept"),
                ));
            }
        }
        let interfaces_changed = (&config.interfaces, &config.exclude_interfaces)
            != (&self.config.interfaces, &self.config.exclude_interfaces);
        self.config = config;
        if interfaces_changed {
            self.enforcement.set_config(&self.config);
            let repairs = self
                .enforcement
                .scan_interfaces()
                .map_err(|e| Refusal::internal("gating the interfaces", format!("{e:#}")))?;
            self.record_drift(&repairs)
                .map_err(|e| Refusal::internal("recording drift", format!("{e:#}")))?;
        }
        self.apply_config_policy()
            .map_err(|e| Refusal::internal("applying the configured policy", e))?;
        self.commit_events(vec![
            Event::new(Kind::ConfigReloaded, AGENT, 0, "configuration reloaded")
                .with_details(serde_json::json!({ "interfaces": self.config.interfaces })),
        ])
        .map_err(|e| Refusal::internal("recording the reload", e))
    }

    /// Applies the configuration file's policy if it changed since it was
    /// last applied (API changes stand until the file's policy is edited).
    pub(super) fn apply_config_policy(&mut self) -> anyhow::Result<()> {
        let Some(rules) = self.config.policy.clone() else {
            return Ok(());
        };
        let digest = policy_digest(&rules);
        if self.store.meta(CONFIG_POLICY_KEY)?.as_deref() == Some(digest.as_str()) {
            return Ok(());
        }
        self.update_policy("config", PolicyChange::Replace(rules), 0)?;
        let mut batch = self.store.batch()?;
        batch.set_meta(CONFIG_POLICY_KEY, &digest)?;
        batch.commit()?;
        Ok(())
    }
}
