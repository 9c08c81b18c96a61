//! MLS key packages: building them (client side) and inspecting them
//! (server side, before storing one in the directory).

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, KeyPackageIn, Lifetime, OpenMlsProvider,
    ProtocolVersion,
};
use openmls_rust_crypto::RustCrypto;

use crate::CIPHERSUITE;
use crate::identity::{Identity, IdentityKey};

/// Errors of key-package operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyPackageError {
    /// the bytes are not a TLS-serialized KeyPackage
    #[error("not a key package: {0}")]
    Decode(String),
    /// signature, lifetime, version or extension checks failed
    #[error("invalid key package: {0}")]
    Invalid(String),
    /// the package uses a ciphersuite we do not accept
    #[error("unsupported ciphersuite")]
    Ciphersuite,
    /// the leaf signature key is not a 32-byte Ed25519 key
    #[error("leaf signature key is not an Ed25519 key")]
    SignatureKey,
    /// the lifetime spans more than [`MAX_LIFETIME_RANGE_SECS`]
    #[error("key package lifetime spans more than 12 weeks and 1 hour")]
    Lifetime,
    /// the credential is not a basic credential (a username)
    #[error("key package credential is not a basic credential")]
    Credential,
    /// the leaf signature key is not a canonical Ed25519 key of prime order
    #[error("leaf signature key is not a canonical Ed25519 key of prime order")]
    WeakKey,
    /// building a package failed in openmls
    #[error("building a key package failed: {0}")]
    Build(String),
}

/// Longest lifetime (`not_after - not_before`) a key package may span:
/// openmls's default key-package lifetime (12 weeks) plus its one-hour
/// margin for clock skew.  RFC 9420 §10.1 asks every application to set a
/// maximum; a package valid for years would keep a one-time key usable long
/// after its owner replaced it.
pub const MAX_LIFETIME_RANGE_SECS: u64 = 12 * 7 * 24 * 3600 + 3600;

/// What the server needs to know about a validated key package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// The leaf signature key: the identity that published it.
    pub identity: IdentityKey,
    /// Whether it carries the last_resort extension.
    pub last_resort: bool,
    /// End of its lifetime, Unix seconds.
    pub not_after: u64,
    /// Its KeyPackageRef (RFC 9420 §5.2), for bookkeeping.
    pub hash_ref: Vec<u8>,
    /// The username in its basic credential (`None` when it is not UTF-8).
    pub username: Option<String>,
}

/// Parses and fully validates a TLS-serialized key package: leaf and package
/// signatures, protocol version, extensions, lifetime (not expired), and the
/// ciphersuite.
pub fn inspect(bytes: &[u8]) -> Result<KeyPackageInfo, KeyPackageError> {
    let crypto = RustCrypto::default();
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| KeyPackageError::Decode(e.to_string()))?;
    let kp: KeyPackage = kp_in
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|e| KeyPackageError::Invalid(e.to_string()))?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(KeyPackageError::Ciphersuite);
    }
    // openmls checked the lifetime is current (`validate`), not its span.
    let life = kp.life_time();
    if life.not_after().saturating_sub(life.not_before()) > MAX_LIFETIME_RANGE_SECS {
        return Err(KeyPackageError::Lifetime);
    }
    let identity = IdentityKey::from_slice(kp.leaf_node().signature_key().as_slice())
        .map_err(|_| KeyPackageError::SignatureKey)?;
    // openmls checked the signatures with plain Ed25519, which a weak key
    // passes without a private key (see `IdentityKey::check`).
    identity.check().map_err(|_| KeyPackageError::WeakKey)?;
    let hash_ref = kp
        .hash_ref(&crypto)
        .map_err(|e| KeyPackageError::Invalid(e.to_string()))?
        .as_slice()
        .to_vec();
    let username = BasicCredential::try_from(kp.leaf_node().credential().clone())
        .map_err(|_| KeyPackageError::Credential)
        .map(|c| String::from_utf8(c.identity().to_vec()).ok())?;
    Ok(KeyPackageInfo {
        username,
        identity,
        last_resort: kp.last_resort(),
        not_after: kp.life_time().not_after(),
        hash_ref,
    })
}

