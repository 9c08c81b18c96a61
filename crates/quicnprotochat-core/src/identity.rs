//! Ed25519 identity keys.
//!
//! An identity is an Ed25519 signature key pair.  Its 32-byte public key is
//! the identity the server knows, the recipient key of the identity's queue,
//! and the MLS leaf signature key.
//!
//! Verification is strict.  Plain Ed25519 verification (RFC 8032, *ring*,
//! `ed25519-dalek`'s `verify`) accepts keys that have no private key: the
//! identity point `01 00…00` with the signature R = `01 00…00`, S = 0
//! "verifies" for every message, and the other small-order points for a
//! fraction of messages.  So a key that arrives as a claim of identity (an
//! authentication, a key package, a group member's credential) must be
//! [`IdentityKey::check`]ed, and [`IdentityKey::verify`] does that itself:
//!
//! - the key and the signature's R are canonical encodings (y < p, and no
//!   "negative zero" x), decompress to curve points, are not of small
//!   order, and lie in the prime-order subgroup (no torsion component);
//! - S is a canonical scalar (S < L);
//! - then the cofactorless equation [S]B = R + [k]A, computed by *ring*.
//!
//! Every honestly generated key and signature passes (A = aB and R = rB lie
//! in the prime-order subgroup); the rule only refuses crafted input.

use std::fmt;

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;

/// Errors of identity key operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// key generation failed in the crypto backend
    #[error("key generation failed")]
    Generate,
    /// signing failed in the crypto backend
    #[error("signing failed")]
    Sign,
    /// a key has the wrong length
    #[error("an identity key is {expected} bytes, got {got}")]
    KeyLength {
        /// required length
        expected: usize,
        /// actual length
        got: usize,
    },
    /// a signature did not verify (or is not in canonical form)
    #[error("signature verification failed")]
    BadSignature,
    /// a public key that no honest key generation produces: a non-canonical
    /// encoding, not a curve point, of small order, or outside the
    /// prime-order subgroup
    #[error("not a canonical Ed25519 public key of prime order")]
    WeakKey,
}

/// Decodes `bytes` as an Edwards point and keeps it only if the encoding is
/// canonical and the point lies in the prime-order subgroup without being
/// the identity.
fn strict_point(bytes: &[u8; 32]) -> Option<EdwardsPoint> {
    let point = CompressedEdwardsY(*bytes).decompress()?;
    // decompress reduces y mod p and accepts a sign bit on x = 0; the
    // re-encoding is canonical, so a mismatch means the input was not.
    let canonical = point.compress().as_bytes() == bytes;
    (canonical && !point.is_small_order() && point.is_torsion_free()).then_some(point)
}

/// A 32-byte Ed25519 public key: the public identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey(pub [u8; 32]);

impl IdentityKey {
    /// Parses a key from bytes of exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::KeyLength {
            expected: 32,
            got: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks that this is a key some private key belongs to: a canonical
    /// encoding of a point of prime order (see the module documentation).
    /// [`IdentityKey::verify`] does this itself; call it where a key arrives
    /// without a signature to verify under it yet.
    pub fn check(&self) -> Result<(), IdentityError> {
        strict_point(&self.0)
            .map(|_| ())
            .ok_or(IdentityError::WeakKey)
    }

    /// Verifies an Ed25519 signature by this key, strictly: a weak key is
    /// [`IdentityError::WeakKey`]; a signature whose R is not a canonical
    /// point of prime order or whose S is not reduced is
    /// [`IdentityError::BadSignature`] even where plain Ed25519 accepts it.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), IdentityError> {
        self.check()?;
        let sig: &[u8; 64] = signature
            .try_into()
            .map_err(|_| IdentityError::BadSignature)?;
        let (r, s) = sig.split_at(32);
        let r: [u8; 32] = r.try_into().map_err(|_| IdentityError::BadSignature)?;
        let s: [u8; 32] = s.try_into().map_err(|_| IdentityError::BadSignature)?;
        if strict_point(&r).is_none() || Scalar::from_canonical_bytes(s).is_none().into() {
            return Err(IdentityError::BadSignature);
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| IdentityError::BadSignature)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({})", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// An identity: the Ed25519 key pair.  `Debug` never shows the private key.
#[derive(Clone)]
pub struct Identity {
    keys: SignatureKeyPair,
    public: IdentityKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a fresh identity from the system's CSPRNG.
    pub fn generate() -> Result<Self, IdentityError> {
        let keys =
            SignatureKeyPair::new(SignatureScheme::ED25519).map_err(|_| IdentityError::Generate)?;
        Self::from_key_pair(keys)
    }

