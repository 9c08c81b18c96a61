//! Integration tests of the delivery server: real QUIC on loopback port 0,
//! real SQLCipher files in temporary directories, a real PostgreSQL.

#[cfg(test)]
mod admin;
#[cfg(test)]
mod attacks;
#[cfg(test)]
mod auth;
#[cfg(test)]
mod binary;
#[cfg(test)]
mod delivery;
#[cfg(test)]
mod docs_reference;
#[cfg(test)]
mod e2e;
#[cfg(test)]
mod keypackages;
#[cfg(test)]
mod metrics;
#[cfg(test)]
mod multinode;
#[cfg(test)]
mod packaging;
#[cfg(test)]
mod production;
#[cfg(test)]
mod rekey;
#[cfg(test)]
mod restore;
#[cfg(test)]
mod rotation;
#[cfg(test)]
mod store;
#[cfg(test)]
mod support;
#[cfg(test)]
mod tidy;
