//! Safety numbers: a number two people compare (in person, or over a call
//! they trust) to know that each holds the other's real identity key, so
//! neither the server nor anyone in between can have substituted one.
//!
//! The derivation follows Signal's numeric fingerprints, with the identity
//! key and username of each side:
//!
//! 1. For each party, `h = SHA-512(version ‖ key ‖ username)` with `version`
//!    the two bytes `00 00`, `key` the 32-byte Ed25519 identity key and
//!    `username` its UTF-8 bytes; then 5 199 more times
//!    `h = SHA-512(h ‖ key)` (5 200 hashes in all, to make searching for a
//!    key with a colliding number costly).
//! 2. The first 30 bytes of `h` are six 5-byte big-endian integers; each
//!    modulo 100 000 gives five decimal digits: 30 digits per party.
//! 3. The safety number is the two 30-digit halves, the smaller first (so
//!    both sides compute the same number), shown as twelve groups of five.
//!
//! It depends only on the two identity keys and usernames: key packages,
//! MLS leaf keys and key updates do not change it; any other identity key
//! does.

use std::fmt;

use crate::identity::IdentityKey;

/// Version of the derivation (hashed in; a new derivation gets a new one).
const VERSION: [u8; 2] = [0, 0];

/// Hashes per party.
const ITERATIONS: usize = 5_200;

/// A safety number: 60 decimal digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SafetyNumber {
    digits: String,
}

impl SafetyNumber {
    /// The safety number of two parties, each a (username, identity key);
    /// the same whichever side computes it.
    pub fn of(a: (&str, &IdentityKey), b: (&str, &IdentityKey)) -> Self {
        let (x, y) = (half(a.0, a.1), half(b.0, b.1));
        let digits = if x <= y { x + &y } else { y + &x };
        Self { digits }
    }

    /// The 60 digits, without separators.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// The twelve groups of five digits.
    pub fn groups(&self) -> Vec<&str> {
        (0..12)
            .filter_map(|i| self.digits.get(i * 5..i * 5 + 5))
            .collect()
    }
}

impl fmt::Display for SafetyNumber {
    /// Three lines of four groups, as people read them aloud.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = self.groups();
        for (i, line) in groups.chunks(4).enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&line.join(" "))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SafetyNumber").field(&self.digits).finish()
    }
}

/// One party's 30 digits.
fn half(username: &str, key: &IdentityKey) -> String {
    use ring::digest::{Context, SHA512};
    let mut ctx = Context::new(&SHA512);
    ctx.update(&VERSION);
    ctx.update(key.as_bytes());
    ctx.update(username.as_bytes());
    let mut h = ctx.finish();
    for _ in 1..ITERATIONS {
        let mut ctx = Context::new(&SHA512);
        ctx.update(h.as_ref());
        ctx.update(key.as_bytes());
        h = ctx.finish();
    }
    h.as_ref()
        .get(..30)
        .unwrap_or_default()
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdentityKey {
        crate::Identity::generate().unwrap().public_key()
    }

    fn key_from_hex(h: &str) -> IdentityKey {
        IdentityKey::from_slice(&hex::decode(h).unwrap()).unwrap()
    }

    /// Computed independently from the derivation in the module comment
    /// (Python's hashlib), with the public keys of RFC 8032's tests 1 and 2.
    #[test]
    fn known_answer() {
        let alice =
            key_from_hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let bob = key_from_hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        let n = SafetyNumber::of(("bob", &bob), ("alice", &alice));
        assert_eq!(
            n.digits(),
            "491180447809943620315796171840764295668596237962521653335453"
        );
        assert_eq!(
            n.to_string(),
            "49118 04478 09943 62031\n57961 71840 76429 56685\n96237 96252 16533 35453"
        );
    }

    #[test]
    fn both_sides_compute_the_same_number_and_any_other_key_changes_it() {
        let (a, b, c) = (key(), key(), key());
        let ab = SafetyNumber::of(("alice", &a), ("bob", &b));
        assert_eq!(ab, SafetyNumber::of(("bob", &b), ("alice", &a)));
        assert_eq!(ab.digits().len(), 60);
        assert!(ab.digits().bytes().all(|d| d.is_ascii_digit()));
        assert_ne!(ab, SafetyNumber::of(("alice", &a), ("bob", &c)));
        assert_ne!(ab, SafetyNumber::of(("alice", &c), ("bob", &b)));
        assert_ne!(ab, SafetyNumber::of(("alice", &a), ("bobby", &b)));
        assert_eq!(ab.to_string().lines().count(), 3);
    }
}
