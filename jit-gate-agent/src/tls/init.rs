//! `jit-gate-agent tls init` and `tls client`: a working mutual-TLS pair
//! in one command — a CA, a server certificate for this host's names and
//! addresses, client certificates for named principals — and the
//! configuration that uses them.

use std::{
    ffi::CStr,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::tls::{
    config::DEFAULT_PORT,
    pki::{Ca, Leaf, Usage, client_uri, valid_client_name, write_private},
};

const CA_LIFETIME: Duration = Duration::from_hours(10 * 365 * 24);

pub struct InitOptions {
    pub dir: PathBuf,
    /// DNS names for the server certificate (besides the host name).
    pub names: Vec<String>,
    /// Addresses for the server certificate; empty: this namespace's.
    pub addresses: Vec<IpAddr>,
    pub clients: Vec<String>,
    pub lifetime: Duration,
}

/// Files of one certificate: `<stem>.pem` and `<stem>.key`.
fn pair(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

fn write_pair(dir: &Path, stem: &str, certificate: &str, key: &str) -> anyhow::Result<()> {
    let (cert_path, key_path) = pair(dir, stem);
    for (path, contents) in [(&cert_path, certificate), (&key_path, key)] {
        write_private(path, contents).with_context(|| {
            format!(
                "writing {} (existing files are never overwritten)",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Creates the CA, the server certificate and the client certificates in
/// `dir`; returns what to put in the agent's configuration.
pub fn init(options: &InitOptions) -> anyhow::Result<String> {
    for client in &options.clients {
        valid_client_name(client).map_err(anyhow::Error::msg)?;
    }
    let dir = &options.dir;
    // Refuse before writing anything if any file is there.
    let mut stems = vec!["ca".to_owned(), "server".to_owned()];
    stems.extend(options.clients.iter().map(|c| format!("client-{c}")));
    for stem in &stems {
        let (cert, key) = pair(dir, stem);
        for path in [cert, key] {
            if path.exists() {
                bail!("{} exists; tls init never overwrites", path.display());
            }
        }
    }
    create_private_dir(dir)?;
    let host = host_name()?;
    let ca = Ca::generate(&format!("jit-gate CA ({host})"), CA_LIFETIME)?;
    write_pair(dir, "ca", ca.certificate_pem(), &ca.key_pem())?;
    let mut server = Leaf::new(&host, Usage::Server, options.lifetime);
    server.dns_names = std::iter::once(host.clone())
        .chain(["localhost".to_owned()])
        .chain(options.names.iter().cloned())
        .collect();
    server.dns_names.dedup();
    server.addresses = if options.addresses.is_empty() {
        local_addresses()?
    } else {
        options.addresses.clone()
    };
    let issued = ca.issue(&server)?;
    write_pair(dir, "server", &issued.certificate, &issued.key)?;
    issue_clients(&ca, dir, &options.clients, options.lifetime)?;
    let (ca_pem, _) = pair(dir, "ca");
    let (server_pem, server_key) = pair(dir, "server");
    let principals: Vec<String> = options
        .clients
        .iter()
        .map(|c| format!("  {{ uri = \"{}\", role = \"broker\" }},", client_uri(c)))
        .collect();
    Ok(format!(
        "# CA ({ca}), server certificate for {names} and {addresses}\n\
         # Add to the agent's configuration (roles: auditor, broker, admin):\n\
         [api.tls]\n\
         listen = [\"0.0.0.0:{DEFAULT_PORT}\", \"[::]:{DEFAULT_PORT}\"]\n\
         certificate = \"{server_pem}\"\n\
         key = \"{server_key}\"\n\
         client_ca = [\"{ca_pem}\"]\n\
         principals = [\n{principals}\n]\n{clients}",
        ca = ca_pem.display(),
        names = server.dns_names.join(", "),
        addresses = server
            .addresses
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        server_pem = server_pem.display(),
        server_key = server_key.display(),
        ca_pem = ca_pem.display(),
        principals = principals.join("\n"),
        clients = client_usage(dir, &options.clients),
    ))
}

/// Issues more client certificates from the CA that `init` made in `dir`.
pub fn add_clients(dir: &Path, clients: &[String], lifetime: Duration) -> anyhow::Result<String> {
    for client in clients {
        valid_client_name(client).map_err(anyhow::Error::msg)?;
    }
    let (ca_pem, ca_key) = pair(dir, "ca");
    let ca = Ca::load(&ca_pem, &ca_key)?;
    issue_clients(&ca, dir, clients, lifetime)?;
    let principals: Vec<String> = clients
        .iter()
        .map(|c| format!("{{ uri = \"{}\", role = \"broker\" }}", client_uri(c)))
        .collect();
    Ok(format!(
        "# Add to api.tls.principals: {}\n{}",
        principals.join(", "),
        client_usage(dir, clients)
    ))
}

fn issue_clients(
    ca: &Ca,
    dir: &Path,
    clients: &[String],
    lifetime: Duration,
) -> anyhow::Result<()> {
    for client in clients {
        let mut leaf = Leaf::new(client, Usage::Client, lifetime);
        leaf.uris.push(client_uri(client));
        let issued = ca.issue(&leaf)?;
        write_pair(
            dir,
            &format!("client-{client}"),
            &issued.certificate,
            &issued.key,
        )?;
    }
    Ok(())
}

fn client_usage(dir: &Path, clients: &[String]) -> String {
    use std::fmt::Write as _;
    let (ca_pem, _) = pair(dir, "ca");
    clients.iter().fold(String::new(), |mut out, client| {
        let (cert, key) = pair(dir, &format!("client-{client}"));
        let _ = writeln!(
            out,
            "# Client {client}: jit-gate --ca {} --cert {} --key {} --agent https://HOST:{DEFAULT_PORT} status",
            ca_pem.display(),
            cert.display(),
            key.display()
        );
        out
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn host_name() -> anyhow::Result<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the host name");
    }
    let name = CStr::from_bytes_until_nul(&buffer)
        .context("host name is not terminated")?
        .to_str()
        .context("host name is not UTF-8")?;
    Ok(name.to_owned())
}

/// The addresses of this network namespace's interfaces (link-local IPv6
/// left out: a certificate cannot name their scope).
fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut addresses = Vec::new();
    let mut next = list;
    while !next.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*next };
        next = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its type.
        let address = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let v4 = std::ptr::read_unaligned(entry.ifa_addr.cast::<libc::sockaddr_in>());
                    IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let v6 = std::ptr::read_unaligned(entry.ifa_addr.cast::<libc::sockaddr_in6>());
                    IpAddr::from(v6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local = matches!(address, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if !link_local && !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn init_writes_private_files_once_and_the_configuration_that_uses_them() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let options = InitOptions {
            dir: tls.clone(),
            names: vec!["agent.example.org".into()],
            addresses: vec!["192.0.2.1".parse().unwrap()],
            clients: vec!["broker-1".into()],
            lifetime: Duration::from_hours(1),
        };
        let snippet = init(&options).unwrap();
        assert!(
            snippet.contains("uri = \"urn:jit-gate:broker-1\""),
            "{snippet}"
        );
        // The snippet is valid configuration.
        let table = snippet
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: toml::Table = toml::from_str(&table).unwrap();
        let config: crate::tls::config::TlsConfig =
            parsed["api"]["tls"].clone().try_into().unwrap();
        config.validate().unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&tls)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "ca.key",
                "ca.pem",
                "client-broker-1.key",
                "client-broker-1.pem",
                "server.key",
                "server.pem"
            ]
        );
        for file in &files {
            let mode = std::fs::metadata(tls.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = std::fs::metadata(&tls).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A second init changes nothing.
        let err = init(&options).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");
        // More clients from the same CA.
        add_clients(&tls, &["ops".into()], Duration::from_hours(1)).unwrap();
        assert!(tls.join("client-ops.pem").exists());
        let err = add_clients(&tls, &["ops".into()], Duration::from_hours(1)).unwrap_err();
        assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
        let err = init(&InitOptions {
            clients: vec!["a b".into()],
            ..options
        })
        .unwrap_err();
        assert!(err.to_string().contains("letters, digits"), "{err}");
    }

    #[test]
    fn local_addresses_include_loopback() {
        let addresses = local_addresses().unwrap();
        assert!(
            addresses.contains(&IpAddr::from([127, 0, 0, 1])),
            "{addresses:?}"
        );
    }
}
