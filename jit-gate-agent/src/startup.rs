//! Start-up checks that cannot lock the operator out: everything that can
//! fail — the database (missing while enforcement state exists, wrong
//! schema), the audit chain, the signing key, the API socket and its group —
//! is checked or opened here, before the engine attaches anything.

use std::{
    ffi::OsString,
    os::{
        fd::{FromRawFd, RawFd},
        unix::{
            fs::{FileTypeExt, PermissionsExt},
            net::UnixListener,
        },
    },
    path::Path,
};

use anyhow::{Context, bail};

use crate::{
    audit::Broken,
    checkpoint::{CheckpointKey, verify_log},
    config::{self, Config},
    enforce::nft::NftGate,
    engine::Prepared,
    store::Store,
};

/// The command-line flag that creates a missing database although
/// enforcement state exists, recording that in the new chain.
pub const REINITIALIZE_FLAG: &str = "--reinitialize";

/// Opens and checks everything the engine needs; returns it with the API
/// socket (bound, or passed by systemd socket activation).
pub fn prepare(config: &Config, reinitialize: bool) -> anyhow::Result<(Prepared, UnixListener)> {
    let reinitialized = check_database(config, reinitialize)?;
    let store = Store::open(&config.database).context("opening the database")?;
    let key = open_key(&config.signing_key())?;
    let chain = verify_store(&store, &key).context("reading the audit log")?;
    let listener = listener(config).context("opening the API socket")?;
    Ok((
        Prepared {
            store,
            key,
            chain,
            reinitialized,
        },
        listener,
    ))
}

/// Refuses a missing database while enforcement state exists (a deleted
/// database would otherwise start a new audit chain without a word),
/// unless `reinitialize`; returns what was found in that case.
fn check_database(config: &Config, reinitialize: bool) -> anyhow::Result<Option<String>> {
    if config.database.exists() {
        if reinitialize {
            bail!(
                "{REINITIALIZE_FLAG} creates a missing database, but {} exists; nothing changed",
                config.database.display()
            );
        }
        return Ok(None);
    }
    let mut found = Vec::new();
    if std::fs::read_dir(&config.pin_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        found.push(format!("pinned XDP state in {}", config.pin_dir.display()));
    }
    let table = NftGate::new(config.nft_table.clone())
        .read()
        .context("looking for the agent's nftables table")?;
    if table.is_some() {
        found.push(format!("nftables table inet {}", config.nft_table));
    }
    if found.is_empty() {
        return Ok(None);
    }
    let found = found.join(" and ");
    if !reinitialize {
        bail!(
            "the database {} is missing but enforcement state exists ({found}): its grants and audit log are gone. \
             Restore the database, or start with {REINITIALIZE_FLAG} to begin a new database and audit chain \
             (recorded as its first record); nothing was attached or changed",
            config.database.display()
        );
    }
    tracing::warn!(
        "{REINITIALIZE_FLAG}: creating {} although {found}",
        config.database.display()
    );
    Ok(Some(found))
}

fn open_key(path: &Path) -> anyhow::Result<CheckpointKey> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(CheckpointKey::load_or_create(path)?)
}

/// Verifies the stored chain and the stored checkpoints.
fn verify_store(store: &Store, key: &CheckpointKey) -> anyhow::Result<Result<(), Broken>> {
    let checkpoints = store.checkpoints()?;
    let report = verify_log(
        |after| store.audit_after(after, 1000),
        &checkpoints,
        &key.verifying_key(),
    )?;
    Ok(match report.broken {
        Some(broken) => Err(broken),
        None => Ok(()),
    })
}

/// The socket systemd passed (socket activation: `LISTEN_PID` is this
/// process, `LISTEN_FDS` ≥ 1, the socket is fd 3), else one bound here.
fn listener(config: &Config) -> anyhow::Result<UnixListener> {
    if let Some(fd) = activated_fd()? {
        // SAFETY: systemd passes fd 3 open to this process alone and we
        // take ownership of it exactly once.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        let address = listener
            .local_addr()
            .context("the socket passed by systemd is not a Unix stream socket")?;
        tracing::info!(
            "using the socket passed by systemd ({:?})",
            address.as_pathname()
        );
        if address.as_pathname() != Some(config.api.unix_socket.as_path()) {
            tracing::warn!(
                "the socket passed by systemd is not api.unix_socket ({})",
                config.api.unix_socket.display()
            );
        }
        listener.set_nonblocking(true)?;
        return Ok(listener);
    }
    bind(&config.api.unix_socket, config.api.socket_group.as_deref())
}

fn activated_fd() -> anyhow::Result<Option<RawFd>> {
    const FIRST: RawFd = 3;
    let var = |name: &str| std::env::var_os(name).map(OsString::into_string);
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(None);
    };
    let (Ok(pid), Ok(fds)) = (pid, fds) else {
        bail!("LISTEN_PID/LISTEN_FDS are not text");
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    match fds.parse::<u32>() {
        Ok(0) | Err(_) => bail!("LISTEN_FDS={fds:?}: systemd passed no socket"),
        Ok(1) => {}
        Ok(n) => tracing::warn!("systemd passed {n} sockets; serving on the first"),
    }
    // Not for the children of this process.
    // SAFETY: called at start, before any other thread exists.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    Ok(Some(FIRST))
}

/// Binds the socket: stale sockets are replaced, anything else at the path
/// is refused. Mode 0600 (0660 with a group). The parent directory is
/// created (0700, 0750 with a group) only if missing; an existing one is
/// never changed.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let gid = group
        .map(config::group_id)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mode = if gid.is_some() { 0o750 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {}", dir.display()))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(dir, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "giving {} to group {gid} (needs CAP_CHOWN; under systemd prefer the shipped .socket unit with SocketGroup=)",
                path.display()
            )
        })?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}
