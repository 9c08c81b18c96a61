//! Integration tests of the core: MLS flows between real profiles on disk.

#[cfg(test)]
mod groups;
#[cfg(test)]
mod migration;
#[cfg(test)]
mod weak_keys;