/// Builds a key package for `identity` with `username` as its basic
/// credential, valid for `lifetime_secs`, and stores its private keys in the
/// provider's storage.  Returns the TLS-serialized package.
pub fn build<P: OpenMlsProvider>(
    provider: &P,
    identity: &Identity,
    username: &str,
    last_resort: bool,
    lifetime_secs: u64,
) -> Result<Vec<u8>, KeyPackageError> {
    let credential = CredentialWithKey {
        credential: BasicCredential::new(username.as_bytes().to_vec()).into(),
        signature_key: identity.public_key().as_bytes().to_vec().into(),
    };
    let mut builder = KeyPackage::builder()
        .key_package_lifetime(Lifetime::new(lifetime_secs))
        .leaf_node_capabilities(crate::mls_config::capabilities());
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(CIPHERSUITE, provider, identity.key_pair(), credential)
        .map_err(|e| KeyPackageError::Build(e.to_string()))?;
    bundle
        .key_package()
        .tls_serialize_detached()
        .map_err(|e| KeyPackageError::Build(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock as _;
    use openmls::prelude::Capabilities;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    #[test]
    fn built_packages_inspect_to_their_identity() {
        let p = OpenMlsRustCrypto::default();
        let id = Identity::generate().unwrap();
        let kp = build(&p, &id, "alice", false, 3600).unwrap();
        let info = inspect(&kp).unwrap();
        assert_eq!(info.identity, id.public_key());
        assert_eq!(info.username.as_deref(), Some("alice"));
        assert!(!info.last_resort);
        let now = crate::clock::SystemClock::new().unix_secs();
        assert!(info.not_after > now && info.not_after <= now + 3600);
        let lr = inspect(&build(&p, &id, "alice", true, 3600).unwrap()).unwrap();
        assert!(lr.last_resort);
    }

    #[test]
    fn a_lifetime_past_twelve_weeks_is_refused() {
        let p = OpenMlsRustCrypto::default();
        let id = Identity::generate().unwrap();
        // 12 weeks is accepted (the span is 12 weeks plus the 1 h margin).
        let ok = build(&p, &id, "alice", false, 12 * 7 * 24 * 3600).unwrap();
        inspect(&ok).unwrap();
        let long = build(&p, &id, "alice", false, 12 * 7 * 24 * 3600 + 1).unwrap();
        assert!(matches!(inspect(&long), Err(KeyPackageError::Lifetime)));
        let years = build(&p, &id, "alice", false, 5 * 365 * 24 * 3600).unwrap();
        assert!(matches!(inspect(&years), Err(KeyPackageError::Lifetime)));
    }

    #[test]
    fn only_basic_credentials_are_accepted() {
        use openmls::prelude::{Credential, CredentialType};
        let p = OpenMlsRustCrypto::default();
        let id = Identity::generate().unwrap();
        let credential = CredentialWithKey {
            credential: Credential::new(CredentialType::X509, b"not a certificate".to_vec()),
            signature_key: id.public_key().as_bytes().to_vec().into(),
        };
        let kp = KeyPackage::builder()
            .leaf_node_capabilities(Capabilities::new(
                None,
                None,
                None,
                None,
                Some(&[CredentialType::Basic, CredentialType::X509]),
            ))
            .build(CIPHERSUITE, &p, id.key_pair(), credential)
            .unwrap()
            .key_package()
            .tls_serialize_detached()
            .unwrap();
        assert!(matches!(inspect(&kp), Err(KeyPackageError::Credential)));
    }

    #[test]
    fn garbage_and_tampered_packages_are_errors() {
        assert!(matches!(
            inspect(b"garbage"),
            Err(KeyPackageError::Decode(_))
        ));
        assert!(inspect(&[]).is_err());
        let p = OpenMlsRustCrypto::default();
        let id = Identity::generate().unwrap();
        let mut kp = build(&p, &id, "alice", false, 3600).unwrap();
        let last = kp.len() - 1;
        kp[last] ^= 1; // flip a signature bit
        assert!(inspect(&kp).is_err());
    }
}