    /// Wraps an existing Ed25519 key pair (for example one loaded from storage).
    pub fn from_key_pair(keys: SignatureKeyPair) -> Result<Self, IdentityError> {
        let public = IdentityKey::from_slice(keys.public())?;
        Ok(Self { keys, public })
    }

    /// The public identity key.
    pub fn public_key(&self) -> IdentityKey {
        self.public
    }

    /// The underlying MLS signature key pair.
    pub fn key_pair(&self) -> &SignatureKeyPair {
        &self.keys
    }

    /// Signs `message` with Ed25519.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IdentityError> {
        self.keys.sign(message).map_err(|_| IdentityError::Sign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_under_the_public_key_only() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let sig = a.sign(b"hello").unwrap();
        assert_eq!(sig.len(), 64);
        a.public_key().verify(b"hello", &sig).unwrap();
        assert!(a.public_key().verify(b"hellO", &sig).is_err());
        assert!(b.public_key().verify(b"hello", &sig).is_err());
    }

    #[test]
    fn debug_does_not_leak_the_private_key() {
        let a = Identity::generate().unwrap();
        let dbg = format!("{a:?}");
        assert_eq!(
            dbg,
            format!("Identity {{ public: {:?}, .. }}", a.public_key())
        );
    }

    /// The eight points of small order, canonically encoded (the torsion
    /// subgroup of edwards25519; "Taming the many EdDSAs", table 6).
    const SMALL_ORDER: [&str; 8] = [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    ];

    fn key(hex_str: &str) -> [u8; 32] {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    /// p + k (p = 2^255 - 19) little-endian: a non-canonical encoding of
    /// y = k, for k < 19.
    fn p_plus(k: u8) -> [u8; 32] {
        let mut b = [0xff; 32];
        b[0] = 0xed + k;
        b[31] = 0x7f;
        b
    }

    /// Plain (RFC 8032 cofactorless) verification, as *ring* does it alone.
    fn plain_accepts(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(msg, sig)
            .is_ok()
    }

    #[test]
    fn the_small_order_list_is_the_torsion_subgroup() {
        let mut listed: Vec<[u8; 32]> = SMALL_ORDER.iter().map(|h| key(h)).collect();
        let mut torsion: Vec<[u8; 32]> = curve25519_dalek::constants::EIGHT_TORSION
            .iter()
            .map(|p| p.compress().to_bytes())
            .collect();
        listed.sort();
        torsion.sort();
        assert_eq!(listed, torsion);
    }

    #[test]
    fn small_order_keys_with_forged_signatures_are_refused() {
        // For each small-order key, signatures with a small-order R and S = 0
        // that plain Ed25519 accepts without any private key: found by
        // trying messages, as an attacker tries server nonces.
        let rs: Vec<[u8; 32]> = SMALL_ORDER.iter().map(|h| key(h)).collect();
        for a in SMALL_ORDER {
            let a = key(a);
            let ik = IdentityKey(a);
            assert!(
                matches!(ik.check(), Err(IdentityError::WeakKey)),
                "{a:02x?}"
            );
            let mut forged = 0;
            for i in 0u32..64 {
                let msg = format!("nonce {i}");
                for r in &rs {
                    let mut sig = [0u8; 64];
                    sig[..32].copy_from_slice(r);
                    if plain_accepts(&a, msg.as_bytes(), &sig) {
                        forged += 1;
                        assert!(matches!(
                            ik.verify(msg.as_bytes(), &sig),
                            Err(IdentityError::WeakKey)
                        ));
                    }
                }
            }
            assert!(forged > 0, "no forgery found for {a:02x?}");
        }
        // The case found on the wire: key 01 00…00, R = 01 00…00, S = 0,
        // accepted by plain verification for every message.
        let identity_point = key(SMALL_ORDER[0]);
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&identity_point);
        for msg in [&b"anything"[..], b"", b"nonce and exporter"] {
            assert!(plain_accepts(&identity_point, msg, &sig));
            assert!(IdentityKey(identity_point).verify(msg, &sig).is_err());
        }
    }

