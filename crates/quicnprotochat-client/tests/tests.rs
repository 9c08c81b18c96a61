//! Integration tests of the client: the command-line client as spawned
//! processes against a real server.

#[cfg(test)]
mod cli;
#[cfg(test)]
mod docs_reference;
#[cfg(test)]
mod failover;
#[cfg(test)]
mod files;
#[cfg(test)]
mod flood;
#[cfg(test)]
mod idle;
#[cfg(test)]
mod keyupdates;
#[cfg(test)]
mod locks;
#[cfg(test)]
mod outbox;
#[cfg(test)]
mod p2p;
#[cfg(test)]
mod rate_limits;
#[cfg(test)]
mod recovery;
#[cfg(test)]
mod shown;
#[cfg(test)]
mod tui;
#[cfg(test)]
mod verify;
