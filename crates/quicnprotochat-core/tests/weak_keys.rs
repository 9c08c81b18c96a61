//! Identity keys that plain Ed25519 verification lets through but no honest
//! key generation produces (a torsion component, here) never become group
//! members: not through a key package, not through a Welcome, not through a
//! commit of a hostile member.
//!
//! The hostile side is raw openmls with a signer that forges for
//! A' = aB + T (T of order 8): knowing a, it grinds R = rB + T_j until the
//! torsion parts cancel in [S]B = R + [k]A', which `ed25519-dalek`'s
//! `verify_strict` (what openmls uses) then accepts.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::IsIdentity as _;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, CredentialWithKey, Extension, Extensions, KeyPackage, KeyPackageIn, MlsGroup,
    MlsGroupCreateConfig, MlsMessageOut, OpenMlsProvider, ProtocolVersion, UnknownExtension,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use quicnprotochat_core::group::GROUP_META_EXTENSION;
use quicnprotochat_core::keypackage::{self, KeyPackageError};
use quicnprotochat_core::mls_config::capabilities;
use quicnprotochat_core::{CIPHERSUITE, GroupError, IdentityKey, Profile, ProfileKey};
use ring::rand::SecureRandom as _;

struct TorsionSigner {
    a: Scalar,
    torsion: EdwardsPoint,
    public: [u8; 32],
}

fn random_scalar() -> Scalar {
    let mut wide = [0u8; 64];
    ring::rand::SystemRandom::new().fill(&mut wide).unwrap();
    Scalar::from_bytes_mod_order_wide(&wide)
}

impl TorsionSigner {
    fn new() -> Self {
        let a = random_scalar();
        let torsion = EIGHT_TORSION[1];
        let public = (a * ED25519_BASEPOINT_POINT + torsion)
            .compress()
            .to_bytes();
        Self { a, torsion, public }
    }
}

impl Signer for TorsionSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        for _ in 0..1_000 {
            let r = random_scalar();
            for t in EIGHT_TORSION {
                let big_r = (r * ED25519_BASEPOINT_POINT + t).compress().to_bytes();
                let mut h = ring::digest::Context::new(&ring::digest::SHA512);
                h.update(&big_r);
                h.update(&self.public);
                h.update(payload);
                let k = Scalar::from_bytes_mod_order_wide(
                    &h.finish()
                        .as_ref()
                        .try_into()
                        .map_err(|_| SignerError::SigningError)?,
                );
                if (t + k * self.torsion).is_identity() {
                    let s = r + k * self.a;
                    return Ok([big_r, s.to_bytes()].concat());
                }
            }
        }
        Err(SignerError::SigningError)
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

fn torsion_key_package(provider: &OpenMlsRustCrypto) -> (TorsionSigner, KeyPackage) {
    let signer = TorsionSigner::new();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(b"mallory2".to_vec()).into(),
        signature_key: signer.public.to_vec().into(),
    };
    let kp = KeyPackage::builder()
        .leaf_node_capabilities(capabilities())
        .build(CIPHERSUITE, provider, &signer, credential)
        .unwrap()
        .key_package()
        .clone();
    (signer, kp)
}

/// Mallory: a raw openmls client that creates a group the way ours do.
struct Mallory {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    group: MlsGroup,
}

impl Mallory {
    fn new() -> Self {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(b"mallory".to_vec()).into(),
            signature_key: signer.public().to_vec().into(),
        };
        let meta = Extension::Unknown(GROUP_META_EXTENSION, UnknownExtension(b"trap".to_vec()));
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .capabilities(capabilities())
            .with_group_context_extensions(Extensions::single(meta).unwrap())
            .build();
        let group = MlsGroup::new(&provider, &signer, &config, credential).unwrap();
        Self {
            provider,
            signer,
            group,
        }
    }

    /// Adds `kps`, merges, and returns (commit, Welcome) bytes.
    fn add(&mut self, kps: &[KeyPackage]) -> (Vec<u8>, Vec<u8>) {
        let (commit, welcome, _) = self
            .group
            .add_members(&self.provider, &self.signer, kps)
            .unwrap();
        self.group.merge_pending_commit(&self.provider).unwrap();
        (bytes(&commit), bytes(&welcome))
    }
}

fn bytes(m: &MlsMessageOut) -> Vec<u8> {
    m.tls_serialize_detached().unwrap()
}

fn bob(dir: &std::path::Path) -> (Profile, KeyPackage) {
    let mut bob = Profile::create(
        &dir.join("bob"),
        &ProfileKey::Passphrase("pw-bob".into()),
        "bob",
    )
    .unwrap();
    let kp = bob.generate_key_packages(1, false, 3600).unwrap().remove(0);
    let kp = KeyPackageIn::tls_deserialize_exact(&kp)
        .unwrap()
        .validate(
            OpenMlsRustCrypto::default().crypto(),
            ProtocolVersion::Mls10,
        )
        .unwrap();
    (bob, kp)
}

#[test]
fn a_key_package_with_a_torsion_key_passes_openmls_but_not_us() {
    let provider = OpenMlsRustCrypto::default();
    let (signer, kp) = torsion_key_package(&provider);
    let wire = kp.tls_serialize_detached().unwrap();
    // openmls (strict Ed25519 as ed25519-dalek defines it) accepts it ...
    KeyPackageIn::tls_deserialize_exact(&wire)
        .unwrap()
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .expect("the forged package passes openmls's own checks");
    // ... and so would an authentication proof under that key with plain
    // Ed25519; we refuse both.
    let sig = signer.sign(b"transcript").unwrap();
    assert!(
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &signer.public)
            .verify(b"transcript", &sig)
            .is_ok()
    );
    assert!(
        IdentityKey(signer.public)
            .verify(b"transcript", &sig)
            .is_err()
    );
    assert!(matches!(
        keypackage::inspect(&wire),
        Err(KeyPackageError::WeakKey)
    ));
    // An inviter never adds it, even when asked to directly.
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, _) = bob(dir.path());
    alice.create_group("g").unwrap();
    assert!(matches!(
        alice.add_member("g", &wire, IdentityKey(signer.public)),
        Err(GroupError::KeyPackage(KeyPackageError::WeakKey))
    ));
}

#[test]
fn a_welcome_naming_a_torsion_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bob, bob_kp) = bob(dir.path());
    let mut mallory = Mallory::new();
    let (_, weak_kp) = torsion_key_package(&mallory.provider);
    let (_, welcome) = mallory.add(&[bob_kp, weak_kp]);
    assert!(matches!(
        bob.process(b"welcome-1", &welcome),
        Err(GroupError::WeakMemberKey)
    ));
    assert!(bob.groups().unwrap().is_empty());
}

#[test]
fn a_commit_adding_a_torsion_member_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bob, bob_kp) = bob(dir.path());
    let mut mallory = Mallory::new();
    let (_, welcome) = mallory.add(&[bob_kp]);
    bob.process(b"welcome-1", &welcome).unwrap();
    let before = bob.groups().unwrap();
    assert_eq!(before.len(), 1);
    let (_, weak_kp) = torsion_key_package(&mallory.provider);
    let (commit, _) = mallory.add(&[weak_kp]);
    assert!(matches!(
        bob.process(b"commit-1", &commit),
        Err(GroupError::WeakMemberKey)
    ));
    assert_eq!(bob.groups().unwrap(), before);
}