    #[test]
    fn non_canonical_and_off_curve_keys_are_refused() {
        // y >= p: p + k encodes y = k (k = 1 is the identity, k = 0 a point
        // of order 4); whether or not y = k is on the curve, the encoding
        // is refused.
        for k in 0..19 {
            let b = p_plus(k);
            assert!(
                matches!(IdentityKey(b).check(), Err(IdentityError::WeakKey)),
                "y = p + {k}"
            );
        }
        // "Negative zero": x = 0 with the sign bit set (the identity and the
        // point of order 2).
        let mut neg_zero = key(SMALL_ORDER[0]);
        neg_zero[31] |= 0x80;
        assert!(IdentityKey(neg_zero).check().is_err());
        let mut neg_zero2 = key(SMALL_ORDER[1]);
        neg_zero2[31] |= 0x80;
        assert!(IdentityKey(neg_zero2).check().is_err());
        // The forged signature under the non-canonical identity, which plain
        // verification accepts, is refused.
        let noncanonical_identity = p_plus(1);
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&key(SMALL_ORDER[0]));
        assert!(
            IdentityKey(noncanonical_identity)
                .verify(b"m", &sig)
                .is_err()
        );
        // Not a point at all: y = 2 has no x on the curve.
        let mut off = [0u8; 32];
        off[0] = 2;
        assert!(CompressedEdwardsY(off).decompress().is_none());
        assert!(IdentityKey(off).check().is_err());
    }

    #[test]
    fn a_key_with_a_torsion_component_is_refused() {
        let honest = Identity::generate().unwrap().public_key();
        honest.check().unwrap();
        let a = CompressedEdwardsY(honest.0).decompress().unwrap();
        for t in &curve25519_dalek::constants::EIGHT_TORSION[1..] {
            let mixed = (a + t).compress().to_bytes();
            assert!(
                matches!(IdentityKey(mixed).check(), Err(IdentityError::WeakKey)),
                "A + T must be refused"
            );
        }
    }

    #[test]
    fn non_canonical_signatures_are_refused() {
        let id = Identity::generate().unwrap();
        let msg = b"authenticate me";
        let sig: [u8; 64] = id.sign(msg).unwrap().try_into().unwrap();
        id.public_key().verify(msg, &sig).unwrap();
        // S + L: the same scalar, not reduced.
        let s = Scalar::from_canonical_bytes(sig[32..].try_into().unwrap()).unwrap();
        let l_bytes = {
            // L = 2^252 + 27742317777372353535851937790883648493
            let mut l = [0u8; 32];
            l.copy_from_slice(
                &hex::decode("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010")
                    .unwrap(),
            );
            l
        };
        let mut s_plus_l = [0u8; 32];
        let mut carry = 0u16;
        for (i, out) in s_plus_l.iter_mut().enumerate() {
            let v = u16::from(s.as_bytes()[i]) + u16::from(l_bytes[i]) + carry;
            *out = v as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0);
        let mut malleated = sig;
        malleated[32..].copy_from_slice(&s_plus_l);
        assert!(matches!(
            id.public_key().verify(msg, &malleated),
            Err(IdentityError::BadSignature)
        ));
        // R replaced by a small-order point, or a non-canonical encoding.
        for r in SMALL_ORDER {
            let mut bad = sig;
            bad[..32].copy_from_slice(&key(r));
            assert!(id.public_key().verify(msg, &bad).is_err());
        }
        let mut bad = sig;
        bad[..32].copy_from_slice(&p_plus(1));
        assert!(id.public_key().verify(msg, &bad).is_err());
        // Wrong lengths.
        assert!(id.public_key().verify(msg, &sig[..63]).is_err());
        assert!(
            id.public_key()
                .verify(msg, &[sig.as_slice(), &[0]].concat())
                .is_err()
        );
    }

    #[test]
    fn wrong_key_length_is_an_error() {
        assert!(matches!(
            IdentityKey::from_slice(&[0; 31]),
            Err(IdentityError::KeyLength {
                expected: 32,
                got: 31
            })
        ));
    }
}
