//! Link TLS: mutual TLS 1.3 in which each end is its Ed25519 node key.
//!
//! Each end presents a self-signed certificate whose subject public key is its node key, and proves it
//! holds the key in the handshake's CertificateVerify. So the node id is read from the certificate, and no
//! certificate authority is involved (as libp2p-tls and Syncthing do). The dialer checks that the
//! acceptor's key is the node it meant to reach before the handshake completes, so nothing of the link is
//! sent to anyone else. The acceptor takes the dialer's node id from its certificate and admits it by its
//! plan. docs/design.md §3.5 and docs/agent-integration.md give the profile.
use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};

use crate::identity::Identity;

/// The ALPN protocol of link version 2.
pub const ALPN: &[u8] = b"agentmesh/2";
/// The TLS exporter label the join-token proof is computed over (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-agentmesh-join-token";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (32 bytes) }. The key's 32 bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// An agent's TLS credentials: its certificate and key, and the configurations built from them.
pub struct Credentials {
    /// The node key itself, for link protocol 1 during an upgrade (`crate::legacy`).
    key_pair: ed25519_dalek::SigningKey,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    server: Arc<ServerConfig>,
}

impl Credentials {
    pub fn new(identity: &Identity) -> Credentials {
        let pkcs8 = identity.signing_key().to_pkcs8_der().expect("an Ed25519 key encodes as PKCS#8");
        let key = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .expect("rcgen takes an Ed25519 PKCS#8 key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, identity.node_id());
        let cert = params.self_signed(&pair).expect("a self-signed Ed25519 certificate").der().clone();
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(AnyNode))
            .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))
            .expect("the certificate matches its key");
        let mut server = server;
        server.alpn_protocols = vec![ALPN.to_vec()];
        Credentials { key_pair: identity.signing_key().clone(), cert, key, server: Arc::new(server) }
    }

    /// The acceptor's configuration: any node may complete the handshake; admission comes after.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The dialer's configuration: the handshake completes only if the acceptor is `expect`.
    pub fn client(&self, expect: &str) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerIs(expect.to_string())))
            .with_client_auth_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))
            .expect("the certificate matches its key");
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }

    pub(crate) fn key(&self) -> &ed25519_dalek::SigningKey {
        &self.key_pair
    }

    /// This end's certificate (DER), for test vectors and tools.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Only Ed25519 signatures are part of the profile.
fn algorithms() -> WebPkiSupportedAlgorithms {
    let all = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let ed25519 = all.mapping.iter().find(|(s, _)| *s == SignatureScheme::ED25519).expect("ring verifies Ed25519");
    WebPkiSupportedAlgorithms { all: all.all, mapping: std::slice::from_ref(ed25519) }
}

/// The node id (hex Ed25519 public key) a certificate carries, if it carries an Ed25519 key.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    (key.len() == 32).then(|| hex::encode(key))
}

/// The node id of the peer on an established connection: its only certificate's key.
pub fn peer_id(conn: &CommonState) -> Option<String> {
    match conn.peer_certificates()? {
        [cert] => node_id_of(cert),
        _ => None,
    }
}

/// A certificate chain of exactly one Ed25519 certificate, its node id.
fn single_node(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<String, Error> {
    if !intermediates.is_empty() {
        return Err(Error::General("a node presents one self-signed certificate, not a chain".into()));
    }
    node_id_of(end_entity).ok_or_else(|| Error::General("the certificate's key is not an Ed25519 node key".into()))
}

/// The dialer's check: the acceptor's key is the planned node.
#[derive(Debug)]
struct PeerIs(String);

impl ServerCertVerifier for PeerIs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = single_node(end_entity, intermediates)?;
        if id != self.0 {
            return Err(Error::General(format!("the peer is node {id}, not the planned {}", self.0)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("links are TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The acceptor's check: the dialer is some node (it proves its key); who may link is decided after.
#[derive(Debug)]
struct AnyNode;

impl ClientCertVerifier for AnyNode {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        single_node(end_entity, intermediates).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("links are TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The proof that an end of a TLS connection knows the join token: HMAC-SHA256 keyed by the token over
/// the 32 bytes [`EXPORTER_LABEL`] exports from that connection's keys, in hex. Both ends compute the same
/// value; on any other connection it differs, so a proof cannot be replayed.
pub fn token_proof(exported: &[u8; 32], token: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    hex::encode(ring::hmac::sign(&key, exported).as_ref())
}

/// Whether `proof` (from the peer) is this connection's proof of `token`, compared in constant time.
pub fn proof_ok(exported: &[u8; 32], token: &str, proof: &str) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    hex::decode(proof).is_ok_and(|tag| ring::hmac::verify(&key, exported, &tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_its_node_id() {
        let id = Identity::generate();
        let creds = Credentials::new(&id);
        assert_eq!(node_id_of(creds.certificate()).as_deref(), Some(id.node_id().as_str()));
        assert_eq!(node_id_of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])), None);
    }

    /// The test vector of docs/agent-integration.md: RFC 8032's first Ed25519 key, its node id, and the
    /// certificate this crate makes of it (rcgen's output is deterministic for a given key).
    #[test]
    fn the_documented_test_vector() {
        let secret = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60").unwrap();
        let id = Identity::from_secret(secret.try_into().unwrap());
        assert_eq!(id.node_id(), "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let creds = Credentials::new(&id);
        let der = creds.certificate().as_ref();
        let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        assert_eq!(fingerprint, "52757c22d8b3b7ab424d46bbbaad7f0a33dcedde89d13bfb0cc2aba45b2f1f5d");
        assert_eq!(node_id_of(creds.certificate()), Some(id.node_id()));
    }
}
