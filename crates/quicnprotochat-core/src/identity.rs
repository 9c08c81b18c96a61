//! Ed25519 identity keys.
//!
//! An identity is an Ed25519 signature key pair.  Its 32-byte public key is
//! the identity the server knows, the recipient key of the identity's queue,
//! and the MLS leaf signature key.

use std::fmt;

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
    /// a signature did not verify
    #[error("signature verification failed")]
    BadSignature,
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

    /// Verifies an Ed25519 signature by this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), IdentityError> {
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
