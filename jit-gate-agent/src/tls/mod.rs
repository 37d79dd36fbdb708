//! The API over TCP with mandatory mutual TLS: configuration, certificate
//! material, the client-certificate verifier, principals from certificates,
//! the reloadable listener, the client side, and a small PKI for a first
//! install.

pub mod client;
pub mod config;
pub mod identity;
pub mod init;
pub mod material;
pub mod pki;
mod reports;
pub mod server;
pub mod verifier;
