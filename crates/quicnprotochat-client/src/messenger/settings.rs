//! What the messenger keeps in the profile's settings: the server to connect
//! to (address, TLS name, certificate pin, access token) and the secret key
//! of the peer-to-peer endpoint.  The names and encodings are the profile
//! format: changing them orphans existing profiles.

use quicnprotochat_core::Profile;
use quicnprotochat_proto::transport::ServerAuth;

use super::error::MessengerError;
use crate::types::ClientConfig;

const SET_ADDR: &str = "server_addr";
/// Other nodes of the deployment, comma-separated (absent: none).
const SET_FALLBACKS: &str = "server_fallbacks";
const SET_NAME: &str = "server_name";
const SET_PIN: &str = "server_pin";
const SET_TOKEN: &str = "access_token";
/// The iroh endpoint's secret key: a stable endpoint id across restarts.
const P2P_SECRET: &str = "p2p_secret";

/// Stores `server` in the profile.
pub(super) fn save_server(profile: &Profile, server: &ClientConfig) -> Result<(), MessengerError> {
    profile.set_setting(SET_ADDR, server.server_addr.to_string().as_bytes())?;
    let fallbacks: Vec<String> = server
        .fallback_addrs
        .iter()
        .map(ToString::to_string)
        .collect();
    profile.set_setting(SET_FALLBACKS, fallbacks.join(",").as_bytes())?;
    profile.set_setting(SET_NAME, server.server_name.as_bytes())?;
    match &server.server_auth {
        ServerAuth::Pinned(fp) => profile.set_setting(SET_PIN, fp)?,
        ServerAuth::Roots(_) => profile.set_setting(SET_PIN, b"")?,
    }
    profile.set_setting(SET_TOKEN, &server.access_token)?;
    Ok(())
}

/// The server stored in the profile (pinned certificates only: CA roots are
/// not stored, so such profiles pass their server on open).
pub(super) fn load_server(profile: &Profile) -> Result<ClientConfig, MessengerError> {
    let text = |k: &'static str| -> Result<String, MessengerError> {
        let v = profile
            .setting(k)?
            .ok_or(MessengerError::NotConfigured(k))?;
        String::from_utf8(v).map_err(|_| MessengerError::NotConfigured(k))
    };
    let addr = text(SET_ADDR)?
        .parse()
        .map_err(|_| MessengerError::NotConfigured(SET_ADDR))?;
    let pin: [u8; 32] = profile
        .setting(SET_PIN)?
        .and_then(|v| v.try_into().ok())
        .ok_or(MessengerError::NotConfigured(
            "server certificate pin (profiles using CA roots must pass them on open)",
        ))?;
    let token = profile
        .setting(SET_TOKEN)?
        .ok_or(MessengerError::NotConfigured(SET_TOKEN))?;
    let mut cfg = ClientConfig::new(addr, ServerAuth::Pinned(pin), token);
    cfg.server_name = text(SET_NAME)?;
    // Profiles made before fallbacks existed have none.
    if let Some(v) = profile.setting(SET_FALLBACKS)? {
        let list =
            String::from_utf8(v).map_err(|_| MessengerError::NotConfigured(SET_FALLBACKS))?;
        cfg.fallback_addrs = list
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| MessengerError::NotConfigured(SET_FALLBACKS))?;
    }
    Ok(cfg)
}

/// The peer-to-peer endpoint's secret key, generated and stored on first use.
pub(super) fn p2p_secret(profile: &Profile) -> Result<[u8; 32], MessengerError> {
    Ok(
        match profile.setting(P2P_SECRET)?.and_then(|v| v.try_into().ok()) {
            Some(s) => s,
            None => {
                let mut s = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                    .map_err(|_| MessengerError::NotConfigured("system RNG failed"))?;
                profile.set_setting(P2P_SECRET, &s)?;
                s
            }
        },
    )
}
